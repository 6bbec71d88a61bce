#!/usr/bin/env bash
# v28 call 3 (nvidia-h200): the decoding kernel in three kernels whose programs split each keeping head's work
# ("split") against v27.5's one program per head ("one"): tests, the step's profile, decode speed.
set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/inference timeout 120 python3 -m pytest -q -n 8 -p no:cacheprovider \
  tests/ops/test_triton_decode_heads.py tests/inference/test_static_decode.py > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; tail -3 $O/pytest.log
MODELS="mosa-hybrid pure-mosa" BACKENDS=triton FORMS="split one" timeout 100 python3 benchmarks/profile_static_decode.py cuda $O/profile_fp32_b1.json 2>&1 | grep -v USDT > $O/profile_fp32_b1.log
grep -A6 '##' $O/profile_fp32_b1.log | cut -c1-110
B=8 MODELS="mosa-hybrid" BACKENDS=triton FORMS="split one" timeout 60 python3 benchmarks/profile_static_decode.py cuda $O/profile_fp32_b8.json 2>&1 | grep -v USDT > $O/profile_fp32_b8.log
grep '##' $O/profile_fp32_b8.log
DTYPE=bfloat16 PL=4032 MODELS="mosa-hybrid" BACKENDS=triton FORMS="split one" timeout 60 python3 benchmarks/profile_static_decode.py cuda $O/profile_bf16_b1_4032.json 2>&1 | grep -v USDT > $O/profile_bf16_b1_4032.log
grep '##' $O/profile_bf16_b1_4032.log
timeout 200 python3 benchmarks/bench_generation.py --device cuda --prompt-lens 128 4032 --new-tokens 32 --batch 1 8 \
  --repeats 1 --out $O/gen_fp32.json > $O/gen_fp32.log 2>&1
echo "rc=$?" >> $O/gen_fp32.log; grep -E "B=|rc=|Error" $O/gen_fp32.log | cut -c1-125
cd $OUT && tar czf all.tar.gz x && rm -rf x
