#!/usr/bin/env python3
"""Benchmark: what in-model stain normalisation costs per training step.

  .venv/bin/python bench/stain_norm_cost.py [--model_override=size=64 ...]
      [--batch_size=128] [--steps=10] [--repeats=5]

Builds the same model (default: pcam_cpu.flags' ResNet, 48/96/192 channels,
2 blocks per stage, input resized to 64 px) without and with each
`stain_norm` method (hcd.models.stain) and times one forward + backward +
Adam step on a constant uint8 batch for each, interleaved repeat by repeat
so that load from other processes hits all alike; XLA on. Prints the median
ms per step of each and its ratio to "none", then one JSON line.
"""

import json
import statistics
import time

from absl import app
from absl import flags
import numpy as np

import hcd  # pylint: disable=unused-import  (oneDNN on before TensorFlow)
from hcd import models
from hcd.train import config

_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per model.")
_OVERRIDES = flags.DEFINE_multi_string(
    "model_override", ["widths=(48,96,192)", "blocks_per_stage=2", "size=64"],
    "resnet builder arguments, key=value (Python literals).")


def _step_fn(model):
  """A compiled forward + backward + Adam step of `model`."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  opt = keras.optimizers.Adam(1e-3)
  opt.build(model.trainable_variables)
  loss_fn = keras.losses.BinaryCrossentropy()

  @tf.function(jit_compile=True)
  def step(images, labels):
    with tf.GradientTape() as tape:
      loss = loss_fn(labels, model(images, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply(grads, model.trainable_variables)
    return loss

  return step


def main(argv):
  del argv
  overrides = config.parse_model_overrides(_OVERRIDES.value)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (_BATCH.value, 96, 96, 3), dtype=np.uint8)
  labels = rng.integers(0, 2, (_BATCH.value, 1)).astype(np.float32)
  steps = {name: _step_fn(models.build_model("resnet", stain_norm=name,
                                              **overrides))
           for name in models.STAIN_NORMS}
  for fn in steps.values():  # compile
    fn(images, labels).numpy()
  times = {name: [] for name in steps}
  for _ in range(_REPEATS.value):
    for name, fn in steps.items():
      t0 = time.perf_counter()
      for _ in range(_STEPS.value):
        loss = fn(images, labels)
      loss.numpy()
      times[name].append((time.perf_counter() - t0) / _STEPS.value * 1e3)
  med = {name: statistics.median(v) for name, v in times.items()}
  for name, ms in med.items():
    print(f"stain_norm={name:9s} {ms:8.1f} ms/step (median of "
          f"{_REPEATS.value} x {_STEPS.value} steps, batch {_BATCH.value})")
  ratio = {name: ms / med["none"] for name, ms in med.items()}
  for name in med:
    print(f"{name} / none: {ratio[name]:.3f}")
  print(json.dumps({"ms_per_step": med, "ratio": ratio,
                    "overrides": overrides, "batch_size": _BATCH.value}))


if __name__ == "__main__":
  app.run(main)
