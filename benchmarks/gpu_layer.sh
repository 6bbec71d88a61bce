#!/usr/bin/env bash
# The layer measurements of benchmarks/RESULTS.md on a GPU in one device call, each stage under its own time
# limit (a call cut off by its limit brings nothing back), logs and JSON in OUT.
#   bash benchmarks/gpu_layer.sh OUT [STAGES]
#   STAGES: any of pytest parts variants ncu local check tune checktune topk bf16+FLAGS ac+FLAGS profile profile+FLAGS timeline timeline+FLAGS profilewide bf16wide mosabench streams bf16serial autocastserial profiledet hostprof bf16 bf16det bf16atomic bf16u bf16d autocast autocastdet sweep grid
# (…det: our layers with deterministic=True, …atomic: deterministic=False; the rest deterministic=None)
set -u
OUT=${1:?usage: gpu_layer.sh OUT [STAGES]}
STAGES=${2:-check tune profile bf16}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  echo "commit ${COMMIT:-$(git log -1 --format='%H %cd' 2>/dev/null) (git head of the device copy, which may be stale: pass COMMIT=<hash> written out where the command is composed)}"; } > "$OUT/gpu.txt" 2>&1
B=benchmarks/bench_layer.py
for s in $STAGES; do
  t0=$SECONDS
  case $s in
    check)    timeout -k 5 "${CHECK_S:-240}" $PY $B --check --no-bench ${CHECK_FLAGS:-} --out "$OUT/check" ;;
    checktune) timeout -k 5 "${CHECK_S:-420}" $PY $B --check --tune --no-bench --out "$OUT/checktune" ;;
    profilewide) timeout -k 5 "${PROFILE_S:-60}" $PY $B --profile --no-bench --mode bf16 --wide-atomics --out "$OUT/profilewide" ;;
    streams)  timeout -k 5 "${CHECK_S:-120}" $PY $B --check-streams --no-bench --out "$OUT/streams" ;;
    bf16serial) timeout -k 5 "${BF16_S:-100}" $PY $B --mode bf16 --no-sweep --serial-heads --out "$OUT/bf16serial" ;;
    autocastserial) timeout -k 5 "${AUTOCAST_S:-150}" $PY $B --no-sweep --serial-heads --out "$OUT/autocastserial" ;;
    bf16wide) timeout -k 5 "${BF16_S:-100}" $PY $B --mode bf16 --no-sweep --wide-atomics --out "$OUT/bf16wide" ;;
    mosabench) { timeout -k 5 "${MOSABENCH_S:-120}" $PY -m mosa_attention.cli bench --official .official --json "$OUT/mosabench.json" &&
                 timeout -k 5 "${MOSABENCH_S:-120}" $PY -m mosa_attention.cli bench --mosa-heads 505 --sparsity 64 --hybrid-dense-heads 4 --json "$OUT/mosabench_t3.json"; } ;;
    local)    timeout -k 5 "${LOCAL_S:-150}" $PY benchmarks/bench_local.py --out "$OUT/local" ;;
    pytest)   # the whole test suite on the GPU: kernel tests compiled there, the trainer's GPU tests (needs the
              # project's dependencies, e.g. wheels unpacked on PYTHONPATH; pytest-xdist for -n)
              timeout -k 5 "${PYTEST_S:-420}" $PY -m pytest -q -rfEs -n "${PYTEST_N:-12}" -p no:cacheprovider tests \
                > "$OUT/pytest.log" 2>&1; tail -3 "$OUT/pytest.log" ;;
    parts)    # each part of a MoSA step by cuBLAS / SDPA / plain atomics beside our kernels (bench_parts.py)
              for c in ${PARTS_CASES:-t3 t1}; do timeout -k 5 "${PARTS_S:-120}" $PY benchmarks/bench_parts.py --case "$c" --out "$OUT/parts"; done ;;
    variants) # kernel settings timed in the layers they serve, one CUDA graph each, alternating (bench_variants.py)
              timeout -k 5 "${VARIANTS_S:-200}" $PY benchmarks/bench_variants.py --cases "${VARIANT_CASES:-t2,t1}" \
                --variants "${VARIANTS:-default,attn_inside,attn_outside}" --rounds "${ROUNDS:-7}" --out "$OUT/variants" ;;
    topk)     timeout -k 5 "${TOPK_S:-120}" $PY $B --tune-topk --no-bench --out "$OUT/topk" ;;
    bf16+*)   # bf16 timings of t1-t3 with the flags after "bf16+", "+" for spaces (A/B runs in one call)
              flags=${s#bf16+}
              timeout -k 5 "${BF16_S:-100}" $PY $B --mode bf16 --no-sweep --cases "${CASES:-t1,t2,t3}" ${flags//+/ } \
                --out "$OUT/${s//[^A-Za-z0-9_.-]/_}" ;;
    ac+*)     # the same under autocast over float32 parameters (no official column)
              flags=${s#ac+}
              timeout -k 5 "${AUTOCAST_S:-150}" $PY $B --no-sweep --cases "${CASES:-t1,t2,t3}" ${flags//+/ } \
                --out "$OUT/${s//[^A-Za-z0-9_.-]/_}" ;;
    tune)     timeout -k 5 "${TUNE_S:-200}" $PY $B --tune --no-bench ${TUNE_CASES:+--cases $TUNE_CASES} --out "$OUT/tune" ;;
    profile)  timeout -k 5 "${PROFILE_S:-60}" $PY $B --profile --no-bench --mode bf16 --out "$OUT/profile" ;;
    profile+*) flags=${s#profile+}
              timeout -k 5 "${PROFILE_S:-60}" $PY $B --profile --no-bench --mode bf16 ${flags//+/ } \
                --out "$OUT/${s//[^A-Za-z0-9_.-]/_}" ;;
    ncu)      # hardware counters of the MoSA kernels (Nsight Compute; needs a runtime that exposes them)
              NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
              N="$NCU --clock-control none --kernel-name regex:^_ --csv"
              SEC="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats"
              for run in ${NCU_RUNS:-t1:details t3:details t1:raw t3:raw}; do
                IFS=: read -r case page flag <<< "$run"
                f="$OUT/ncu_${case}_${page}${flag:+_${flag//[^A-Za-z0-9]/}}"
                if [ "$page" = details ]; then what="--page details $SEC"
                else what="--page raw --metrics $($PY benchmarks/ncu_kernels.py --raw-metrics)"; fi
                timeout -k 5 "${NCU_S:-150}" $N $what $PY benchmarks/ncu_kernels.py --case "$case" $flag > "$f.csv" 2> "$f.err"
                echo "== $run: exit $?"; $PY benchmarks/ncu_kernels.py --parse "$f.csv" | tee "$f.md"
              done ;;
    timeline) timeout -k 5 "${PROFILE_S:-60}" $PY $B --timeline --no-bench --mode bf16 --out "$OUT/timeline" ;;
    timeline+*) flags=${s#timeline+}
              timeout -k 5 "${PROFILE_S:-60}" $PY $B --timeline --no-bench --mode bf16 ${flags//+/ } \
                --out "$OUT/${s//[^A-Za-z0-9_.-]/_}" ;;
    hostprof) timeout -k 5 "${PROFILE_S:-60}" $PY $B --host-profile --no-bench --out "$OUT/hostprof" ;;
    profiledet) timeout -k 5 "${PROFILE_S:-60}" $PY $B --profile --no-bench --mode bf16 --scatter rows --out "$OUT/profiledet" ;;
    bf16)     timeout -k 5 "${BF16_S:-100}" $PY $B --mode bf16 --no-sweep --out "$OUT/bf16" ;;
    bf16det)  timeout -k 5 "${BF16_S:-100}" $PY $B --mode bf16 --no-sweep --scatter rows --out "$OUT/bf16det" ;;
    bf16d)    timeout -k 5 "${BF16_S:-100}" $PY $B --mode bf16 --no-sweep --dense-torch --out "$OUT/bf16d" ;;
    bf16atomic) timeout -k 5 "${BF16_S:-100}" $PY $B --mode bf16 --no-sweep --scatter atomic --out "$OUT/bf16atomic" ;;
    bf16u)    timeout -k 5 "${BF16_S:-100}" $PY $B --mode bf16 --no-sweep --unfused --out "$OUT/bf16u" ;;
    autocast) timeout -k 5 "${AUTOCAST_S:-150}" $PY $B --official .official --no-sweep --out "$OUT/autocast" ;;
    autocastdet) timeout -k 5 "${AUTOCAST_S:-150}" $PY $B --no-sweep --scatter rows --out "$OUT/autocastdet" ;;
    grid)     timeout -k 5 "${GRID_S:-150}" $PY $B --official .official --no-bench --grid --out "$OUT/grid" ;;
    sweep)    timeout -k 5 "${SWEEP_S:-150}" $PY $B --official .official --sweep-T 1024,4096,16384,65536 --out "$OUT/sweep" ;;
  esac > "$OUT/${s//[^A-Za-z0-9_.-]/_}.log" 2>&1
  echo "== stage $s: exit $? ($((SECONDS - t0)) s)" >> "$OUT/stages.txt"
done
# everything in one file as well (the device brings back at most 8 files)
tar -czf "$OUT/all.tar.gz" -C "$OUT" --exclude all.tar.gz . 2>/dev/null
cat "$OUT/gpu.txt" "$OUT/stages.txt"
for s in $STAGES; do echo "== $s"; grep -E "PASS|FAIL|best|failed|Error|error|f\+b|fwd " "$OUT/${s//[^A-Za-z0-9_.-]/_}.log" | tail -40; done
