#!/usr/bin/env bash
# Causal routing on trained models: train the toy MoSA hybrid three ways (in parallel), then report, on the
# same validation windows, how threshold routing agrees with top-k and the perplexity under each rule, and
# generate a sample from each. Output: routing.jsonl (one report per line) and samples.txt in OUT.
#
#   bash benchmarks/routing_study.sh OUT [DATA]        # DATA: wiki (default) or a prepared-data folder
#   STEPS=300 WINDOWS=64 bash benchmarks/routing_study.sh results/routing
set -u
OUT=${1:?usage: routing_study.sh OUT [DATA]}
DATA=${2:-wiki}
STEPS=${STEPS:-300}
WINDOWS=${WINDOWS:-64}
RUNS=${RUNS:-/tmp/mosa-routing-runs}
EXTRA=${EXTRA:-}
mkdir -p "$OUT" "$RUNS"

# MOSA_REFERENCE=1: train with the plain-torch MoSA op even where the Triton kernels would be picked
MOSA=(${PYTHON:-python3} -m mosa_attention)
if [ "${MOSA_REFERENCE:-0}" = 1 ]; then
  MOSA=(${PYTHON:-python3} -c "import sys, mosa_attention.ops.mosa as m; m._triton_backend = lambda: None
from mosa_attention.cli import main; sys.exit(main(sys.argv[1:]))")
fi

train() {  # name, then --set overrides
  local name=$1; shift
  "${MOSA[@]}" train --data "$DATA" --steps "$STEPS" --out "$RUNS/$name" $EXTRA "$@" \
    > "$RUNS/train_$name.log" 2>&1
  echo "== $name: $(grep -a -o 'done: .*' "$RUNS/train_$name.log" | tail -1)" >> "$OUT/train_summary.txt"
}
train topk &
train aux --set model.router_aux_loss=0.1 &
train threshold --set model.routing=threshold --set model.router_aux_loss=0.1 &
wait

report() {  # name, calibrate windows
  "${MOSA[@]}" routing-report --checkpoint "$RUNS/$1" --windows "$WINDOWS" --calibrate "$2" --json \
    | ${PYTHON:-python3} -c "import json,sys; r=json.loads(sys.stdin.read()); r.update(run='$1', calibrate_windows=$2); print(json.dumps(r))" \
    >> "$OUT/routing.jsonl"
}
for run in topk aux threshold; do
  report $run 0 &
  report $run 32 &
done
wait

for run in topk aux threshold; do
  calib=$([ $run = topk ] && echo 32 || echo 0)
  { echo "== $run (calibrate $calib)"
    "${MOSA[@]}" generate --checkpoint "$RUNS/$run" --prompt "The history of the" \
      --max-new-tokens 60 --seed 0 --temperature 0.8 --top-k 50 --calibrate $calib --stats 2>&1
    echo; } >> "$OUT/samples.txt"
done
cat "$OUT/train_summary.txt"
