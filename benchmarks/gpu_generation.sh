#!/usr/bin/env bash
# The GPU measurements of docs/generation.md in one go (one device call): decode speed and KV-cache bytes
# (bench_generation.py), then the routing study on the toy model (routing_study.sh).
#   bash benchmarks/gpu_generation.sh OUT [PREPARED_DATA]
# PREPARED_DATA: a prepared-data folder copied from this machine's cache (the GPU machine has no network).
# BENCH_S + STUDY_S (+ about 20 s of start-up) must stay well inside the call's limit: a call cut off by its
# limit brings back nothing. On the GPU machines `python3` is the interpreter that has torch.
set -u
OUT=${1:?usage: gpu_generation.sh OUT [PREPARED_DATA]}
DATA=${2:-wiki}
export PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PYTHON -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/gpu.txt" 2>&1
timeout -k 5 "${BENCH_S:-120}" $PYTHON benchmarks/bench_generation.py --device cuda --prompt-lens 128 1024 4032 \
  --new-tokens "${NEW:-32}" --batch 1 8 --repeats 1 --out "$OUT/gpu_gen.json" > "$OUT/gpu_gen.log" 2>&1
MOSA_REFERENCE=${MOSA_REFERENCE:-0} STEPS=${STEPS:-300} WINDOWS=${WINDOWS:-32} RUNS=${RUNS:-/tmp/mosa-routing-runs} \
  timeout -k 5 "${STUDY_S:-240}" bash benchmarks/routing_study.sh "$OUT" "$DATA" > "$OUT/study.log" 2>&1
cat "$OUT/gpu.txt" "$OUT/gpu_gen.log"
cat "$OUT/train_summary.txt" 2>/dev/null
