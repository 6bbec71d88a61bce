#!/usr/bin/env bash
# v27 call 8 (nvidia-h200): the static decoder's GPU tests on the final code; the paged steps in bf16 with the
# cache's attention kept off cuDNN (decode.SDPA_BACKENDS, new) against SDPA's own choice (None, as before)
set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src
git log -1 --format=%H > $O/gpu.txt; nvidia-smi --query-gpu=name --format=csv,noheader >> $O/gpu.txt
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/inference timeout 60 python3 -m pytest -q -n 4 -p no:cacheprovider \
  tests/inference/test_static_decode.py > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; grep -E "passed|failed|rc=" $O/pytest.log | tail -3
for mode in new old; do
  timeout 70 python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
import bench_generation as b
from mosa_attention.inference import decode
if '$mode' == 'old': decode.SDPA_BACKENDS = None
b.main(['--device', 'cuda', '--dtype', 'bfloat16', '--models', 'dense', 'mosa-hybrid', '--prompt-lens', '128', '1024',
        '--new-tokens', '16', '--batch', '1', '--repeats', '1', '--out', '$O/gen_bf16_$mode.json'])
" > $O/bench_$mode.log 2>&1
  echo "$mode rc=$?"; grep "B=" $O/bench_$mode.log | cut -c1-120
done
cd $OUT && tar czf all.tar.gz x && rm -rf x
