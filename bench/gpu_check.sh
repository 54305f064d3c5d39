#!/usr/bin/env bash
# The prepared GPU check: hcd's real path (tf.data -> XLA-compiled custom loop) on one GPU.
#
# Run on a host (or in the hcd Docker image) with setup.cfg's TensorFlow (2.21.0) and one GPU:
#   bash bench/gpu_check.sh [OUT_DIR]            # default OUT_DIR: bench_out/gpu_check
#   docker run --gpus all -v $PWD/gpu_out:/workspace hcd bash /opt/hcd/bench/gpu_check.sh /workspace
# It finishes in well under 8 minutes on one H100/H200-class GPU and prints a summary:
#   - a synthetic workspace of NUM_TRAIN (default 50,000) patches, sharded and verified;
#   - model1 and resnet trained for 2 epochs each, jit on, bf16 mixed precision, batch BATCH (256);
#   - images/s and step time of each (from the run's history.json);
#   - input-bound or not: the input pipeline alone (bench/input_pipeline.py) against the training rate;
#   - XLA: the number of HLO modules XLA compiled for the GPU (XLA_FLAGS=--xla_dump_to), and the
#     device TensorFlow saw.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$HERE/bench_out/gpu_check}"
NUM_TRAIN="${NUM_TRAIN:-50000}"
BATCH="${BATCH:-256}"
EPOCHS="${EPOCHS:-2}"
WORKERS="${WORKERS:-$(nproc)}"
PY="${PYTHON:-python3}"
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
cd "$OUT"
t0=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

say "device: $("$PY" -c 'import tensorflow as tf; print(tf.__version__, tf.config.list_physical_devices("GPU"))')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

say "synthetic workspace: $NUM_TRAIN train patches"
"$PY" "$HERE/tools/make_synthetic" --out_dir=data --num_train="$NUM_TRAIN" --num_test=1000 --seed=0 \
    --workers="$WORKERS" 2>&1 | tail -2
say "shards"
"$PY" "$HERE/tools/make_shards" --data_dir=data --split=train --out_dir=shards --workers="$WORKERS" \
    --noprogress --verify 2>&1 | tail -2

say "input pipeline alone (uint8 batches of $BATCH) vs ImageDataGenerator"
"$PY" "$HERE/bench/input_pipeline.py" --data_dir=data --shards_dir=shards --batch_size="$BATCH" \
    --seconds=5 --repeats=2 | tee input.log | tail -1 > input.json

"$PY" -m hcd.configs --out_dir=. --overwrite >/dev/null
for model in model1 resnet; do
  say "train $model: $EPOCHS epochs, batch $BATCH, jit, bf16"
  rm -rf "runs/$model" "xla_$model"
  XLA_FLAGS="--xla_dump_to=$OUT/xla_$model" hcd_train --flagfile="$model.flags" --shards_dir=shards \
      --workdir="runs/$model" --epochs="$EPOCHS" --batch_size="$BATCH" --jit_compile=true \
      --mixed_precision=bf16 --strategy=one_device --steps_per_loop=20 2>&1 | tail -4
done

say "summary"
"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
inp = json.load(open(os.path.join(out, "input.json")))
print(f"input pipeline alone: {inp['hcd_img_s']:,.0f} img/s (ImageDataGenerator {inp['idg_img_s']:,.0f}, "
      f"{inp['ratio']:.1f}x)")
for model in ("model1", "resnet"):
  hist = json.load(open(os.path.join(out, "runs", model, "history.json")))
  last = hist[-1]
  xla = glob.glob(os.path.join(out, f"xla_{model}", "*.after_optimizations.txt"))
  gpu_mods = [p for p in xla if "cuda" in open(p).read(4000).lower() or "gpu" in p.lower()]
  bound = "INPUT-BOUND" if inp["hcd_img_s"] < 1.1 * last["images_per_s"] else "compute-bound"
  print(f"{model}: {last['images_per_s']:,.0f} img/s, step {1000 * last['step_time_s']:.2f} ms, "
        f"val_auc {last.get('val_auc', float('nan')):.3f}; XLA modules compiled: {len(xla)} "
        f"({len(gpu_mods)} mention the GPU); {bound} "
        f"(input/train = {inp['hcd_img_s'] / last['images_per_s']:.1f}x)")
EOF
say "done"
