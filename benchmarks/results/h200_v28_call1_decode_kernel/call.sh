#!/usr/bin/env bash
# v28 call 1 (nvidia-h200): v27.5's Triton kernel for the fixed-shape decoder's MoSA heads
# (ops/triton_decode_heads.py, StaticDecoder(backend="triton")) on a card for the first time: its tests and the
# static decoder's (graphs, bf16, to_cache), the inference CLI's, then decode speed with both static backends.
set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader > $O/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $O/gpu.txt
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/inference timeout 230 python3 -m pytest -q -n 8 -p no:cacheprovider -rA \
  tests/ops/test_triton_decode_heads.py tests/inference/test_static_decode.py tests/inference/test_inference_cli.py \
  > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; grep -v DEBUG $O/pytest.log | grep -E "FAILED|ERROR|passed|failed|rc=|^E " | tail -40 > $O/pytest_summary.log
tail -6 $O/pytest_summary.log
for be in torch triton; do
  timeout 100 python3 benchmarks/bench_generation.py --device cuda --models mosa-hybrid pure-mosa --prompt-lens 128 4032 \
    --new-tokens 32 --batch 1 8 --repeats 1 --static-backend $be --out $O/gen_fp32_$be.json > $O/gen_fp32_$be.log 2>&1
  echo "rc=$?" >> $O/gen_fp32_$be.log; grep -E "B=|rc=|Error" $O/gen_fp32_$be.log | cut -c1-120
done
for be in torch triton; do
  timeout 70 python3 benchmarks/bench_generation.py --device cuda --dtype bfloat16 --models mosa-hybrid --prompt-lens 128 4032 \
    --new-tokens 32 --batch 1 8 --repeats 1 --static-backend $be --out $O/gen_bf16_$be.json > $O/gen_bf16_$be.log 2>&1
  echo "rc=$?" >> $O/gen_bf16_$be.log; grep -E "B=|rc=|Error" $O/gen_bf16_$be.log | cut -c1-120
done
cd $OUT && tar czf all.tar.gz x && rm -rf x
