#!/usr/bin/env bash
# One NVIDIA GPU (sized for an H200) in under 8 minutes: prints a table last.
#   1. ResNet18 (widths 64-512) train and eval throughput: JAX float32 and bfloat16 vs torch eager and
#      torch.compile, at batch 128 and 512 (scripts/benchmark.py, alternating windows in one run each).
#   2. A short `cifar-jax` training run on synthetic data with the default pipeline (on-device shuffle,
#      crop and flip), its logged images/s and accuracy.
#   3. k = 1, 2, 4 seeds in one run (scripts/bench_seeds.py), when that script is present.
#
#   bash scripts/gpu_check.sh                      # results in ${OUT:-/tmp/gpu_check}
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh    # tiny sizes: checks the script itself on a CPU
#
# Needs JAX (CUDA), flax, optax, orbax and torch. ml_collections and tensorboardX, if missing, are
# installed from wheels in .whl/ (make them where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl ml_collections tensorboardX
# ), else the script stops at once and says so. Each step has its own time limit, so a slow step costs
# its row, not the table.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

if ! "$PY" -c 'import ml_collections, tensorboardX' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c 'import ml_collections' 2>/dev/null || {
    echo 'gpu_check: ml_collections is missing; put its wheel in .whl/ (see the header)' >&2; exit 2; }
fi
"$PY" -c 'import jax; print("JAX", jax.__version__, jax.devices())'
nvidia-smi -L 2>/dev/null || true

if [[ -n "${GPU_CHECK_SMOKE:-}" ]]; then
  WIDTH=0.125; BATCHES="16"; DTYPES="float32"; MODES=eager; WINDOWS=2; STEPS=2; LIMIT=300
  TRAIN_SIZE=256; EPOCHS=2; SEEDS="1,2"
else
  WIDTH=1; BATCHES="128 512"; DTYPES="float32 bfloat16"; MODES=eager,compile; WINDOWS=3; STEPS=20
  LIMIT=110; TRAIN_SIZE=25600; EPOCHS=3; SEEDS="1,2,4"
fi

for dtype in $DTYPES; do
  for batch in $BATCHES; do
    echo "== benchmark: ResNet18 width $WIDTH, batch $batch, $dtype"
    timeout "$LIMIT" "$PY" scripts/benchmark.py --width="$WIDTH" --batch="$batch" --dtype="$dtype" \
      --torch_modes="$MODES" --windows="$WINDOWS" --steps="$STEPS" --json="$OUT/bench_${dtype}_${batch}.json" \
      || echo "gpu_check: the $dtype batch $batch benchmark failed or ran past ${LIMIT} s"
  done
done

echo "== cifar-jax: ResNet18 width $WIDTH, $EPOCHS epochs of $TRAIN_SIZE synthetic images"
rm -rf "$OUT/train"
timeout "$LIMIT" "$PY" -m cifar_jax.main --config=configs/default.py --workdir="$OUT/train" \
  --config.model.width_multiplier="$WIDTH" --config.num_epochs="$EPOCHS" --config.data.source=synthetic \
  --config.data.synthetic_train_size="$TRAIN_SIZE" --config.data.synthetic_eval_size=2000 \
  --config.schedule.name=one_cycle --config.progress_bar=False \
  || echo "gpu_check: the training run failed or ran past ${LIMIT} s"

if [[ -f scripts/bench_seeds.py ]]; then
  echo "== seeds in one run: k = $SEEDS"
  timeout "$LIMIT" "$PY" scripts/bench_seeds.py --config=configs/one_cycle.py --seeds="$SEEDS" --epochs=2 \
    --workdir="$OUT/seeds" --set=model.width_multiplier="$WIDTH" --set=data.source=synthetic \
    --set=data.synthetic_train_size="$TRAIN_SIZE" \
    || echo "gpu_check: bench_seeds failed or ran past ${LIMIT} s"
fi

"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
print('\n## gpu_check results\n')
print('| dtype | batch | variant | train img/s | eval img/s | compile s | peak MB |')
print('| --- | --- | --- | --- | --- | --- | --- |')
for path in sorted(glob.glob(os.path.join(out, 'bench_*.json'))):
  r = json.load(open(path))
  for variant in ('jax', 'torch', 'torch_compile'):
    v = r.get(variant)
    if v:
      print(f"| {r['config']['dtype']} | {r['config']['batch']} | {variant} | "
            f"{v['train_images_per_second']:.0f} | {v['eval_images_per_second']:.0f} | "
            f"{v['compile_seconds']:.1f} | {v['peak_memory_mb']:.0f} |")
metrics = os.path.join(out, 'train', 'metrics.jsonl')
if os.path.exists(metrics):
  rows = [json.loads(line) for line in open(metrics)]
  print('\n| cifar-jax epoch | images/s | eval accuracy | elapsed s |')
  print('| --- | --- | --- | --- |')
  for r in rows:
    print(f"| {r['epoch']} | {r['images_per_second']:.0f} | {r['eval_accuracy']:.4f} | {r['elapsed_seconds']:.1f} |")
seeds = os.path.join(out, 'seeds', 'bench_seeds.md')
if os.path.exists(seeds):
  print('\n' + open(seeds).read())
EOF
