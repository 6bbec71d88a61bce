#!/usr/bin/env bash
# v27 call 3 (nvidia-h200-x2): two GPUs under CUDA graphs, gradients averaged in float32 against bf16
# (train.grad_reduce_dtype), the FLOP-matched and the perplexity-matched hybrids, global batch 32, 60 steps
set -u
O=$OUT/x; mkdir -p $O
STEPS=60 BATCH=32 RUN_S=85 bash benchmarks/gpu_train_dist.sh $O _gpu_data/wiki8192 \
  mosa_graphs mosa_graphs_bf16 mosa17_graphs mosa17_graphs_bf16 > /dev/null 2>&1
python3 benchmarks/train_dist_summary.py $O --skip 20 > $O/summary_skip20.md 2>&1
cat $O/rc.txt $O/summary_skip20.md
cd $OUT && tar czf all.tar.gz x && rm -rf x
