"""The compiled training and evaluation steps of a run, and its weight EMA.

Why not `model.fit`: with Keras 3.15 / TF 2.17.1, `fit(jit_compile=True)`
fails once MirroredStrategy has 2 replicas, and `fit` fails under
MultiWorkerMirroredStrategy (see hcd/train/runtime.py). The steps here are
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
layers' seeds are `[seed, global_step]` (folded with the replica id), so a
resumed run needs nothing but the checkpoint (hcd/train/loop.py).

The weight EMA (`--ema_decay`) lives here too: it is updated inside the
compiled loop, after each optimizer step, and validation, prediction and
saving read the averaged weights.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import tensorflow as tf

from hcd.data import features
from hcd.train import runtime
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


class Metrics:
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
      self.train_metrics = Metrics("")
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
    self.ema = WeightEma(
        list(self.model.trainable_variables) +
        [self._nontrainable[i] for i in self._stat_index],
        config.ema_decay, strategy)
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
    # Batches carry int64 labels (hcd.data.batches); the loss and metrics
    # take float32, exact for 0 and 1.
    per_example, probs, labels, grads, new_ntv = self.forward_backward(
        tv, ntv, aug_state, mix_seed, batch["image"],
        tf.cast(batch["label"], tf.float32), batch["weight"],
        self._loss_scale())
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

  def _eval_values(self):
    """(trainable, non-trainable) values that validation and saving use."""
    tv = self._values(self.model.trainable_variables)
    ntv = self._values(self._nontrainable)
    if self.ema:
      n = len(tv)
      tv = self._values(self.ema.averages[:n])
      for i, ema in zip(self._stat_index, self.ema.averages[n:]):
        ntv[i] = tf.convert_to_tensor(ema)
    return tv, ntv

  def _eval_replica(self, batch):
    tv, ntv = self._eval_values()
    probs = self.forward(tv, ntv, batch["image"])
    return (probs[:, 0], tf.cast(batch["label"], tf.float32),
            batch["weight"])

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
        self.ema.update(self.step)

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

  def averaged_weights(self):
    """A context: the EMA weights in the model for the block (no-op without
    EMA), the live ones restored after it."""
    return self.ema.swapped_in()

  def use_averaged_weights(self) -> None:
    """Replaces the model's weights by their EMA (no-op without EMA)."""
    self.ema.copy_to_sources()

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


class WeightEma:
  """An exponential moving average of weights, updated after each step.

  The averages are plain tf.Variables (`averages`, checkpointed as the run
  checkpoint's `ema`), one per source variable, in the sources' order.
  With decay 0 it holds nothing and every method is a no-op; bool(ema)
  says whether it is on.
  """

  def __init__(self, sources, decay: float, strategy):
    self.sources = list(sources)
    self.decay = float(decay)
    self.strategy = strategy
    self.averages = []
    if self.decay > 0:
      with strategy.scope():
        self.averages = [tf.Variable(tf.convert_to_tensor(v), trainable=False,
                                     name=f"ema_{k}")
                         for k, v in enumerate(self.sources)]

  def __bool__(self) -> bool:
    return bool(self.averages)

  def update(self, step) -> None:
    """One EMA step (cross-replica context), after the optimizer's.

    Args:
      step: the global step variable (optimizer steps done).
    """
    step = tf.cast(step, tf.float32)
    # The usual warm-up: early on the average would be dominated by the
    # random initialisation, so the decay starts small.
    decay = tf.minimum(tf.constant(self.decay, tf.float32),
                       (1.0 + step) / (10.0 + step))

    def average(ema, value):
      return ema.assign(ema * tf.cast(decay, ema.dtype) +
                        tf.cast(value, ema.dtype) * tf.cast(1.0 - decay,
                                                            ema.dtype))

    for ema, source in zip(self.averages, self.sources):
      self.strategy.extended.update(ema, average, args=(source.value,))

  def copy_to_sources(self) -> None:
    """Replaces the source variables' values by their averages."""
    for v, ema in zip(self.sources, self.averages):
      v.assign(tf.convert_to_tensor(ema))

  @contextlib.contextmanager
  def swapped_in(self):
    """The averages in the sources for the block, then the live values."""
    if not self.averages:
      yield
      return
    live = [tf.identity(tf.convert_to_tensor(v)) for v in self.sources]
    self.copy_to_sources()
    try:
      yield
    finally:
      for v, x in zip(self.sources, live):
        v.assign(x)
