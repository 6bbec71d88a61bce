#!/usr/bin/env bash
# v26 call 6: fused Adam/AdamW (working tree) against the multi-tensor default (the same tree, optim.py of 2e74a4a), default compile ('auto')
set -u
O=$OUT/x; mkdir -p $O/logs
export PYTHONUNBUFFERED=1
mkdir -p /tmp/old && cp -r src /tmp/old/ && git show 2e74a4a:src/mosa_attention/train/optim.py > /tmp/old/src/mosa_attention/train/optim.py
for cfg in "mosa:--config tiny-mosa" "mosa17:--config tiny-mosa --set model.num_sparse_heads=17"; do
  name=${cfg%%:*}; args=${cfg#*:}
  for v in foreach fused; do
    src=$PWD/src; [ $v = foreach ] && src=/tmp/old/src
    PYTHONPATH=$src timeout 100 python3 -m mosa_attention train $args --data _gpu_data/wiki8192 --steps 60 --batch-size 16 \
      --out /tmp/r6/${name}_$v --set train.eval_every=0 --set train.save_every=0 --set train.log_every=10 \
      --set train.eval_windows=16 > $O/logs/${name}_$v.log 2>&1
    echo "${name}_$v 1 rc=$?" >> $O/rc.txt
    cp /tmp/r6/${name}_$v/metrics.jsonl $O/${name}_$v.metrics.jsonl 2>/dev/null
  done
done
PYTHONPATH=$PWD/src python3 benchmarks/train_dist_summary.py $O --skip 20 > $O/summary.md 2>&1
cat $O/summary.md; grep -h "compiled" $O/logs/*.log | cut -c1-60
cd $OUT && tar czf all.tar.gz x && rm -rf x
