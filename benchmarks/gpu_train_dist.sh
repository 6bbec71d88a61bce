#!/usr/bin/env bash
# Training on several GPUs of one host, end to end through `mosa train` under torchrun: CUDA graphs
# (`--compile reduce-overhead`, the trainer's default on GPUs since v26, whose processes average their
# gradients after the backward: train.distributed="allreduce") against DDP eagerly (`--compile false`) and DDP
# under plain torch.compile, for the dense model and the MoSA hybrids of the tiny preset; one process with CUDA
# graphs on the same global batch as the reference for the losses. Each run's metrics.jsonl and log land in OUT; summary.json and summary.md compare them
# (benchmarks/train_dist_summary.py).
#   bash benchmarks/gpu_train_dist.sh OUT DATA [RUN ...]
# DATA: a prepared-data folder of the tiny preset's vocabulary (8192), copied from this machine's cache (the
# GPU machines have no network). RUN: names from the table below (default: ORDER). Each run has RUN_S seconds;
# on the GPU machines `python3` is the interpreter that has torch. STEPS, BATCH (global), NP: the runs' sizes;
# SRC: the source tree to run (default ./src; for an A/B against another version's copy).
set -u
OUT=${1:?usage: gpu_train_dist.sh OUT DATA [RUN ...]}
DATA=${2:?usage: gpu_train_dist.sh OUT DATA [RUN ...]}
shift 2
export PYTHON=${PYTHON:-python3}
export PYTHONPATH=${SRC:-$PWD/src}${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1  # SRC: another copy of src/
STEPS=${STEPS:-40} BATCH=${BATCH:-32} NP=${NP:-2} RUNS=${RUNS:-/tmp/mosa-dist-runs}
mkdir -p "$OUT" "$RUNS"
MOSA17=(--config tiny-mosa --set model.num_sparse_heads=17)
declare -A ARGS=(
  [mosa17_graphs]="$NP ${MOSA17[*]} --compile reduce-overhead"
  [mosa17_graphs_1p]="1 ${MOSA17[*]} --compile reduce-overhead"
  [mosa17_eager_1p]="1 ${MOSA17[*]} --compile false"
  [dense_graphs_1p]="1 --config tiny-dense --compile reduce-overhead"
  [mosa17_ddp]="$NP ${MOSA17[*]} --compile false"
  [mosa17_ddp_compile]="$NP ${MOSA17[*]} --compile"
  [dense_graphs]="$NP --config tiny-dense --compile reduce-overhead"
  [dense_ddp]="$NP --config tiny-dense --compile false"
  [mosa_graphs]="$NP --config tiny-mosa --compile reduce-overhead"
  [mosa_ddp]="$NP --config tiny-mosa --compile false"
  [mosa_graphs_1p]="1 --config tiny-mosa --compile reduce-overhead"
  [mosa17_graphs_bf16]="$NP ${MOSA17[*]} --compile reduce-overhead --grad-reduce-dtype bfloat16"
  [dense_graphs_bf16]="$NP --config tiny-dense --compile reduce-overhead --grad-reduce-dtype bfloat16"
  [mosa_graphs_bf16]="$NP --config tiny-mosa --compile reduce-overhead --grad-reduce-dtype bfloat16"
)
ORDER=(mosa17_graphs mosa17_graphs_1p mosa17_ddp dense_graphs dense_ddp mosa_graphs mosa_ddp mosa17_ddp_compile)
[ $# -gt 0 ] && ORDER=("$@")
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PYTHON -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/gpu.txt" 2>&1
for name in "${ORDER[@]}"; do
  read -r nproc rest <<< "${ARGS[$name]}"
  rm -rf "${RUNS:?}/$name"
  # shellcheck disable=SC2086
  timeout -k 5 "${RUN_S:-100}" $PYTHON -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
    -m mosa_attention train --data "$DATA" --steps "$STEPS" --batch-size "$BATCH" --out "$RUNS/$name" \
    --set train.eval_every=0 --set train.save_every=0 --set train.log_every=5 --set train.eval_windows=16 \
    $rest > "$OUT/$name.log" 2>&1
  echo "$name $nproc rc=$?" >> "$OUT/rc.txt"
  cp "$RUNS/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
done
$PYTHON benchmarks/train_dist_summary.py "$OUT" > "$OUT/summary.md" 2>&1
cat "$OUT/gpu.txt" "$OUT/rc.txt" "$OUT/summary.md"
