#!/usr/bin/env bash
# v26 call 5 (nvidia-h200-x2): fused Adam/AdamW in the trainer (working tree) against the multi-tensor default (HEAD's src), default compile
set -u
O=$OUT/x; mkdir -p $O/logs
export PYTHONUNBUFFERED=1
mkdir -p /tmp/old && git archive HEAD src | tar -x -C /tmp/old
git log -1 --format=%H > $O/gpu.txt; git status --short >> $O/gpu.txt; nvidia-smi --query-gpu=name --format=csv,noheader >> $O/gpu.txt
for cfg in "mosa:--config tiny-mosa" "mosa17:--config tiny-mosa --set model.num_sparse_heads=17" "dense:--config tiny-dense"; do
  name=${cfg%%:*}; args=${cfg#*:}
  for v in fused foreach; do
    src=$PWD/src; [ $v = foreach ] && src=/tmp/old/src
    PYTHONPATH=$src timeout 120 python3 -m mosa_attention train $args --data _gpu_data/wiki8192 --steps 60 --batch-size 16 \
      --out /tmp/r/${name}_$v --set train.eval_every=0 --set train.save_every=0 --set train.log_every=10 \
      --set train.eval_windows=16 > $O/logs/${name}_$v.log 2>&1
    echo "${name}_$v 1 rc=$?" >> $O/rc.txt
    cp /tmp/r/${name}_$v/metrics.jsonl $O/${name}_$v.metrics.jsonl 2>/dev/null
  done
done
PYTHONPATH=$PWD/src python3 benchmarks/train_dist_summary.py $O --skip 20 > $O/summary.md 2>&1
cat $O/summary.md
PYTHONPATH=$PWD/src:$PWD/tests timeout 240 python3 -m pytest -q -n 8 -p no:cacheprovider tests/train/test_train_cuda.py tests/train/test_train_loop.py > $O/pytest_train.log 2>&1
echo "pytest rc=$?" >> $O/pytest_train.log; grep -v DEBUG $O/pytest_train.log | tail -4
cd $OUT && tar czf all.tar.gz x && rm -rf x
