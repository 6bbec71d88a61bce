#!/usr/bin/env bash
# v27 call 2 (nvidia-h200-x2): the trainer's GPU tests on the final code (deterministic runs under the default
# graphs, resumed in fresh processes; gradient accumulation; two GPUs with float32 and bf16 gradient averages)
set -u
O=$OUT/x; mkdir -p $O
git log -1 --format=%H > $O/gpu.txt; git status --short | grep -v _gpu_data >> $O/gpu.txt
nvidia-smi --query-gpu=name --format=csv,noheader >> $O/gpu.txt
PYTHONPATH=$PWD/src:$PWD/tests timeout 500 python3 -m pytest -q -n 8 -p no:cacheprovider -rA --durations=8 \
  tests/train/test_train_cuda.py > $O/pytest.log 2>&1
echo "rc=$?" >> $O/pytest.log; grep -v DEBUG $O/pytest.log | grep -E "PASSED|FAILED|ERROR|passed|failed|rc=" | tail -50 > $O/pytest_summary.log
tail -3 $O/pytest_summary.log
cd $OUT && tar czf all.tar.gz x && rm -rf x
