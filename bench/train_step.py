#!/usr/bin/env python3
"""Benchmark: time per training step of hcd's loop vs a bare step vs fit.

  .venv/bin/python bench/train_step.py [--flagfile=pcam.flags] [--model=...]
      [--steps=20] [--repeats=5] [--jit=both|true|false]
      [--precisions=none,bf16] [--batchnorm=fused,keras]

The recipe is hcd_train's own: every hcd_train flag (and --flagfile) is
accepted and turned into the same TrainConfig, so `--flagfile=pcam.flags`
measures the recipe pcam.flags trains with (model, batch size, D4 / stain /
colour / hue augmentation, mixup, label smoothing, weight EMA,
learning-rate schedule). Without flags it is the notebook's setting (model1,
batch 32, random flips). Three ways to train that recipe on the same uint8
batch, one device, no input pipeline cost (a constant batch):

  bare  one tf.function doing augment + mix + forward + backward + Adam (+
        the EMA update), nothing else: the floor for any loop
  hcd   hcd.train.steps.Trainer.train_loop: strategy.run, the per-replica
        step as a separate tf.function, Adam applied outside it, BatchNorm
        statistics written back, EMA of weights and statistics,
        loss/accuracy/AUC metrics, a `steps_per_loop` loop over a tf.data
        iterator
  fit   keras Model.fit on Sequential([augmenter, model]) with the same
        optimizer and schedule (EMA: Adam(use_ema=True)), loss (label
        smoothing), metrics, mixup as a map in the tf.data input,
        steps_per_execution = steps

each with XLA (jit_compile=True) and without, and in each of --precisions
(float32 and bfloat16: bf16 pays off on CPUs with AMX-BF16 and on GPUs).
The three methods run in turn, --repeats times, so load from other
processes hits them alike; each number is the median of the repeats of
(wall time of --steps steps) / steps. The last line is a JSON object with
every median, the overheads hcd / bare - 1 and fit / hcd, images/s and,
with float32 among --precisions, each other precision's speed-up of the hcd
step over float32. --batchnorm=fused,keras times hcd's BatchNormalization
(TensorFlow's fused kernel, hcd.models.batchnorm) against Keras 3's own
unfused one in the same run, the two interleaved round by round like the
methods, and reports the fused kernel's speed-up of each method. oneDNN is
on, as in every hcd process (hcd/__init__.py; hcd is imported before
TensorFlow here, which that needs);
TF_ENABLE_ONEDNN_OPTS=0 times TensorFlow's own default, Eigen convolutions
on CPUs without AVX-512 VNNI/BF16 or AMX.
"""

import contextlib
import json
import os
import platform
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
from hcd.models import augment
from hcd.models import batchnorm
from hcd.train import runtime
from hcd.train import steps as train_steps

_STEPS = flags.DEFINE_integer("steps", 20, "Steps per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per method.")
_JIT = flags.DEFINE_enum("jit", "both", ["both", "true", "false"],
                         "XLA on, off or both.")
_PRECISIONS = flags.DEFINE_list(
    "precisions", [], "Mixed precisions to time in turn (none, bf16, fp16, "
    "auto), e.g. none,bf16; default: the recipe's --mixed_precision.")
_BATCHNORM = flags.DEFINE_list(
    "batchnorm", ["fused"], "BatchNormalization kernels to time in turn: "
    "fused (hcd's, TensorFlow's FusedBatchNormV3) and/or keras (Keras 3's "
    "unfused ops).")
# Result-key suffix of each --batchnorm kernel (hcd_kerasbn_noxla_ms, ...).
_BN_SUFFIX = {"fused": "", "keras": "_kerasbn"}


def batch(batch_size, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch_size, 96, 96, 3), dtype=np.uint8)
  labels = (rng.random(batch_size) < 0.5).astype(np.float32)
  return images, labels


def _augment_kwargs(config):
  return dict(flips=config.flips, rot90=config.rot90,
              color_jitter=config.color_jitter,
              stain_jitter=config.stain_jitter, hue_jitter=config.hue_jitter)


def _bce(config):
  return keras.losses.BinaryCrossentropy(
      label_smoothing=config.label_smoothing)


def bare_step_fn(config, jit, lr):
  keras.utils.set_random_seed(config.seed)
  model = models.build_model(config.model, **config.model_kwargs)
  opt = train_steps.make_optimizer(config, lr, 100)
  opt.build(model.trainable_variables)
  step = tf.Variable(0, dtype=tf.int64)
  tracked = list(model.trainable_variables)
  ema = [tf.Variable(tf.convert_to_tensor(v)) for v in tracked
         ] if config.ema_decay else []
  loss_fn = _bce(config)

  @tf.function(jit_compile=jit)
  def train_step(images, labels):
    seed = tf.stack([tf.constant(config.seed, tf.int64), step])
    images = augment.augment_batch(images, seed, **_augment_kwargs(config))
    if config.mix != "none":
      images, labels = augment.mixup(images, labels, seed, config.mix_alpha)
    with tf.GradientTape() as tape:
      probs = model(images, training=True)
      loss = loss_fn(labels[:, None], probs)
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    for e, v in zip(ema, tracked):
      e.assign(e * config.ema_decay + v * (1 - config.ema_decay))
    step.assign_add(1)
    return loss

  @tf.function
  def run(images, labels, n):
    for _ in tf.range(n):
      train_step(images, labels)

  return run


def hcd_step_fn(config, jit, lr, steps):
  config.steps_per_loop = steps
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0" if not tf.config
                                             .list_physical_devices("GPU")
                                             else "/gpu:0")
  trainer = train_steps.Trainer(config, strategy, lr, 100, jit)
  images, labels = batch(config.batch_size)
  ds = tf.data.Dataset.from_tensors({
      "image": images, "label": labels,
      "weight": np.ones(config.batch_size, np.float32)}).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(ds))

  def run(unused_images, unused_labels, n):
    trainer.train_loop(iterator, n)

  return run


def fit_step_fn(config, jit, lr, steps):
  keras.utils.set_random_seed(config.seed)
  model = keras.Sequential([keras.Input((96, 96, 3), dtype="uint8"),
                            augment.build_augmenter(seed=config.seed,
                                                    **_augment_kwargs(config)),
                            models.build_model(config.model,
                                               **config.model_kwargs)])
  opt = train_steps.make_optimizer(config, lr, 100)
  if config.ema_decay:  # Keras' own EMA (of the trainable weights).
    # Set before the optimizer is built (compile builds it). A from_config
    # copy would need the lr schedule registered with Keras and would drop
    # the weight-decay exclusions.
    inner = getattr(opt, "inner_optimizer", opt)  # fp16: the loss scaler's
    inner.use_ema, inner.ema_momentum = True, config.ema_decay
  model.compile(optimizer=opt, loss=_bce(config),
                metrics=["accuracy", keras.metrics.AUC()], jit_compile=jit,
                steps_per_execution=steps)
  images, labels = batch(config.batch_size)
  ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
  if config.mix != "none":
    seeds = tf.data.Dataset.random(seed=config.seed).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds).map(
        lambda xy, s: augment.mixup(xy[0], xy[1], s, config.mix_alpha))
  ds = ds.map(lambda x, y: (x, y[:, None])).prefetch(2)

  def run(unused_images, unused_labels, n):
    model.fit(ds, epochs=1, steps_per_epoch=int(n), verbose=0)

  return run


def main(argv):
  del argv
  config = train_flags.config_from_flags(train_flags.FLAGS)
  lr = config.learning_rate or models.default_learning_rate(config.model)
  images, labels = batch(config.batch_size)
  images_t, labels_t = tf.constant(images), tf.constant(labels)
  steps = _STEPS.value
  jits = {"both": [False, True], "true": [True], "false": [False]}[_JIT.value]
  precisions = [runtime.resolve_mixed_precision(p) for p in
                _PRECISIONS.value or [config.mixed_precision]]
  results = {}
  bad = set(_BATCHNORM.value) - set(_BN_SUFFIX)
  if bad:
    raise app.UsageError(f"--batchnorm takes fused and/or keras, got {bad}")
  for precision, jit in [(p, j) for p in precisions for j in jits]:
    # Models and optimizers take the policy in force when they are built.
    runtime.set_mixed_precision(precision)
    config.mixed_precision = precision
    tag = ("xla" if jit else "noxla") + (
        "" if precision == "none" else f"_{precision}")
    fns = {}
    for bn in _BATCHNORM.value:
      suffix = _BN_SUFFIX[bn]
      with (batchnorm.keras_kernel() if bn == "keras" else
            contextlib.nullcontext()):
        fns[f"bare{suffix}"] = bare_step_fn(config, jit, lr)
        fns[f"hcd{suffix}"] = hcd_step_fn(config, jit, lr, steps)
        fns[f"fit{suffix}"] = fit_step_fn(config, jit, lr, steps)
    n = tf.constant(steps, tf.int64)
    for fn in fns.values():  # Trace, compile and warm up.
      fn(images_t, labels_t, n)
    times = {k: [] for k in fns}
    for _ in range(_REPEATS.value):
      for name, fn in fns.items():
        t0 = time.perf_counter()
        fn(images_t, labels_t, n)
        times[name].append((time.perf_counter() - t0) / steps)
    for name, ts in times.items():
      ms = 1000 * statistics.median(ts)
      results[f"{name}_{tag}_ms"] = ms
      results[f"{name}_{tag}_img_s"] = config.batch_size / (ms / 1000)
      print(f"{config.model} batch {config.batch_size} {tag:10s} {name:11s}: "
            f"{ms:8.1f} ms/step  (runs: "
            f"{', '.join(f'{1000 * t:.1f}' for t in ts)})", flush=True)
    for suffix in (_BN_SUFFIX[bn] for bn in _BATCHNORM.value):
      results[f"hcd{suffix}_over_bare_{tag}"] = (
          results[f"hcd{suffix}_{tag}_ms"] / results[f"bare{suffix}_{tag}_ms"]
          - 1)
      results[f"fit{suffix}_over_hcd_{tag}"] = (
          results[f"fit{suffix}_{tag}_ms"] / results[f"hcd{suffix}_{tag}_ms"])
    if len(_BATCHNORM.value) > 1:
      for method in ("bare", "hcd", "fit"):
        results[f"fused_speedup_{method}_{tag}"] = (
            results[f"{method}_kerasbn_{tag}_ms"] /
            results[f"{method}_{tag}_ms"])
  runtime.set_mixed_precision("none")
  if "none" in precisions and len(precisions) > 1:
    for p in precisions:
      if p != "none":  # Speed-up of each precision over float32, same run.
        for tag in ("noxla", "xla"):
          if f"hcd_{tag}_{p}_ms" in results:
            results[f"{p}_speedup_{tag}"] = (results[f"hcd_{tag}_ms"] /
                                             results[f"hcd_{tag}_{p}_ms"])
  results.update(model=config.model, batch_size=config.batch_size,
                 recipe={k: v for k, v in config.to_dict().items() if k in (
                     "model_overrides", "rot90", "stain_jitter",
                     "color_jitter", "hue_jitter", "mix", "ema_decay",
                     "label_smoothing", "lr_schedule")},
                 steps=steps, repeats=_REPEATS.value, cpus=os.cpu_count(),
                 load_avg=os.getloadavg()[0],
                 machine=platform.processor() or platform.machine(),
                 tensorflow=tf.__version__, onednn=runtime.onednn_enabled(),
                 gpu=bool(tf.config.list_physical_devices("GPU")))
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
