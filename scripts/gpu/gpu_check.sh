#!/usr/bin/env bash
# One NVIDIA GPU node, often without internet access: one deadline-driven run of a few minutes that keeps
# every row it measures and cannot pass CPU numbers off as GPU numbers.
#
#   python scripts/gpu/gpu_bundle.py                  # where pip and the CIFAR-10 npz are: .whl/ and .gpu_data/
#   bash scripts/gpu/gpu_check.sh --out=/tmp/gpu_check  # on the GPU node, .whl and .gpu_data beside the tree
#   bash scripts/gpu/gpu_check.sh --smoke             # every stage at tiny sizes on the CPU: checks the script
#
# Options (each overrides its environment variable): --deadline_s=S (GPU_CHECK_DEADLINE_S; 480, smoke
# 330), --out=DIR (OUT; /tmp/gpu_check), --data=DIR (GPU_CHECK_DATA; .gpu_data), --work=DIR
# (GPU_CHECK_WORK; /tmp/gpu_check_work), --smoke (GPU_CHECK_SMOKE=1).
#
# Stages, in order of value, each bounded by `timeout` of the time left before the deadline;
# scripts/gpu/gpu_stages.py runs each one:
#   preflight      versions, devices, settings. JAX's backend must be GPU_CHECK_BACKEND's (gpu; smoke:
#                  cpu; JAX_PLATFORMS=cuda, smoke cpu), else the script stops with one line before
#                  measuring anything. torch without CUDA skips the torch stages.
#   correctness    8 train steps and an eval of a small ResNet9 at precision=highest against the losses
#                  computed on the CPU (scripts/gpu/gpu_reference_losses.json, rtol 1e-4: see that file),
#                  then at the default precision (TF32 on Hopper), reported only.
#   jax_step       the trainer's compiled step (scripts/benchmark.py step, JAX only) for float32/TF32 and
#                  bfloat16 at batch 128 and 512: compile seconds, train and eval images/s, peak memory.
#   seeds          k = 1 and 4 seeds in one vmap-ed run (scripts/benchmark.py seeds, synthetic data).
#   train          `cifar-jax`, one-cycle, on the real images of .gpu_data (GPU_CHECK_DATA), as many
#                  epochs as the time left allows (estimated from jax_step), accuracy every epoch.
#   torch_eager    benchmark.py step's torch at its best: channels_last, cudnn.benchmark, same cells.
#   torch_compile  the same under torch.compile, if time remains.
# Each row goes to $OUT/results.jsonl the moment it is measured; a stage that fails, times out or finds too
# little time adds a row saying so and the script goes on. On exit (trap) $OUT/summary.md is written from
# results.jsonl and printed; $OUT/gpu_check.log holds every stage's output. Three files, at the top of
# $OUT. Workdirs go to GPU_CHECK_WORK (/tmp/gpu_check_work), JAX's persistent compilation cache to
# JAX_COMPILATION_CACHE_DIR (/tmp/gpu_check_jax_cache).
#
# Needs JAX (CUDA), flax, optax, orbax, Pillow and torch. ml_collections, if missing, is installed from
# .whl/ (python scripts/gpu/gpu_bundle.py makes it) into the work folder; without it the trainer's stages fail.
set -uo pipefail
for arg in "$@"; do
  case $arg in
    --deadline_s=*) GPU_CHECK_DEADLINE_S=${arg#*=} ;;
    --out=*) OUT=$(realpath -m "${arg#*=}") ;;
    --data=*) GPU_CHECK_DATA=$(realpath -m "${arg#*=}") ;;
    --work=*) GPU_CHECK_WORK=$(realpath -m "${arg#*=}") ;;
    --smoke) GPU_CHECK_SMOKE=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $arg (--deadline_s=S --out=DIR --data=DIR --work=DIR --smoke)" >&2
       exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
if [[ -n "${GPU_CHECK_SMOKE:-}" ]]; then
  SMOKE=1; BACKEND=${GPU_CHECK_BACKEND:-cpu}; DEADLINE_S=${GPU_CHECK_DEADLINE_S:-330}
  export JAX_PLATFORMS=${GPU_CHECK_JAX_PLATFORMS:-cpu}
  MODEL=resnet9; WIDTH=0.125; DTYPES=float32,bfloat16; BATCHES=16; WINDOWS=2; STEPS=2
  SEEDS=1,2; SEED_SIZE=128; SEED_BATCH=32; TRAIN_BATCH=32; EVAL_SIZE=64; MAX_EPOCHS=2
  COMPILE_DTYPES=float32; COMPILE_BATCHES=16; MIN_CELL=10; GUESS_IPS=200; GUESS_START=40
  SHAKE_PAIRS=resnet9:0.125,shake_shake:4; SHAKE_BATCH=8
else
  SMOKE=; BACKEND=${GPU_CHECK_BACKEND:-gpu}; DEADLINE_S=${GPU_CHECK_DEADLINE_S:-480}
  export JAX_PLATFORMS=${GPU_CHECK_JAX_PLATFORMS:-cuda}
  MODEL=resnet18; WIDTH=1; DTYPES=float32,bfloat16; BATCHES=128,512; WINDOWS=3; STEPS=20
  SEEDS=1,4; SEED_SIZE=12800; SEED_BATCH=128; TRAIN_BATCH=128; EVAL_SIZE=5000; MAX_EPOCHS=20
  COMPILE_DTYPES=float32,bfloat16; COMPILE_BATCHES=128; MIN_CELL=30; GUESS_IPS=5000; GUESS_START=90
  SHAKE_PAIRS=shake_shake:96,resnet18:1; SHAKE_BATCH=128
fi
# The real images; the smoke makes a few of its own (same format and loader) unless GPU_CHECK_DATA is set.
DATA=${GPU_CHECK_DATA:-$ROOT/.gpu_data}
[[ -n $SMOKE && -z "${GPU_CHECK_DATA:-}" ]] && DATA=$WORK/data
START=$(date +%s)
DEADLINE=$((START + DEADLINE_S))
RESERVE=8  # seconds kept for the summary
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_check_jax_cache}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT" "$JAX_COMPILATION_CACHE_DIR"
rm -rf "$WORK" "$OUT/results.jsonl" "$OUT/summary.md" "$OUT/gpu_check.log"
mkdir -p "$WORK"
LOG=$OUT/gpu_check.log
STOPPED=

finish() {
  local rc=$?
  trap - EXIT
  "$PY" scripts/gpu/gpu_stages.py summary --out="$OUT" --work="$WORK" --stopped="$STOPPED" --started="$START" \
    --deadline_s="$DEADLINE_S" --exit_status="$rc" ${SMOKE:+--smoke} >>"$LOG" 2>&1 \
    || echo "gpu_check: the summary failed (see $LOG)"
  [[ -z $STOPPED && -f "$OUT/summary.md" ]] && { echo; cat "$OUT/summary.md"; }
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

say() { echo "$*" | tee -a "$LOG"; }

record() {  # record STAGE STATUS SECONDS RC NOTE: the stage's end row
  "$PY" scripts/gpu/gpu_stages.py record --out="$OUT" --work="$WORK" --stage_name="$1" --status="$2" \
    --seconds="$3" --rc="$4" --note="$5" >>"$LOG" 2>&1
}

# run_stage NAME MIN_S CAP_S KEEP_S ARGS...: gpu_stages.py NAME ARGS with at most CAP_S seconds, leaving
# KEEP_S (and the summary's) before the deadline; skipped (a row) when fewer than MIN_S are left.
run_stage() {
  local name=$1 min=$2 cap=$3 keep=$4 stage=$1
  shift 4
  [[ $name == torch_* ]] && stage=torch
  local now left budget t0 rc status note
  now=$(date +%s)
  left=$((DEADLINE - RESERVE - keep - now))
  budget=$((left < cap ? left : cap))
  if ((budget < min)); then
    say "== $name: skipped, ${budget} s left of the ${min} s it needs"
    record "$name" skipped 0 0 "${budget} s left, needs ${min} s"
    return 0
  fi
  say "== $name (up to ${budget} s; $((DEADLINE - now)) s to the deadline)"
  t0=$(date +%s)
  timeout -k 5 "$budget" "$PY" scripts/gpu/gpu_stages.py "$stage" --out="$OUT" --work="$WORK" \
    --deadline=$((now + budget - 4)) --expect="$BACKEND" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    75) status=skipped ;;  # gpu_stages.SKIPPED: too little time, or nothing to run on
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  note=
  [[ $status != ok ]] && note=$(grep -v '^\s*$' "$WORK/$name.out" | tail -n 1 | sed 's/^gpu_check: //' | cut -c1-300)
  record "$name" "$status" $(($(date +%s) - t0)) "$rc" "$note"
  say "== $name: $status"
}

say "gpu_check: backend $BACKEND (JAX_PLATFORMS=$JAX_PLATFORMS), deadline ${DEADLINE_S} s, out $OUT, work $WORK"
if ! "$PY" -c 'import ml_collections' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH=$WORK/site:$PYTHONPATH
  fi
  "$PY" -c 'import ml_collections' 2>/dev/null \
    || say "gpu_check: ml_collections is missing and .whl/ holds no wheel of it (python scripts/gpu/gpu_bundle.py)"
fi

# Preflight: a wrong backend stops everything, with one line and no row.
say "== preflight"
t0=$(date +%s)
limit=$((DEADLINE - RESERVE - t0))
((limit > 90)) && limit=90
timeout -k 5 "$limit" "$PY" scripts/gpu/gpu_stages.py preflight --out="$OUT" --work="$WORK" --expect="$BACKEND" \
  --data="$DATA" >"$WORK/preflight.out" 2>&1
rc=$?
cat "$WORK/preflight.out" >>"$LOG"
if ((rc != 0)); then
  STOPPED=$(grep '^gpu_check:' "$WORK/preflight.out" | tail -n 1)
  ((rc == 124 || rc == 137)) && STOPPED=${STOPPED:-"gpu_check: the preflight ran past ${limit} s"}
  STOPPED=${STOPPED:-"gpu_check: the preflight failed (exit $rc): $(tail -n 1 "$WORK/preflight.out")"}
  rm -f "$OUT/results.jsonl"
  echo "$STOPPED" >&2
  exit 3
fi
cat "$WORK/preflight.out"
record preflight ok $(($(date +%s) - t0)) 0 ""

if [[ -n $SMOKE && -z "${GPU_CHECK_DATA:-}" ]]; then  # 320 synthetic images in the bundle's format
  timeout -k 2 $((DEADLINE - RESERVE - $(date +%s) > 1 ? DEADLINE - RESERVE - $(date +%s) : 1)) \
    "$PY" scripts/gpu/gpu_bundle.py --no_wheels --synthetic=320 --data_dir="$DATA" --budget_mib=2 --workers=1 \
    >>"$LOG" 2>&1 || say "gpu_check: the smoke's image bundle failed (see $LOG)"
fi

run_stage correctness 15 120 0
run_stage jax_step 40 260 0 --model="$MODEL" --width="$WIDTH" --dtypes="$DTYPES" --batches="$BATCHES" \
  --windows="$WINDOWS" --steps="$STEPS" --min_cell_s="$MIN_CELL" --cell_cap_s=100
run_stage seeds 30 120 0 --model="$MODEL" --width="$WIDTH" --seeds="$SEEDS" --train_size="$SEED_SIZE" \
  --batch="$SEED_BATCH"
run_stage shake 30 90 0 --pairs="$SHAKE_PAIRS" --batch="$SHAKE_BATCH" --windows=3 --steps="$STEPS"
run_stage train 40 170 30 --data="$DATA" --model="$MODEL" --width="$WIDTH" --batch="$TRAIN_BATCH" \
  --eval_size="$EVAL_SIZE" --max_epochs="$MAX_EPOCHS" --guess_ips="$GUESS_IPS" --guess_start_s="$GUESS_START"
run_stage torch_eager 20 120 0 --mode=channels_last --model="$MODEL" --width="$WIDTH" --dtypes="$DTYPES" \
  --batches="$BATCHES" --windows="$WINDOWS" --steps="$STEPS" --min_cell_s="$MIN_CELL" --cell_cap_s=60
run_stage torch_compile 40 600 0 --mode=compile_channels_last --model="$MODEL" --width="$WIDTH" \
  --dtypes="$COMPILE_DTYPES" --batches="$COMPILE_BATCHES" --windows="$WINDOWS" --steps="$STEPS" \
  --min_cell_s=40 --cell_cap_s=150
exit 0
