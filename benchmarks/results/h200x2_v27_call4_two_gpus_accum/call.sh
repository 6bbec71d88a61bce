#!/usr/bin/env bash
# v27 call 4 (nvidia-h200-x2): two GPUs with CUDA graphs against one: float32 and bf16 averages, and two
# micro-batches per process (gradient accumulation under graphs with the all-reduce)
set -u
O=$OUT/x; mkdir -p $O
git log -1 --format=%H > $O/gpu.txt; nvidia-smi --query-gpu=name --format=csv,noheader >> $O/gpu.txt
PYTHONPATH=$PWD/src:$PWD/tests timeout 400 python3 -m pytest -q -n 3 -p no:cacheprovider -rA \
  tests/train/test_train_cuda.py -k "two_gpus or gradient_accumulation" > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; grep -v DEBUG $O/pytest.log | grep -E "PASSED|FAILED|ERROR|passed|failed|rc=|^E " | tail -30 > $O/pytest_summary.log
tail -6 $O/pytest_summary.log
cd $OUT && tar czf all.tar.gz x && rm -rf x
