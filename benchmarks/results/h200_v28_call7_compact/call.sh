#!/usr/bin/env bash
# v28 call 7 (nvidia-h200): the decoding kernels over a list of the keeping (sequence, head) rows (COMPACT) against a
# program per row, and their launch settings, alone (benchmarks/bench_decode_heads.py); then the default in the
# tests, the step's profile and decode speed.
set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/inference timeout 150 python3 -m pytest -q -n 8 -p no:cacheprovider \
  tests/ops/test_triton_decode_heads.py tests/inference/test_static_decode.py > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; grep -E "FAILED|ERROR|passed|failed|rc=" $O/pytest.log | tail -8
timeout 150 python3 benchmarks/bench_decode_heads.py --out $O/decode_heads.json > $O/decode_heads.log 2>&1
echo "rc=$?" >> $O/decode_heads.log; cat $O/decode_heads.log
MODELS="mosa-hybrid pure-mosa" BACKENDS=triton timeout 60 python3 benchmarks/profile_static_decode.py cuda $O/profile_fp32_b1.json 2>&1 | grep -v USDT > $O/profile_fp32_b1.log
grep -A6 '##' $O/profile_fp32_b1.log | cut -c1-110
timeout 100 python3 benchmarks/bench_generation.py --device cuda --models mosa-hybrid pure-mosa --prompt-lens 128 4032 \
  --new-tokens 32 --batch 1 8 --repeats 1 --out $O/gen_fp32.json > $O/gen_fp32.log 2>&1
echo "rc=$?" >> $O/gen_fp32.log; grep -E "B=|rc=|Error" $O/gen_fp32.log | cut -c1-125
cd $OUT && tar czf all.tar.gz x && rm -rf x
