#!/usr/bin/env bash
# `mosa train` end to end on a GPU under the default (CUDA graphs) for the tiny preset's three models, 60 steps of
# B = 16, and the summary of ms per step after step 20 (benchmarks/train_dist_summary.py). Needs the prepared
# corpus at _gpu_data/wiki8192 (`mosa train --config tiny-mosa --prepare-only` on the CPU machine, folder copied).
# Usage on the device machine: bash benchmarks/gpu_train_table.sh $OUT/x
set -u
O=${1:?output folder}; mkdir -p $O/logs
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
git log -1 --format=%H > $O/gpu.txt; nvidia-smi --query-gpu=name --format=csv,noheader >> $O/gpu.txt
for cfg in "dense:--config tiny-dense" "mosa17:--config tiny-mosa --set model.num_sparse_heads=17" "mosa:--config tiny-mosa"; do
  name=${cfg%%:*}; args=${cfg#*:}
  timeout ${STEP_TIMEOUT:-110} python3 -m mosa_attention train $args --data _gpu_data/wiki8192 --steps 60 --batch-size 16 \
    --out /tmp/r/$name --set train.eval_every=0 --set train.save_every=0 --set train.log_every=10 \
    --set train.eval_windows=16 > $O/logs/$name.log 2>&1
  echo "$name 1 rc=$?" >> $O/rc.txt
  cp /tmp/r/$name/metrics.jsonl $O/$name.metrics.jsonl 2>/dev/null
done
python3 benchmarks/train_dist_summary.py $O --skip 20 > $O/summary.md 2>&1
cat $O/rc.txt $O/summary.md
