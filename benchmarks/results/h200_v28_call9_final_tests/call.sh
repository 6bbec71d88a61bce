#!/usr/bin/env bash
# v28 call 9 (nvidia-h200): the session's final code on the card: the decode kernels' tests (bad arguments
# included), the whole inference suite (compiled steps replayed as CUDA graphs among them), the ops' GPU tests.
set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src
git log -1 --format=%H > $O/gpu.txt 2>/dev/null; nvidia-smi --query-gpu=name --format=csv,noheader >> $O/gpu.txt
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/inference:$PWD/tests/ops timeout 400 python3 -m pytest -q -n 8 -p no:cacheprovider \
  tests/ops/test_triton_decode_heads.py tests/inference > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; grep -E "FAILED|ERROR|passed|failed|rc=|^E " $O/pytest.log | tail -20
cd $OUT && tar czf all.tar.gz x && rm -rf x
