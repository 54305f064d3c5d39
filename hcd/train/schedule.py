"""The learning-rate schedule, and the time budget that sizes it.

A cosine schedule only pays off when it reaches its end: a run cut short at
30 minutes keeps a high learning rate and un-annealed weights (pcam.flags cut
at the 30-minute mark of a 43-minute run scored 0.877 valid AUC, the same
recipe annealed over fewer epochs 0.897; Li et al., "Budgeted training",
ICLR 2020, make the same point). With `--time_budget_min` the run therefore
measures its own pace and fits the whole schedule into the budget:

  * epochs 1..D run as usual: the linear warm-up, then the peak learning
    rate held. D = max(2, ceil(warmup_epochs)): epoch 1 also traces the step
    functions, so epoch D is the first whose time is the run's pace.
  * at the end of epoch D the run sets its length to what fits in the
    budget at that pace: whole epochs, then a shorter last one with the
    steps still left (at most --epochs, at least D + 1 so that the cosine
    has an epoch to anneal), and the cosine decays to 0 over the steps after
    epoch D.

Without a budget the schedule is Keras' CosineDecay with linear warm-up,
unchanged. The budget counts the epochs' wall time, training and
validation; start-up and the final artifacts (predictions, plots: about a
minute for PCam's 3,000 validation patches on 2 CPU cores) come on top.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


class HeldCosineDecay(keras.optimizers.schedules.CosineDecay):
  """CosineDecay with warm-up whose decay starts after a hold at the peak.

  The decay's length is a variable, so a run can set it once it knows how
  many epochs its time budget allows (`set_decay_steps`) without retracing
  the step functions that call the schedule.
  """

  def __init__(self, learning_rate: float, warmup_steps: int,
               hold_steps: int, decay_steps: int):
    """Builds the schedule.

    Args:
      learning_rate: the peak learning rate.
      warmup_steps: linear warm-up from 1% of the peak (0: none).
      hold_steps: the step at which the decay starts (>= warmup_steps); the
        peak holds from the warm-up's end until then.
      decay_steps: steps of the cosine decay to 0 (changed later with
        `set_decay_steps`).

    Raises:
      ValueError: hold_steps < warmup_steps or decay_steps < 1.
    """
    if hold_steps < warmup_steps:
      raise ValueError(f"hold_steps {hold_steps} < warmup_steps "
                       f"{warmup_steps}")
    if decay_steps < 1:
      raise ValueError(f"decay_steps must be >= 1, got {decay_steps}")
    self.decay_variable = tf.Variable(float(decay_steps), trainable=False,
                                      dtype=tf.float32, name="decay_steps")
    super().__init__(
        initial_learning_rate=learning_rate * (0.01 if warmup_steps else 1.0),
        decay_steps=self.decay_variable, alpha=0.0,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps)
    self.hold_steps = hold_steps

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    hold = float(self.hold_steps - self.warmup_steps)
    # The hold maps onto the decay's first step; after it, the decay runs
    # `hold` steps late.
    step = tf.where(step < self.warmup_steps, step,
                    tf.maximum(step - hold, float(self.warmup_steps)))
    return super().__call__(step)

  def set_decay_steps(self, decay_steps: int) -> None:
    self.decay_variable.assign(float(max(1, decay_steps)))

  def get_config(self):
    config = super().get_config()
    config["decay_steps"] = float(self.decay_variable.numpy())
    config["hold_steps"] = self.hold_steps
    return config


def decision_epoch(warmup_epochs: float) -> int:
  """The epoch after which a budgeted run fixes its length (>= 2)."""
  return max(2, math.ceil(warmup_epochs))


def budget_active(time_budget_min: float, epochs: int,
                  warmup_epochs: float) -> bool:
  """Whether a time budget can change the run (there are epochs to cut)."""
  return time_budget_min > 0 and epochs > decision_epoch(warmup_epochs)


def budget_steps(budget_s: float, elapsed_s: float, step_s: float,
                 val_s: float, steps_done: int, steps_per_epoch: int,
                 max_steps: int) -> int:
  """How many steps a run trains in all, given its budget and pace.

  Whole epochs first, then a shorter last epoch with the steps that still
  fit (every epoch, the short one too, ends with a validation pass), so the
  budget is used instead of rounded down to whole epochs.

  Args:
    budget_s: the time budget in seconds.
    elapsed_s: time its epochs have taken so far.
    step_s: time of one training step.
    val_s: time of one validation pass.
    steps_done: steps trained so far (whole epochs).
    steps_per_epoch: steps of a whole epoch.
    max_steps: the most steps to train (--epochs whole epochs).

  Returns:
    The total number of steps: at least steps_done + steps_per_epoch (one
    epoch to anneal in), at most max_steps.
  """
  step_s = max(step_s, 1e-9)
  epoch_s = steps_per_epoch * step_s + val_s
  left = budget_s - elapsed_s
  whole = max(0, math.floor(left / epoch_s))
  partial = max(0, math.floor((left - whole * epoch_s - val_s) / step_s))
  total = steps_done + whole * steps_per_epoch + min(partial,
                                                     steps_per_epoch - 1)
  return max(steps_done + steps_per_epoch, min(max_steps, total))


def make_schedule(lr_schedule: str, learning_rate: float, epochs: int,
                  steps_per_epoch: int, warmup_epochs: float,
                  time_budget_min: float = 0.0):
  """The learning rate (a float or a schedule) of a run.

  Args:
    lr_schedule: "constant" or "cosine" (hcd.train.config.LR_SCHEDULES).
    learning_rate: the peak learning rate.
    epochs: epochs of the run (the most, under a time budget).
    steps_per_epoch: optimizer steps per epoch.
    warmup_epochs: linear warm-up (cosine only).
    time_budget_min: > 0: hold the peak until the decision epoch, and let
      the run set the decay's length then (`HeldCosineDecay`).

  Returns:
    learning_rate itself (constant), keras CosineDecay, or HeldCosineDecay
    when a time budget is active.
  """
  if lr_schedule != "cosine":
    return learning_rate
  total = max(1, epochs * steps_per_epoch)
  warmup = min(total - 1, int(round(warmup_epochs * steps_per_epoch)))
  if budget_active(time_budget_min, epochs, warmup_epochs):
    hold = max(warmup, decision_epoch(warmup_epochs) * steps_per_epoch)
    return HeldCosineDecay(learning_rate, warmup, hold, total - hold)
  return keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=learning_rate * (0.01 if warmup else 1.0),
      decay_steps=max(1, total - warmup), alpha=0.0,
      warmup_target=learning_rate if warmup else None,
      warmup_steps=warmup)
