"""Model compute rate of hcd's models on a GPU, through Keras 3 on the JAX backend.

Why JAX: the lent GPU machines carry JAX but no TensorFlow, and a TensorFlow GPU
wheel (~600 MB plus CUDA 12 libraries) cannot be brought there. hcd's models are
plain Keras 3 layer graphs, so the same builders run on the JAX backend; this
measures what one GPU *demands* from the input pipeline (images/s of training),
which is what the scaling model in BENCHMARKS.md needs. It does not exercise
hcd_train's tf.data/tf.distribute path: bench/gpu_check.sh does, on a TF GPU host.

  KERAS_BACKEND=jax python bench/gpu_model_compute.py --models=model1,resnet --batch_sizes=32,256
Last line: a JSON object with the results.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # pylint: disable=g-import-not-at-top
import numpy as np

from hcd import models  # pylint: disable=g-import-not-at-top


class _EpochTimer(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.times = []

  def on_epoch_begin(self, epoch, logs=None):
    self._t = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.times.append(time.perf_counter() - self._t)


def measure(name, batch, steps, epochs, precision):
  keras.mixed_precision.set_global_policy(precision)
  keras.utils.set_random_seed(0)
  model = models.build_model(name)
  model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                jit_compile=True, steps_per_execution=steps)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (batch * steps, 96, 96, 3), dtype=np.uint8)
  y = rng.integers(0, 2, (batch * steps, 1)).astype("float32")
  timer = _EpochTimer()
  model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False,
            callbacks=[timer])
  # The first epoch compiles; the rest are steady state.
  per_epoch = float(np.median(timer.times[1:]))
  return {"model": name, "batch": batch, "precision": precision,
          "params": model.count_params(),
          "step_ms": 1000 * per_epoch / steps,
          "img_s": batch * steps / per_epoch,
          "compile_and_first_epoch_s": timer.times[0]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="model1,resnet")
  ap.add_argument("--batch_sizes", default="32,256")
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--epochs", type=int, default=4)
  ap.add_argument("--precision", default="mixed_bfloat16")
  args = ap.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  device = str(jax.devices()[0])
  print("device:", device, "keras", keras.__version__, "jax", jax.__version__, flush=True)
  results = []
  for name in args.models.split(","):
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
      r = measure(name, batch, args.steps, args.epochs, args.precision)
      print(f"{r['model']:10s} batch {batch:5d} {r['precision']}: {r['step_ms']:.2f} ms/step "
            f"{r['img_s']:,.0f} img/s (compile+first epoch {r['compile_and_first_epoch_s']:.1f} s)",
            flush=True)
      results.append(r)
  print(json.dumps({"device": device, "keras": keras.__version__, "results": results}))


if __name__ == "__main__":
  main()
