"""The custom training loop: XLA per-replica steps, tf.distribute outside.

Why not `model.fit`: with Keras 3.15 / TF 2.17.1, `fit(jit_compile=True)`
fails once MirroredStrategy has 2 replicas, and `fit` fails under
MultiWorkerMirroredStrategy (see hcd/train/runtime.py). The loop here is
built so that XLA never sees a distributed variable:

  * `forward_backward` is a pure function, `tf.function(jit_compile=True)`:
    it takes the replica's variable VALUES as tensors, runs the augmenter and
    the model through Keras' `stateless_call`, and returns per-example
    losses, probabilities, gradients and the new non-trainable values
    (BatchNorm statistics).
  * the replica function (inside `strategy.run`, outside XLA) applies the
    gradients with the Keras optimizer (which all-reduces them), averages the
    BatchNorm statistics across replicas and updates the Keras metrics.
  * `steps_per_loop` steps run inside one `tf.function` call, so Python
    dispatch happens once per N steps instead of once per step.

Randomness is a function of the step: the augmenter's and the dropout
layers' seeds are `[seed, global_step]` (folded with the replica id), and a
resumed run restarts its data stream from a seed derived from the step. A
resumed run therefore needs nothing but the checkpoint (model, optimizer,
epoch and step counters, best AUC).

Resume: the latest checkpoint is written at the end of every epoch (and
every `checkpoint_every_steps`); a restarted run restores it and continues
at the interrupted epoch (from its start, or from the last mid-epoch
checkpoint), so it ends with exactly `epochs` epochs. The two newest
checkpoints are kept: when the newest does not restore (a file cut short),
the run resumes from the one before and says so; a damaged index is rebuilt
from the checkpoint files, and a directory holding another run is refused
(hcd/train/checkpoints.py). A rerun first deletes what a killed run left
half-written (hcd.rundir.RunDir.remove_stale_temp).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import statistics
import time
from typing import Any

from absl import logging
import numpy as np
import tensorflow as tf

from hcd import fileio
from hcd import progress
from hcd import rundir
from hcd.data import features
from hcd.data import pipeline
from hcd.train import artifacts
from hcd.train import checkpoints
from hcd.train import runtime
from hcd.train.config import ConfigError
from hcd.train.config import TrainConfig

_SEED_STATE = "seed_generator_state"


# Variable names (Keras 3 layer weights) that decoupled weight decay skips.
NO_DECAY_NAMES = ("gamma", "beta", "bias")


def make_optimizer(config: TrainConfig, learning_rate: float,
                   steps_per_epoch: int, lr=None):
  """The run's optimizer (Adam/AdamW or Nesterov SGD) with its lr schedule.

  Args:
    config: the run config (optimizer, betas, epsilon, momentum, schedule,
      warm-up, decay).
    learning_rate: the peak learning rate.
    steps_per_epoch: optimizer steps per epoch (for the schedule).
    lr: the learning rate or schedule to use; default: the config's
      (hcd.train.schedule.make_schedule).

  Returns:
    A Keras optimizer (LossScaleOptimizer-wrapped for fp16).
  """
  import keras  # pylint: disable=g-import-not-at-top
  from hcd.train import schedule  # pylint: disable=g-import-not-at-top
  if lr is None:
    lr = schedule.make_schedule(config.lr_schedule, learning_rate,
                                config.epochs, steps_per_epoch,
                                config.warmup_epochs, config.time_budget_min)
  if config.optimizer == "sgd":
    opt = keras.optimizers.SGD(
        learning_rate=lr, momentum=config.momentum, nesterov=True,
        weight_decay=config.weight_decay or None)
  else:
    opt = keras.optimizers.Adam(
        learning_rate=lr, beta_1=config.adam_beta1, beta_2=config.adam_beta2,
        epsilon=config.adam_epsilon,
        weight_decay=config.weight_decay or None)
  if config.weight_decay:
    # The AdamW convention (Keras applies it to SGD alike: w -= lr * wd * w):
    # decay only kernels. Shrinking BatchNorm scales and offsets or biases
    # does not limit capacity, it only fights the normalisation (Loshchilov &
    # Hutter; timm and big_vision do the same).
    opt.exclude_from_weight_decay(var_names=list(NO_DECAY_NAMES))
  return runtime.wrap_optimizer(opt, config.mixed_precision)


class _Metrics:
  """Keras metrics of one phase: loss (weighted mean), accuracy, ROC AUC."""

  def __init__(self, prefix: str):
    import keras  # pylint: disable=g-import-not-at-top
    self.prefix = prefix
    self.loss = keras.metrics.Mean(name=prefix + "loss")
    self.accuracy = keras.metrics.BinaryAccuracy(name=prefix + "accuracy")
    # Logit-spaced thresholds: the default 200 evenly spaced ones lump every
    # saturated probability of an over-confident model into one bucket and
    # report AUC 0.5 for a model that still ranks well (seen with model2).
    thresholds = 1.0 / (1.0 + np.exp(-np.linspace(-16.0, 16.0, 999)))
    self.auc = keras.metrics.AUC(thresholds=thresholds.tolist(),
                                 name=prefix + "auc")

  def update(self, labels, probs, per_example_loss, weights):
    self.loss.update_state(per_example_loss, sample_weight=weights)
    self.accuracy.update_state(labels[:, None], probs, sample_weight=weights)
    self.auc.update_state(labels[:, None], probs, sample_weight=weights)

  def reset(self):
    for m in (self.loss, self.accuracy, self.auc):
      m.reset_state()

  def result(self) -> dict[str, float]:
    # Under multi-worker, reading a metric is a collective: every worker
    # must call result() at the same points, in the same order.
    return {self.prefix + "loss": float(self.loss.result()),
            self.prefix + "accuracy": float(self.accuracy.result()),
            self.prefix + "auc": float(self.auc.result())}


def _bce(labels, probs, label_smoothing: float):
  import keras  # pylint: disable=g-import-not-at-top
  target = labels[:, None]
  if label_smoothing:
    target = target * (1.0 - label_smoothing) + 0.5 * label_smoothing
  probs = tf.cast(probs, tf.float32)
  return keras.ops.binary_crossentropy(target, probs)[:, 0]


class TrainingDiverged(RuntimeError):
  """The training loss became NaN or infinite."""


class Trainer:
  """The model, augmenter, optimizer, metrics and compiled steps of a run.

  Built inside `strategy.scope()`; `train_loop` and `eval_loop` are the
  tf.functions the epoch loop calls.
  """

  def __init__(self, config: TrainConfig, strategy, learning_rate: float,
               steps_per_epoch: int, jit: bool):
    import keras  # pylint: disable=g-import-not-at-top
    from hcd import models  # pylint: disable=g-import-not-at-top
    from hcd.models import augment  # pylint: disable=g-import-not-at-top
    from hcd.train import schedule  # pylint: disable=g-import-not-at-top
    self.config = config
    self.strategy = strategy
    self.jit = jit
    self.global_batch = config.batch_size
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
      self.model = models.build_model(config.model, **config.model_kwargs)
      self.augmenter = augment.build_augmenter(
          flips=config.flips, rot90=config.rot90,
          color_jitter=config.color_jitter, stain_jitter=config.stain_jitter,
          seed=config.seed, hue_jitter=config.hue_jitter)
      self.augmenter.build((None,) + features.IMAGE_SHAPE)
      self.lr_schedule = schedule.make_schedule(
          config.lr_schedule, learning_rate, config.epochs, steps_per_epoch,
          config.warmup_epochs, config.time_budget_min)
      self.optimizer = make_optimizer(config, learning_rate, steps_per_epoch,
                                      lr=self.lr_schedule)
      self.optimizer.build(self.model.trainable_variables)
      self.train_metrics = _Metrics("")
      self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False,
                               name="epoch")
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
      self.best_auc = tf.Variable(-1.0, dtype=tf.float64, trainable=False,
                                  name="best_auc")
      self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False,
                                    name="best_epoch")
      # The run's length in steps: --epochs whole epochs, or what its time
      # budget allows once that is known (checkpointed, so a resumed run
      # keeps the decision).
      self.total_steps = tf.Variable(config.epochs * steps_per_epoch,
                                     dtype=tf.int64, trainable=False,
                                     name="total_steps")
    self._nontrainable = list(self.model.non_trainable_variables)
    self._seed_index = [i for i, v in enumerate(self._nontrainable)
                        if v.name == _SEED_STATE]
    self._stat_index = [i for i, v in enumerate(self._nontrainable)
                        if v.name != _SEED_STATE]
    self._aug_vars = list(self.augmenter.non_trainable_variables)
    # The weights the EMA follows: every trainable weight and the BatchNorm
    # statistics (averaged weights with the live statistics would mismatch).
    self._ema_sources = list(self.model.trainable_variables) + [
        self._nontrainable[i] for i in self._stat_index]
    self.ema = []
    if config.ema_decay > 0:
      with strategy.scope():
        self.ema = [tf.Variable(tf.convert_to_tensor(v), trainable=False,
                                name=f"ema_{k}")
                    for k, v in enumerate(self._ema_sources)]
    self._build_steps()

  # -- pure, XLA-compiled functions -----------------------------------------

  def _build_steps(self):
    from hcd.models import augment  # pylint: disable=g-import-not-at-top
    model, augmenter = self.model, self.augmenter
    smoothing = float(self.config.label_smoothing)
    global_batch = float(self.global_batch)

    mixup = self.config.mix == "mixup"
    mix_alpha = float(self.config.mix_alpha)

    def forward_backward(tv, ntv, aug_state, mix_seed, images, labels,
                         weights, loss_scale):
      if self._aug_vars:
        images, _ = augmenter.stateless_call([], aug_state, images,
                                             training=True)
      targets = labels
      if mixup:
        images, targets = augment.mixup(images, labels, mix_seed, mix_alpha)
      with tf.GradientTape() as tape:
        tape.watch(tv)
        probs, new_ntv = model.stateless_call(tv, ntv, images, training=True)
        per_example = _bce(targets, probs, smoothing)
        # Divided by the GLOBAL batch: the optimizer sums replica gradients.
        loss = tf.reduce_sum(per_example * weights) / global_batch
        scaled = loss * loss_scale
      grads = tape.gradient(scaled, tv)
      # Metrics of a mixed batch score the dominant image's label.
      return (per_example, tf.cast(probs, tf.float32), tf.round(targets),
              grads, new_ntv)

    def forward(tv, ntv, images):
      probs, _ = model.stateless_call(tv, ntv, images, training=False)
      return tf.cast(probs, tf.float32)

    self.forward_backward = tf.function(forward_backward,
                                        jit_compile=self.jit)
    self.forward = tf.function(forward, jit_compile=self.jit)

  # -- replica functions (outside XLA) ---------------------------------------

  def _values(self, variables):
    return [tf.convert_to_tensor(v) for v in variables]

  def _seed_values(self, ntv, step, replica_id, num_replicas):
    """Step-derived seeds for the model's random layers (dropout)."""
    ntv = list(ntv)
    for k, i in enumerate(self._seed_index):
      v = self._nontrainable[i]
      counter = step * num_replicas + tf.cast(replica_id, tf.int64)
      ntv[i] = tf.cast(tf.stack([tf.constant(self.config.seed + 1 + k,
                                             tf.int64), counter]), v.dtype)
    return ntv

  def _loss_scale(self):
    import keras  # pylint: disable=g-import-not-at-top
    if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
      return tf.cast(tf.convert_to_tensor(self.optimizer.dynamic_scale),
                     tf.float32)
    return tf.constant(1.0, tf.float32)

  def _train_replica(self, batch):
    ctx = tf.distribute.get_replica_context()
    step = tf.convert_to_tensor(self.step)
    tv = self._values(self.model.trainable_variables)
    ntv = self._seed_values(self._values(self._nontrainable), step,
                            ctx.replica_id_in_sync_group,
                            ctx.num_replicas_in_sync)
    aug_state = [tf.cast(tf.stack([tf.constant(self.config.seed, tf.int64),
                                   step]), v.dtype) for v in self._aug_vars]
    mix_seed = tf.stack([
        tf.constant(self.config.seed + 7, tf.int64),
        step * ctx.num_replicas_in_sync +
        tf.cast(ctx.replica_id_in_sync_group, tf.int64)])
    per_example, probs, labels, grads, new_ntv = self.forward_backward(
        tv, ntv, aug_state, mix_seed, batch["image"], batch["label"],
        batch["weight"], self._loss_scale())
    self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
    if self._stat_index:
      stats = ctx.all_reduce(tf.distribute.ReduceOp.MEAN,
                             [new_ntv[i] for i in self._stat_index])
      variables = [self._nontrainable[i] for i in self._stat_index]

      def assign(strategy, values):
        for var, value in zip(variables, values):
          strategy.extended.update(var.value, lambda v, x: v.assign(x),
                                   args=(value,))

      ctx.merge_call(assign, args=(stats,))
    self.train_metrics.update(labels, probs, per_example, batch["weight"])

  def _update_ema(self):
    """One EMA step (cross-replica context), after the optimizer's."""
    step = tf.cast(self.step, tf.float32)
    # The usual warm-up: early on the average would be dominated by the
    # random initialisation, so the decay starts small.
    decay = tf.minimum(tf.constant(self.config.ema_decay, tf.float32),
                       (1.0 + step) / (10.0 + step))

    def average(ema, value):
      return ema.assign(ema * tf.cast(decay, ema.dtype) +
                        tf.cast(value, ema.dtype) * tf.cast(1.0 - decay,
                                                            ema.dtype))

    for ema, source in zip(self.ema, self._ema_sources):
      self.strategy.extended.update(ema, average, args=(source.value,))

  def _eval_values(self):
    """(trainable, non-trainable) values that validation and saving use."""
    tv = self._values(self.model.trainable_variables)
    ntv = self._values(self._nontrainable)
    if self.ema:
      n = len(tv)
      tv = self._values(self.ema[:n])
      for i, ema in zip(self._stat_index, self.ema[n:]):
        ntv[i] = tf.convert_to_tensor(ema)
    return tv, ntv

  def _eval_replica(self, batch):
    tv, ntv = self._eval_values()
    probs = self.forward(tv, ntv, batch["image"])
    return probs[:, 0], batch["label"], batch["weight"]

  @tf.function
  def train_loop(self, iterator, num_steps):
    """Runs `num_steps` training steps (one tf.function call).

    Args:
      iterator: the distributed training iterator.
      num_steps: a scalar tensor.
    """
    for _ in tf.range(num_steps):
      self.strategy.run(self._train_replica, args=(next(iterator),))
      self.step.assign_add(1)
      if self.ema:
        self._update_ema()

  @tf.function
  def eval_step(self, iterator):
    """One validation step: (probs, labels, weights) of every replica.

    Gathered from all replicas (and workers), so every worker computes the
    same exact metrics and takes the same best-epoch decision.
    """
    outputs = self.strategy.run(self._eval_replica, args=(next(iterator),))
    return [self.strategy.gather(o, axis=0) for o in outputs]

  def evaluate(self, iterator, num_steps: int) -> dict[str, float]:
    """Validation metrics over `num_steps` steps, computed exactly.

    The loss, accuracy and ROC AUC come from every validation probability
    (hcd.metrics, i.e. scikit-learn), not from thresholded streaming
    metrics: model selection must not mis-rank a model whose probabilities
    are tightly clustered.

    Returns:
      {"val_loss", "val_accuracy", "val_auc"} (val_auc None if one class).
    """
    from hcd import metrics as hcd_metrics  # pylint: disable=g-import-not-at-top
    probs, labels, weights = [], [], []
    for _ in range(num_steps):
      p, l, w = (t.numpy() for t in self.eval_step(iterator))
      probs.append(p)
      labels.append(l)
      weights.append(w)
    probs, labels, weights = (np.concatenate(x) for x in (probs, labels,
                                                          weights))
    keep = weights > 0  # Padding of the last batch has weight 0.
    return hcd_metrics.validation_metrics(labels[keep], probs[keep],
                                          weights[keep])

  @contextlib.contextmanager
  def averaged_weights(self):
    """Puts the EMA weights into the model for the block, then restores."""
    if not self.ema:
      yield
      return
    live = [tf.identity(tf.convert_to_tensor(v)) for v in self._ema_sources]
    self.use_averaged_weights()
    try:
      yield
    finally:
      for v, x in zip(self._ema_sources, live):
        v.assign(x)

  def use_averaged_weights(self) -> None:
    """Replaces the model's weights by their EMA (no-op without EMA)."""
    for v, ema in zip(self._ema_sources, self.ema):
      v.assign(tf.convert_to_tensor(ema))

  def predict(self, dataset):
    """Probabilities for a (non-distributed) dataset with ids; chief only.

    Uses the weights validation uses (the EMA when enabled).

    Returns:
      (ids list[str], labels int array, probs float array) of the images
      with weight > 0 (padding dropped).
    """
    tv, ntv = self._eval_values()
    ids, labels, probs = [], [], []
    for batch in dataset:
      p = self.forward(tv, ntv, batch["image"]).numpy()[:, 0]
      keep = batch["weight"].numpy() > 0
      ids += [i.decode("utf-8") for i in batch["id"].numpy()[keep]]
      labels.append(batch["label"].numpy()[keep].astype(np.int64))
      probs.append(p[keep])
    if not ids:
      return [], np.zeros(0, np.int64), np.zeros(0, np.float32)
    return ids, np.concatenate(labels), np.concatenate(probs)

  def weights_digest(self) -> str:
    """sha256 of all model weights (equal on every worker after a run)."""
    h = hashlib.sha256()
    for v in self.model.weights:
      h.update(np.ascontiguousarray(v.numpy()).tobytes())
    return h.hexdigest()

  def current_lr(self) -> float:
    return float(tf.convert_to_tensor(self.optimizer.learning_rate))


def _check_batch(config: TrainConfig, strategy, plan: pipeline.DataPlan):
  replicas = strategy.num_replicas_in_sync
  if config.batch_size % replicas:
    raise ConfigError(f"batch_size {config.batch_size} is not divisible by "
                     f"the {replicas} replicas")
  if not config.steps_per_epoch and plan.train.num_examples < config.batch_size:
    raise ConfigError(
        f"the training subset has {plan.train.num_examples} images, fewer "
        f"than one batch of {config.batch_size}")


def _summaries(writer, row: dict, step: int):
  if writer is None:
    return
  with writer.as_default(step=step):
    for key, value in row.items():
      if key == "epoch" or value is None:
        continue
      name = key[4:] if key.startswith("val_") else key
      group = "val" if key.startswith("val_") else "train"
      if key in ("epoch_time_s", "step_time_s", "images_per_s", "lr"):
        group = "run"
      tf.summary.scalar(f"{group}/{name}", value)
  writer.flush()


def train_and_evaluate(config: TrainConfig, strategy=None,
                       flags_text: str | None = None) -> dict[str, Any]:
  """Trains a model from shards, validates every epoch, writes the run dir.

  Nothing is written before the config, the model overrides, the shards and
  the run directory have been checked, so a run that fails them leaves no
  empty run directory behind.

  Args:
    config: the run.
    strategy: a tf.distribute strategy to use (tests inject one); None
      configures devices and creates one from `config.strategy`.
    flags_text: resolved flags to save as flags.txt (binaries pass it).

  Returns:
    metrics.json's content on the chief ({"weights_sha256": ...} with the
    run's timings elsewhere).

  Raises:
    ConfigError: bad config (unknown model: lists the known ones; unknown
      model override: lists the accepted ones), or checkpoints in `workdir`
      of which none restores (names the directory and the remedy).
    hcd.data.manifest.ManifestError: missing shard manifest (names the path).
    hcd.data.pipeline.ShardFileError: a missing, truncated or corrupt shard
      (names it and the remedy).
    hcd.data.pipeline.PipelineError: bad group CSV, unlabelled shards.
    OSError: the run directory cannot be written (names the path: read-only,
      no space left, ...).
  """
  try:
    return _train_and_evaluate(config, strategy, flags_text)
  except tf.errors.DataLossError:
    # A record failed its CRC while training, and TensorFlow's error names no
    # file; planning rereads every shard and names the one at fault.
    pipeline.run_plan(config)
    raise


def _train_and_evaluate(config: TrainConfig, strategy,
                        flags_text: str | None) -> dict[str, Any]:
  """`train_and_evaluate` without the naming of a corrupt shard."""
  from hcd import models  # pylint: disable=g-import-not-at-top
  from hcd.train import schedule  # pylint: disable=g-import-not-at-top
  config.validate()
  try:
    models.get_spec(config.model)
    # Before any data is read: a misspelt --model_override fails now.
    models.check_overrides(config.model, config.model_kwargs)
  except ValueError as e:  # The message lists the known names or overrides.
    raise ConfigError(str(e)) from None
  if strategy is None:
    runtime.configure_devices(config.cpu_logical_devices)
    strategy = runtime.create_strategy(config.strategy)
  jit = runtime.resolve_jit_compile(config.jit_compile)
  precision = runtime.resolve_mixed_precision(config.mixed_precision)
  runtime.set_mixed_precision(precision)
  chief = runtime.is_chief(strategy)
  run = rundir.RunDir(config.workdir)
  write_dir = runtime.worker_write_dir(config.workdir, strategy)
  if chief:
    # Also before any data is read: a read-only --workdir fails in a second.
    fileio.check_output_dir(config.workdir)

  plan = pipeline.run_plan(config)
  _check_batch(config, strategy, plan)
  steps_per_epoch = (config.steps_per_epoch or
                     plan.train.num_examples // config.batch_size)
  val_steps = 0
  if plan.val is not None:
    val_steps = config.val_steps or pipeline.eval_steps(plan.val,
                                                        config.batch_size)
  learning_rate = config.learning_rate or models.default_learning_rate(
      config.model)

  trainer = Trainer(config, strategy, learning_rate, steps_per_epoch, jit)
  num_params = int(trainer.model.count_params())
  derived = {
      "num_params": num_params, "image_shape": list(features.IMAGE_SHAPE),
      "learning_rate": learning_rate, "steps_per_epoch": steps_per_epoch,
      "val_steps": val_steps,
      "runtime": runtime.describe(strategy, jit, precision),
      "data": {"train": plan.train.summary(),
               "val": plan.val.summary() if plan.val else None},
  }
  run_config = {**config.to_dict(), **derived}
  # Before _start_run_dir writes the new config.json over the old one.
  checkpoints.check_resumable(run, run_config)
  ckpt = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer,
                             epoch=trainer.epoch, step=trainer.step,
                             best_auc=trainer.best_auc,
                             best_epoch=trainer.best_epoch)
  if trainer.ema:
    ckpt.ema = trainer.ema
  budgeted = schedule.budget_active(config.time_budget_min, config.epochs,
                                    config.warmup_epochs)
  decide_at = schedule.decision_epoch(config.warmup_epochs)
  if budgeted:
    ckpt.total_steps = trainer.total_steps
    if isinstance(trainer.lr_schedule, schedule.HeldCosineDecay):
      # Where the cosine stands and ends: a resumed run anneals as planned.
      ckpt.lr_plan = tf.train.Checkpoint(**trainer.lr_schedule.variables)
  # Every worker restores the chief's checkpoint (a shared filesystem),
  # and before anything is written, so that a run it cannot continue
  # leaves the directory as it was.
  latest = checkpoints.restore_latest(ckpt, run.checkpoints, repair=chief)
  if latest:
    checkpoints.check_not_past_end(
        run, int(trainer.epoch.numpy()), int(trainer.step.numpy()),
        int(trainer.total_steps.numpy()), config.epochs)
  if chief:
    _start_run_dir(run, flags_text, run_config)
  logging.info("model %s: %d parameters; %d steps/epoch of %d images; "
               "%d validation steps; jit_compile=%s; mixed_precision=%s; "
               "oneDNN=%s; %s",
               config.model, num_params, steps_per_epoch, config.batch_size,
               val_steps, jit, precision, derived["runtime"]["onednn"],
               derived["runtime"]["strategy"])
  logging.info("train: %s", plan.train.summary())
  if plan.val:
    logging.info("val: %s", plan.val.summary())
  if latest:
    logging.info("resumed from %s: %d epoch(s) and %d step(s) done", latest,
                 int(trainer.epoch.numpy()), int(trainer.step.numpy()))
  best_ckpt = tf.train.Checkpoint(model=trainer.model, epoch=trainer.epoch,
                                  best_auc=trainer.best_auc)
  temp_dir = None if chief else write_dir
  latest_saver = checkpoints.Saver(ckpt, run.checkpoints, temp_dir,
                                   max_to_keep=2)
  best_saver = checkpoints.Saver(best_ckpt, run.best_checkpoints, temp_dir,
                                 max_to_keep=1)
  start_epoch = int(trainer.epoch.numpy())
  start_step = int(trainer.step.numpy())
  history = [r for r in rundir.read_history(run.workdir)
             if int(r["epoch"]) <= start_epoch] if latest else []

  global_batch = config.batch_size
  # A fresh data stream per (re)start, seeded by where training stands.
  stream_seed = config.seed + 1_000_003 * start_step
  train_ds = strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.train_dataset(
          plan.train, ctx.get_per_replica_batch_size(global_batch),
          seed=stream_seed, input_context=ctx, cache=config.cache,
          shuffle_blocks=config.shuffle_blocks, mix_size=config.mix_size))
  val_ds = None
  if plan.val is not None:
    val_ds = strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.eval_dataset(
            plan.val, ctx.get_per_replica_batch_size(global_batch),
            steps=val_steps, input_context=ctx))
  train_iter = iter(train_ds)
  tb_writer = (tf.summary.create_file_writer(run.tensorboard)
               if chief and config.tensorboard else None)

  epoch_times, step_times = [], []
  epoch = start_epoch
  while epoch * steps_per_epoch < int(trainer.total_steps.numpy()):
    total_steps = int(trainer.total_steps.numpy())
    num_epochs = -(-total_steps // steps_per_epoch)
    # Whole epochs, but a time budget's last epoch may be shorter.
    epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
    trainer.train_metrics.reset()
    done = start_step - epoch * steps_per_epoch if epoch == start_epoch else 0
    done = min(max(done, 0), epoch_steps)
    bar = progress.bar(total=epoch_steps, desc=f"epoch {epoch + 1}/"
                       f"{num_epochs}", unit="step", leave=False,
                       enabled=chief and not config.log_every_steps)
    bar.update(done)
    t0 = time.perf_counter()
    trained = 0
    next_log = config.log_every_steps
    while done < epoch_steps:
      n = min(config.steps_per_loop, epoch_steps - done)
      if config.checkpoint_every_steps:
        n = min(n, config.checkpoint_every_steps -
                int(trainer.step.numpy()) % config.checkpoint_every_steps)
      trainer.train_loop(train_iter, tf.constant(n, tf.int64))
      done += n
      trained += n
      bar.update(n)
      if config.checkpoint_every_steps and (
          int(trainer.step.numpy()) % config.checkpoint_every_steps == 0) \
          and done < epoch_steps:
        latest_saver.save(int(trainer.step.numpy()))
      if config.log_every_steps and trained >= next_log:
        next_log += config.log_every_steps
        m = trainer.train_metrics.result()
        elapsed = time.perf_counter() - t0
        if chief:
          logging.info("epoch %d step %d/%d: loss %.4f acc %.4f auc %.4f, "
                       "%.0f img/s", epoch + 1, done, epoch_steps,
                       m["loss"], m["accuracy"], m["auc"],
                       trained * global_batch / max(elapsed, 1e-9))
    bar.close()
    train_time = time.perf_counter() - t0
    row = {"epoch": epoch + 1, **trainer.train_metrics.result()}
    if not math.isfinite(row["loss"]):
      # Validation would only fail on the NaN probabilities, which reads
      # like bad input; say what happened instead. This epoch is not
      # checkpointed.
      raise TrainingDiverged(
          f"epoch {epoch + 1}: the training loss is {row['loss']}: training "
          f"diverged at learning rate {trainer.current_lr():.3g} (peak "
          f"{learning_rate:.3g}); lower --learning_rate (or add "
          f"--warmup_epochs) and start again with a new --workdir")
    val_time = 0.0
    if val_ds is not None:
      tv0 = time.perf_counter()
      row.update(trainer.evaluate(iter(val_ds), val_steps))
      val_time = time.perf_counter() - tv0
    else:
      row.update({"val_loss": None, "val_accuracy": None, "val_auc": None})
    row.update({
        "epoch_time_s": train_time + val_time,
        "step_time_s": train_time / max(trained, 1),
        "images_per_s": trained * global_batch / max(train_time, 1e-9),
        "lr": trainer.current_lr(),
    })
    if trained:
      epoch_times.append(row["epoch_time_s"])
      step_times.append(row["step_time_s"])
    history.append(row)
    if chief:
      rundir.write_history(run, history)
      _summaries(tb_writer, row, epoch + 1)
    if budgeted and epoch + 1 >= decide_at and (
        int(trainer.step.numpy()) < int(trainer.total_steps.numpy())):
      # Decided at epoch decide_at at its pace, then planned again after
      # every epoch but the last, at the pace of the last two. The ETA is
      # the plan's own projection, so the two never disagree.
      first = epoch + 1 == decide_at
      num_epochs, time_left = _fit_to_budget(
          config, trainer, history, step_times[-(1 if first else 2):],
          val_time, steps_per_epoch, first)
      eta = _eta_text(time_left)
    else:
      eta = _eta(epoch_times, num_epochs - epoch - 1)
    logging.info(
        "epoch %d/%d: loss %.4f acc %.4f auc %.4f | val_loss %s val_acc %s "
        "val_auc %s | %.1f s, %.0f img/s, lr %.3g%s", epoch + 1,
        num_epochs, row["loss"], row["accuracy"], row["auc"],
        _fmt(row["val_loss"]), _fmt(row["val_accuracy"]), _fmt(row["val_auc"]),
        row["epoch_time_s"], row["images_per_s"], row["lr"], eta)
    trainer.epoch.assign(epoch + 1)
    val_auc = row["val_auc"]
    if val_auc is not None and math.isfinite(val_auc) and (
        val_auc > float(trainer.best_auc.numpy())):
      trainer.best_auc.assign(val_auc)
      trainer.best_epoch.assign(epoch + 1)
      with trainer.averaged_weights():
        best_saver.save(epoch + 1)
        if chief:
          artifacts.save_keras_model(trainer.model, run.best_model)
    latest_saver.save(int(trainer.step.numpy()))
    epoch += 1

  return _finish(config, trainer, plan, run, chief, history, epoch_times,
                 step_times, num_params, write_dir)


def _fit_to_budget(config: TrainConfig, trainer: Trainer, history: list,
                   step_times: list, val_time: float, steps_per_epoch: int,
                   first: bool) -> int:
  """Plans a budgeted run's length from the time spent and the pace.

  The pace is the mean time per step of `step_times` (the decision epoch's
  alone the first time, then the last two epochs': a box's speed drifts
  within a run) and this epoch's validation time (right after a mid-epoch
  resume the epoch's own wall time would cover only part of it). Workers
  average their figures, so every worker plans the same length. The
  cosine's end moves to the new last step; its value now stays.

  Args:
    config: the run's config.
    trainer: the Trainer (total_steps and the schedule are set).
    history: every epoch's row so far, this one's included.
    step_times: time per step of the epochs that set the pace.
    val_time: this epoch's validation time.
    steps_per_epoch: steps of a whole epoch.
    first: the decision at epoch decide_at (at least one more whole epoch,
      logged in full) rather than a re-plan (logged when the plan changes;
      it may end the run with this epoch).

  Returns:
    (the run's number of epochs (the last one may be shorter), the seconds
    of epoch time the plan still needs: the ETA).
  """
  from hcd.train import schedule  # pylint: disable=g-import-not-at-top
  elapsed = sum(r.get("epoch_time_s") or 0.0 for r in history)
  pace = sum(step_times) / max(len(step_times), 1)
  elapsed, step_s, val_s = runtime.mean_across_workers(
      trainer.strategy, [elapsed, pace, val_time])
  budget_s = 60.0 * config.time_budget_min
  done = int(trainer.step.numpy())
  before = int(trainer.total_steps.numpy())
  total = schedule.budget_steps(budget_s, elapsed, step_s, val_s, done,
                                steps_per_epoch,
                                config.epochs * steps_per_epoch,
                                min_steps=None if first else 0)
  trainer.total_steps.assign(total)
  if isinstance(trainer.lr_schedule, schedule.HeldCosineDecay):
    trainer.lr_schedule.replan(total, done)
  whole, partial = divmod(total, steps_per_epoch)
  num_epochs = whole + (partial > 0)
  end = schedule.budget_end(elapsed, step_s, val_s, done, total,
                            steps_per_epoch, len(history))
  last = (f", the last with {partial} of {steps_per_epoch} steps" if partial
          else "")
  over = (" (over the budget: at least one epoch is left to anneal)"
          if end > budget_s + 1 and first else "")
  if first:
    logging.info(
        "time budget %.1f min: %d epochs took %.1f min, %.0f s per epoch; "
        "training %d epochs in all (--epochs=%d)%s%s, ending at about %.1f "
        "min%s; planned again after each epoch", config.time_budget_min,
        len(history), elapsed / 60, steps_per_epoch * step_s + val_s,
        num_epochs, config.epochs, last,
        f"; the learning rate anneals over the last {total - done} steps"
        if config.lr_schedule == "cosine" else "", end / 60, over)
  elif total != before:
    logging.info(
        "time budget %.1f min: %.1f min used, %.0f s per epoch over the last "
        "%d; re-planned from %d to %d steps: %d epochs in all%s, ending at "
        "about %.1f min", config.time_budget_min, elapsed / 60,
        steps_per_epoch * step_s + val_s, len(step_times), before, total,
        num_epochs, last, end / 60)
  return num_epochs, end - elapsed


def _start_run_dir(run: rundir.RunDir, flags_text: str | None,
                   config: dict) -> None:
  """Creates the run directory, cleans it, writes flags.txt and config.json.

  Called once the run has passed every check, so a run that fails them
  leaves nothing behind; if these first writes fail (no space left), the
  directories this call created are removed again.
  """
  # Subdirectories are created by their writers when they first write.
  with fileio.made_dirs(run.workdir):
    removed = run.remove_stale_temp()
    if removed:
      logging.info("removed %d temporary file(s) a killed run left in %s: %s",
                   len(removed), run.workdir, ", ".join(
                       os.path.relpath(p, run.workdir) for p in removed))
    if flags_text is not None:
      fileio.atomic_write_text(run.flags, flags_text)
    rundir.write_json(run.config, config)


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.4f}"


def _eta(epoch_times: list[float], remaining: float) -> str:
  """Wall time left for `remaining` epochs, as h:mm:ss ("" when none).

  The median of the epochs after the first: the first also traces the step
  functions, and a CPU run of pcam.flags lasts 30 minutes to 2 hours
  depending on the box, which a user wants to know after one epoch. (A
  budgeted run, once planned, logs its plan's projection instead.)
  """
  if remaining <= 0 or not epoch_times:
    return ""
  typical = statistics.median(epoch_times[1:] or epoch_times)
  return _eta_text(typical * remaining)


def _eta_text(seconds: float) -> str:
  """", eta h:mm:ss" for `seconds` > 0, else ""."""
  if seconds <= 0:
    return ""
  return ", eta " + str(datetime.timedelta(seconds=round(seconds)))


def _finish(config, trainer, plan, run, chief, history, epoch_times,
            step_times, num_params, write_dir) -> dict[str, Any]:
  """Final artifacts: model.keras, predictions, metrics.json, plots."""
  # The final model is the averaged one when EMA is on (the checkpoint
  # keeps both, so a restarted run gets here with the same weights).
  trainer.use_averaged_weights()
  digest = trainer.weights_digest()
  logging.info("final weights sha256 %s", digest)
  if not chief:
    runtime.barrier(trainer.strategy)  # Wait for the chief's writes.
    runtime.remove_worker_dir(write_dir, config.workdir)
    return {"weights_sha256": digest}
  artifacts.save_keras_model(trainer.model, run.model)
  best_epoch = int(trainer.best_epoch.numpy())
  if plan.val is None or best_epoch == 0:
    artifacts.save_keras_model(trainer.model, run.best_model)
    best_epoch = len(history)
  y_true = y_prob = None
  if plan.val is not None:
    ds = pipeline.eval_dataset(plan.val, config.batch_size, with_ids=True)
    ids, y_true, y_prob = trainer.predict(ds)
    rundir.write_predictions(run.val_predictions, ids, y_true, y_prob)
  if not epoch_times:  # Nothing trained in this process: use the history.
    epoch_times = [r["epoch_time_s"] for r in history if r.get("epoch_time_s")]
    step_times = [r["step_time_s"] for r in history if r.get("step_time_s")]
  extra = {
      "model": config.model, "model_file": rundir.MODEL_FILE,
      "best_epoch": best_epoch,
      "best_val_auc": (float(trainer.best_auc.numpy())
                       if plan.val is not None and best_epoch else None),
      "epochs": len(history),
      "time_per_epoch_s": float(np.median(epoch_times)) if epoch_times
                          else None,
      "time_per_step_s": float(np.median(step_times)) if step_times else None,
      "images_per_s": float(np.median([r["images_per_s"] for r in history]))
                      if history else None,
      "total_train_time_s": float(sum(r.get("epoch_time_s") or 0
                                      for r in history)),
      "num_params": num_params,
      "weights_sha256": digest,
  }
  result = artifacts.write_plots_and_metrics(run, history, y_true, y_prob,
                                             extra)
  runtime.barrier(trainer.strategy)
  logging.info("wrote %s: val AUC %s, best epoch %d", config.workdir,
               _fmt(result.get("roc_auc")), best_epoch)
  return result
