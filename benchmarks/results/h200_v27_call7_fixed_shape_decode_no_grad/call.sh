#!/usr/bin/env bash
# (call 7: as call 6, the steps under no_grad: the benchmark had let them build autograd graphs)
# v27 call 7 (nvidia-h200): decoding with fixed shapes (inference/static.py, CUDA graphs) against the paged
# cache's steps: the inference tests on the card (the static decoder's graph tests among them; generate takes

set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src
git log -1 --format=%H > $O/gpu.txt; nvidia-smi --query-gpu=name --format=csv,noheader >> $O/gpu.txt
PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/inference timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider -rA \
  tests/inference/test_static_decode.py > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; grep -v DEBUG $O/pytest.log | grep -E "FAILED|ERROR|passed|failed|rc=|^E " | tail -30 > $O/pytest_summary.log
tail -4 $O/pytest_summary.log
timeout 280 python3 benchmarks/bench_generation.py --device cuda --prompt-lens 128 1024 4032 --new-tokens 32 \
  --batch 1 8 --repeats 1 --out $O/gpu_gen.json > $O/bench.log 2>&1
echo "bench rc=$?" >> $O/bench.log; grep -E "B=|rc=" $O/bench.log
timeout 150 python3 benchmarks/bench_generation.py --device cuda --dtype bfloat16 --models dense mosa-hybrid \
  --prompt-lens 128 4032 --new-tokens 32 --batch 1 8 --repeats 1 --out $O/gpu_gen_bf16.json > $O/bench_bf16.log 2>&1
echo "bench rc=$?" >> $O/bench_bf16.log; grep -E "B=|rc=" $O/bench_bf16.log
cd $OUT && tar czf all.tar.gz x && rm -rf x
