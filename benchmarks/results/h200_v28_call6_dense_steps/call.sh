#!/usr/bin/env bash
# v28 call 6 (nvidia-h200): as call 5 after the fixed-shape steps' dense heads make their mask once per step (not per layer)
# and rotate q and k in one pass: the tests, the profile, and the decode tables of docs/generation.md.
set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $O/gpu.txt
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/inference timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider \
  tests/ops/test_triton_decode_heads.py tests/inference > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; grep -E "FAILED|ERROR|passed|failed|rc=" $O/pytest.log | tail -12
BACKENDS="triton torch" timeout 100 python3 benchmarks/profile_static_decode.py cuda $O/profile_fp32_b1.json 2>&1 | grep -v USDT > $O/profile_fp32_b1.log
grep -A8 '##' $O/profile_fp32_b1.log | cut -c1-110
timeout 200 python3 benchmarks/bench_generation.py --device cuda --prompt-lens 128 1024 4032 --new-tokens 32 --batch 1 8 \
  --repeats 1 --out $O/gen_fp32.json > $O/gen_fp32.log 2>&1
echo "rc=$?" >> $O/gen_fp32.log; grep -E "B=|rc=|Error" $O/gen_fp32.log | cut -c1-125
timeout 100 python3 benchmarks/bench_generation.py --device cuda --dtype bfloat16 --models dense mosa-hybrid pure-mosa \
  --prompt-lens 128 4032 --new-tokens 32 --batch 1 8 --repeats 1 --out $O/gen_bf16.json > $O/gen_bf16.log 2>&1
echo "rc=$?" >> $O/gen_bf16.log; grep -E "B=|rc=|Error" $O/gen_bf16.log | cut -c1-125
cd $OUT && tar czf all.tar.gz x && rm -rf x
