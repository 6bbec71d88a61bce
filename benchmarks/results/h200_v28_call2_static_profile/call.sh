#!/usr/bin/env bash
# v28 call 2 (nvidia-h200): where a fixed-shape decoding step's time goes (benchmarks/profile_static_decode.py), with
# "auto" (now the kernel on CUDA) as the static decoder's default; the decode tests again on the new default.
set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/inference timeout 120 python3 -m pytest -q -n 8 -p no:cacheprovider \
  tests/ops/test_triton_decode_heads.py tests/inference/test_static_decode.py > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; tail -3 $O/pytest.log
timeout 150 python3 benchmarks/profile_static_decode.py cuda $O/profile_fp32_b1.json 2>&1 | grep -v USDT > $O/profile_fp32_b1.log
cat $O/profile_fp32_b1.log
B=8 MODELS="dense mosa-hybrid" BACKENDS=triton timeout 80 python3 benchmarks/profile_static_decode.py cuda $O/profile_fp32_b8.json 2>&1 | grep -v USDT > $O/profile_fp32_b8.log
cat $O/profile_fp32_b8.log
DTYPE=bfloat16 MODELS="dense mosa-hybrid" BACKENDS=triton timeout 80 python3 benchmarks/profile_static_decode.py cuda $O/profile_bf16_b1.json 2>&1 | grep -v USDT > $O/profile_bf16_b1.log
cat $O/profile_bf16_b1.log
cd $OUT && tar czf all.tar.gz x && rm -rf x
