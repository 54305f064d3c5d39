#!/usr/bin/env python3
"""Benchmark: time per training step of hcd's loop vs a bare step vs fit.

  .venv/bin/python bench/train_step.py [--model=model1] [--batch_size=32]
      [--steps=20] [--repeats=5] [--jit=both|true|false]

Three ways to train the same model on the same uint8 batch (random flips
in all three), one device, no input pipeline cost (a constant batch):

  bare  one tf.function doing augment + forward + backward + Adam, nothing
        else: the floor for any loop
  hcd   hcd.train.loop.Trainer.train_loop: strategy.run, the per-replica
        step as a separate tf.function, Adam applied outside it, BatchNorm
        statistics written back, loss/accuracy/AUC metrics, a
        `steps_per_loop` loop over a tf.data iterator
  fit   keras Model.fit on Sequential([augmenter, model]) with the same
        metrics, steps_per_execution = steps

each with XLA (jit_compile=True) and without. The three methods run in turn,
--repeats times, so load from other processes hits them alike; each number
is the median of the repeats of (wall time of --steps steps) / steps. The
last line is a JSON object with every median and the overheads
hcd / bare - 1 and fit / hcd.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from hcd import models
from hcd.models import augment
from hcd.train import loop
from hcd.train.config import TrainConfig


def batch(batch_size, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch_size, 96, 96, 3), dtype=np.uint8)
  labels = (rng.random(batch_size) < 0.5).astype(np.float32)
  return images, labels


def bare_step_fn(model_name, jit, seed=1):
  keras.utils.set_random_seed(seed)
  model = models.build_model(model_name)
  opt = keras.optimizers.Adam(1e-3)
  opt.build(model.trainable_variables)
  step = tf.Variable(0, dtype=tf.int64)

  @tf.function(jit_compile=jit)
  def train_step(images, labels):
    images = augment.augment_batch(
        images, tf.stack([tf.constant(seed, tf.int64), step]), flips=True,
        rot90=False)
    with tf.GradientTape() as tape:
      probs = model(images, training=True)
      loss = tf.reduce_mean(keras.ops.binary_crossentropy(labels[:, None],
                                                          probs))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    step.assign_add(1)
    return loss

  @tf.function
  def run(images, labels, n):
    for _ in tf.range(n):
      train_step(images, labels)

  return run


def hcd_step_fn(model_name, jit, batch_size, steps):
  config = TrainConfig(model=model_name, batch_size=batch_size,
                       steps_per_loop=steps, flips=True, seed=1)
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0" if not tf.config
                                             .list_physical_devices("GPU")
                                             else "/gpu:0")
  trainer = loop.Trainer(config, strategy, 1e-3, 100, jit)
  images, labels = batch(batch_size)
  ds = tf.data.Dataset.from_tensors({
      "image": images, "label": labels,
      "weight": np.ones(batch_size, np.float32)}).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(ds))

  def run(unused_images, unused_labels, n):
    trainer.train_loop(iterator, n)

  return run


def fit_step_fn(model_name, jit, batch_size, steps):
  keras.utils.set_random_seed(1)
  model = keras.Sequential([augment.build_augmenter(flips=True, rot90=False,
                                                    seed=1),
                            models.build_model(model_name)])
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss="binary_crossentropy",
                metrics=["accuracy", keras.metrics.AUC()], jit_compile=jit,
                steps_per_execution=steps)
  images, labels = batch(batch_size)
  ds = tf.data.Dataset.from_tensors((images, labels[:, None])).repeat()

  def run(unused_images, unused_labels, n):
    model.fit(ds, epochs=1, steps_per_epoch=int(n), verbose=0)

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="model1")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--jit", default="both", choices=["both", "true",
                                                         "false"])
  args = parser.parse_args()
  images, labels = batch(args.batch_size)
  images_t, labels_t = tf.constant(images), tf.constant(labels)
  jits = {"both": [False, True], "true": [True], "false": [False]}[args.jit]
  results = {}
  for jit in jits:
    fns = {
        "bare": bare_step_fn(args.model, jit),
        "hcd": hcd_step_fn(args.model, jit, args.batch_size, args.steps),
        "fit": fit_step_fn(args.model, jit, args.batch_size, args.steps),
    }
    n = tf.constant(args.steps, tf.int64)
    for fn in fns.values():  # Trace, compile and warm up.
      fn(images_t, labels_t, n)
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
      for name, fn in fns.items():
        t0 = time.perf_counter()
        fn(images_t, labels_t, n)
        times[name].append((time.perf_counter() - t0) / args.steps)
    tag = "xla" if jit else "noxla"
    for name, ts in times.items():
      results[f"{name}_{tag}_ms"] = 1000 * statistics.median(ts)
      print(f"{args.model} batch {args.batch_size} {tag:5s} {name:4s}: "
            f"{1000 * statistics.median(ts):8.1f} ms/step  "
            f"(runs: {', '.join(f'{1000 * t:.1f}' for t in ts)})", flush=True)
    results[f"hcd_over_bare_{tag}"] = (results[f"hcd_{tag}_ms"] /
                                       results[f"bare_{tag}_ms"] - 1)
    results[f"fit_over_hcd_{tag}"] = (results[f"fit_{tag}_ms"] /
                                      results[f"hcd_{tag}_ms"])
  results.update(model=args.model, batch_size=args.batch_size,
                 steps=args.steps, repeats=args.repeats,
                 cpus=os.cpu_count(), machine=platform.processor() or
                 platform.machine(), tensorflow=tf.__version__,
                 gpu=bool(tf.config.list_physical_devices("GPU")))
  print(json.dumps(results))


if __name__ == "__main__":
  main()
