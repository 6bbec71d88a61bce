#!/usr/bin/env bash
# v26 call 3 (nvidia-h200-x2): the trainer's default (train.compile='auto') against --compile false, three models; GPU train tests
set -u
O=$OUT/x; mkdir -p $O
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
git log -1 --format=%H > $O/gpu.txt; nvidia-smi --query-gpu=name --format=csv,noheader >> $O/gpu.txt
for cfg in "mosa17:--config tiny-mosa --set model.num_sparse_heads=17" "dense:--config tiny-dense" "mosa:--config tiny-mosa"; do
  name=${cfg%%:*}; args=${cfg#*:}
  for mode in auto false; do
    extra=""; [ $mode = false ] && extra="--compile false"
    timeout 120 python3 -m mosa_attention train $args --data _gpu_data/wiki8192 --steps 60 --batch-size 16 \
      --out /tmp/r/${name}_$mode --set train.eval_every=0 --set train.save_every=0 --set train.log_every=10 \
      --set train.eval_windows=16 $extra > $O/${name}_$mode.log 2>&1
    echo "${name}_$mode 1 rc=$?" >> $O/rc.txt
    cp /tmp/r/${name}_$mode/metrics.jsonl $O/${name}_$mode.metrics.jsonl 2>/dev/null
  done
done
python3 benchmarks/train_dist_summary.py $O --skip 20 > $O/summary.md 2>&1
cat $O/summary.md
timeout 230 python3 -m pytest -q -n 6 -p no:cacheprovider tests/train/test_train_cuda.py tests/train/test_train_config.py > $O/pytest_train_cuda.log 2>&1
tail -5 $O/pytest_train_cuda.log
mkdir -p $O/logs && mv $O/*.log $O/logs/ 2>/dev/null; mv $O/logs/pytest_train_cuda.log $O/ 
cd $OUT && tar czf all.tar.gz x && rm -rf x
