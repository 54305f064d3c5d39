#!/usr/bin/env python3
"""How close is a training step to what this CPU can compute at all?

  cd bench_out/pcam && python ../../bench/step_ceiling.py --flagfile=pcam_cpu.flags

Three numbers in one run, on the same cores:

  model   multiply-adds per image of the model's convolutions and dense
          layers (from the layer shapes), so the FLOPs of a training step
          (forward, plus the two backward products of each layer: ~3x);
  step    a bare training step (forward, backward, AdamW; no augmentation,
          no input pipeline) of that model on a constant uint8 batch:
          images/s and the GFLOP/s it achieves;
  peak    GFLOP/s of a 2048x2048 float32 matmul and of 3x3 convolutions at
          the model's own stage shapes, the most oneDNN gets out of these
          cores for such work.

Every hcd_train flag (and --flagfile) is accepted and turned into the same
TrainConfig, so the model, its overrides and the batch size are the
recipe's (without flags: the notebook's model1 at batch 32). Medians of
--repeats timings. Results: BENCHMARKS.md, "A 48-px input and a foveated
two-stream ResNet".
"""

import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
# Before TensorFlow: its oneDNN default (hcd/__init__.py).
import hcd  # pylint: disable=unused-import
import keras
import numpy as np
import tensorflow as tf

from hcd import models
from hcd.cli import flags as train_flags

_STEPS = flags.DEFINE_integer("steps", 6, "Steps per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats.")


def _median_time(fn, repeats: int) -> float:
  fn()  # Trace and warm up.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def forward_macs(model) -> int:
  """Multiply-adds per image of the model's Conv2D and Dense layers."""
  total = 0
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D):
      _, h, w, c_out = layer.output.shape
      kh, kw = layer.kernel_size
      total += h * w * kh * kw * layer.input.shape[-1] * c_out
    elif isinstance(layer, keras.layers.Dense):
      total += layer.input.shape[-1] * layer.units
  return int(total)


def step_seconds(model, batch: int, steps: int, repeats: int) -> float:
  """Median seconds per bare training step (forward, backward, AdamW)."""
  opt = keras.optimizers.AdamW(1e-3)
  opt.build(model.trainable_variables)
  loss_fn = keras.losses.BinaryCrossentropy()
  rng = np.random.default_rng(0)
  images = tf.constant(rng.integers(0, 256, (batch, 96, 96, 3), np.uint8))
  labels = tf.constant((rng.random((batch, 1)) < 0.5).astype(np.float32))

  @tf.function
  def run(n):
    for _ in tf.range(n):
      with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
      grads = tape.gradient(loss, model.trainable_variables)
      opt.apply_gradients(zip(grads, model.trainable_variables))

  n = tf.constant(steps)
  return _median_time(lambda: run(n), repeats) / steps


def peak_gflops(shapes, batch: int, repeats: int) -> dict:
  """GFLOP/s of a big matmul and of 3x3 convolutions at the given maps."""
  out = {}
  a = tf.random.normal((2048, 2048))

  @tf.function
  def matmul(n):
    acc = tf.zeros_like(a)
    for _ in tf.range(n):
      acc += tf.matmul(a, a)
    return acc

  n = 20
  t = _median_time(lambda: matmul(tf.constant(n)).numpy(), repeats)
  out["matmul_2048"] = n * 2 * 2048 ** 3 / t / 1e9
  for hw, c in shapes:
    x = tf.random.normal((batch, hw, hw, c))
    k = tf.random.normal((3, 3, c, c))

    @tf.function
    def conv(n, x=x, k=k):
      acc = tf.zeros_like(x)
      for _ in tf.range(n):
        acc += tf.nn.conv2d(x, k, 1, "SAME")
      return acc

    n = 30
    t = _median_time(lambda: conv(tf.constant(n)).numpy(), repeats)
    out[f"conv3x3_{hw}x{hw}x{c}"] = n * 2 * batch * hw * hw * c * c * 9 / t / 1e9
  return out


def conv_shapes(model) -> list[tuple[int, int]]:
  """(side, channels) of the model's 3x3 stride-1 convolutions, c -> c."""
  shapes = {(layer.output.shape[1], layer.filters) for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D) and
            tuple(layer.kernel_size) == (3, 3) and
            tuple(layer.strides) == (1, 1) and
            layer.input.shape[-1] == layer.filters}
  return sorted(shapes, reverse=True)


def main(argv):
  del argv
  config = train_flags.config_from_flags(train_flags.FLAGS)
  batch = config.batch_size
  model = models.build_model(config.model, **config.model_kwargs)
  macs = forward_macs(model)
  train_flop = 3 * 2 * macs  # Forward + input and weight gradients.
  sec = step_seconds(model, batch, _STEPS.value, _REPEATS.value)
  ips = batch / sec
  result = {
      "model": config.model, "overrides": config.model_overrides,
      "batch": batch,
      "forward_mmacs_per_image": macs / 1e6,
      "train_gflop_per_image": train_flop / 1e9,
      "step_ms": 1000 * sec, "images_per_s": ips,
      "step_gflops": ips * train_flop / 1e9,
      "peak_gflops": peak_gflops(conv_shapes(model), batch, _REPEATS.value),
      "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0],
  }
  print(json.dumps(result, indent=1, default=list))


if __name__ == "__main__":
  app.run(main)
