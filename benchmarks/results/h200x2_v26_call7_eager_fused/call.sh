#!/usr/bin/env bash
# v26 call 7: --compile false (eager) with the fused optimizer, three models
set -u
O=$OUT/x; mkdir -p $O/logs
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
for cfg in "dense:--config tiny-dense" "mosa17:--config tiny-mosa --set model.num_sparse_heads=17" "mosa:--config tiny-mosa"; do
  name=${cfg%%:*}; args=${cfg#*:}
  timeout 40 python3 -m mosa_attention train $args --data _gpu_data/wiki8192 --steps 60 --batch-size 16 --compile false \
    --out /tmp/r7/${name}_eager --set train.eval_every=0 --set train.save_every=0 --set train.log_every=10 \
    --set train.eval_windows=16 > $O/logs/${name}_eager.log 2>&1
  echo "${name}_eager 1 rc=$?" >> $O/rc.txt
  cp /tmp/r7/${name}_eager/metrics.jsonl $O/${name}_eager.metrics.jsonl 2>/dev/null
done
python3 benchmarks/train_dist_summary.py $O --skip 20 > $O/summary.md 2>&1; cat $O/summary.md
cd $OUT && tar czf all.tar.gz x && rm -rf x
