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
    steps still left if they train at least as long as its validation
    pass takes (at most --epochs, at least D + 1 so that the cosine
    has an epoch to anneal), and the cosine decays to 0 over the steps after
    epoch D.
  * after every later epoch but the last it plans again, from the time
    actually spent and the pace of the last two epochs (a 2-core box's speed
    drifts by 15-40% within a run: one decision at epoch D ended runs up to
    3 minutes early or 2 minutes late). The cosine's end moves, its current
    value does not (`HeldCosineDecay.replan`), so the learning rate never
    jumps; a box that slows down near the end anneals faster instead of
    running over, and where not one step more fits (or is worth a
    validation pass), the epoch just trained is the last.

Without a budget the schedule is Keras' CosineDecay with linear warm-up,
unchanged. The budget counts the epochs' wall time, training and
validation; start-up and the final artifacts (predictions, plots: about a
minute for PCam's 3,000 validation patches on 2 CPU cores) come on top.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


class HeldCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Cosine decay to 0 with linear warm-up, a hold at the peak, and an end
  that can move while the run trains.

  After the warm-up the learning rate is peak * (1 + cos(pi * p)) / 2,
  where the decay's progress p runs from 0 at `hold_steps` to 1 at the
  run's last step. The end can be re-planned at any step (`replan`): p then
  runs on from its value at that step to 1 at the new end, so the learning
  rate never jumps; only the pace of the decay changes. Its state is three
  variables (`variables`, checkpointed by the loop), so a re-plan does not
  retrace the step functions that call the schedule.
  """

  def __init__(self, learning_rate: float, warmup_steps: int,
               hold_steps: int, decay_steps: int):
    """Builds the schedule.

    Args:
      learning_rate: the peak learning rate.
      warmup_steps: linear warm-up from 1% of the peak (0: none).
      hold_steps: the step at which the decay starts (>= warmup_steps); the
        peak holds from the warm-up's end until then.
      decay_steps: steps of the cosine decay to 0, until a re-plan.

    Raises:
      ValueError: hold_steps < warmup_steps or decay_steps < 1.
    """
    if hold_steps < warmup_steps:
      raise ValueError(f"hold_steps {hold_steps} < warmup_steps "
                       f"{warmup_steps}")
    if decay_steps < 1:
      raise ValueError(f"decay_steps must be >= 1, got {decay_steps}")
    self.learning_rate = float(learning_rate)
    self.warmup_steps = int(warmup_steps)
    self.hold_steps = int(hold_steps)
    # The decay's progress is piecewise linear in the step: `anchor_progress`
    # at `anchor_step`, 1 at `end_step`.
    self.anchor_step = tf.Variable(float(hold_steps), trainable=False,
                                   dtype=tf.float32, name="lr_anchor_step")
    self.anchor_progress = tf.Variable(0.0, trainable=False, dtype=tf.float32,
                                       name="lr_anchor_progress")
    self.end_step = tf.Variable(float(hold_steps + decay_steps),
                                trainable=False, dtype=tf.float32,
                                name="lr_end_step")

  @property
  def variables(self) -> dict:
    """The schedule's state by name, for a checkpoint."""
    return {"anchor_step": self.anchor_step,
            "anchor_progress": self.anchor_progress,
            "end_step": self.end_step}

  def _progress(self, step):
    span = tf.maximum(self.end_step - self.anchor_step, 1.0)
    p = self.anchor_progress + (1.0 - self.anchor_progress) * (
        step - self.anchor_step) / span
    return tf.clip_by_value(p, 0.0, 1.0)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    peak = self.learning_rate
    decayed = peak * 0.5 * (1.0 + tf.cos(math.pi * self._progress(step)))
    if not self.warmup_steps:
      return decayed
    # Keras CosineDecay's warm-up: linear from 1% of the peak.
    start = 0.01 * peak
    warm = start + (peak - start) * step / float(self.warmup_steps)
    return tf.where(step < self.warmup_steps, warm, decayed)

  def replan(self, end_step: int, at_step: int) -> None:
    """Moves the decay's end to `end_step`, from `at_step` on.

    The learning rate at `at_step` stays what it was; from there the decay
    runs to 0 at `end_step` (at least one step later).

    Args:
      end_step: the run's new last step.
      at_step: the step the run stands at (the hold's end if earlier).
    """
    at = float(max(at_step, self.hold_steps))
    progress = float(self._progress(tf.constant(at)))
    self.anchor_progress.assign(progress)
    self.anchor_step.assign(at)
    self.end_step.assign(max(float(end_step), at + 1.0))

  def get_config(self):
    return {"learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "hold_steps": self.hold_steps,
            **{k: float(v.numpy()) for k, v in self.variables.items()}}


def decision_epoch(warmup_epochs: float) -> int:
  """The epoch after which a budgeted run fixes its length (>= 2)."""
  return max(2, math.ceil(warmup_epochs))


def budget_active(time_budget_min: float, epochs: int,
                  warmup_epochs: float) -> bool:
  """Whether a time budget can change the run (there are epochs to cut)."""
  return time_budget_min > 0 and epochs > decision_epoch(warmup_epochs)


def budget_steps(budget_s: float, elapsed_s: float, step_s: float,
                 val_s: float, steps_done: int, steps_per_epoch: int,
                 max_steps: int, min_steps: int | None = None) -> int:
  """How many steps a run trains in all, given its budget and pace.

  Whole epochs first, then a shorter last epoch with the steps that still
  fit (every epoch, the short one too, ends with a validation pass), so the
  budget is used instead of rounded down to whole epochs. The short epoch
  is planned only when it trains at least as long as its validation pass
  takes: a few steps at the cosine's tail cannot repay a pass of 10-15 s
  (two 29-minute runs once ended with 1-4 step epochs).

  Args:
    budget_s: the time budget in seconds.
    elapsed_s: time its epochs have taken so far.
    step_s: time of one training step.
    val_s: time of one validation pass.
    steps_done: steps trained so far (whole epochs).
    steps_per_epoch: steps of a whole epoch.
    max_steps: the most steps to train (--epochs whole epochs).
    min_steps: the fewest steps still to train, whatever the budget says
      (default: steps_per_epoch, one epoch to anneal in; a re-plan, whose
      cosine is already under way, passes 0: the run may end at once).

  Returns:
    The total number of steps: at least steps_done + min_steps, at most
    max_steps.
  """
  if min_steps is None:
    min_steps = steps_per_epoch
  step_s = max(step_s, 1e-9)
  epoch_s = steps_per_epoch * step_s + val_s
  left = budget_s - elapsed_s
  whole = max(0, math.floor(left / epoch_s))
  partial = max(0, math.floor((left - whole * epoch_s - val_s) / step_s))
  if partial * step_s < val_s:
    partial = 0
  total = steps_done + whole * steps_per_epoch + min(partial,
                                                     steps_per_epoch - 1)
  return max(steps_done + min_steps, min(max_steps, total))


def budget_end(elapsed_s: float, step_s: float, val_s: float,
               steps_done: int, total_steps: int, steps_per_epoch: int,
               epochs_done: int) -> float:
  """When a planned run's epochs end, in seconds of epoch time from its start.

  The one projection behind both the plan's "ending at about" and the ETA
  of every epoch line of a budgeted run: the steps still to train at
  `step_s` each, plus one validation pass per epoch still to come, the short
  last epoch counted by its steps, not as a whole epoch.

  Args:
    elapsed_s: time the epochs have taken so far.
    step_s: time of one training step.
    val_s: time of one validation pass.
    steps_done: steps trained so far.
    total_steps: the planned total (budget_steps).
    steps_per_epoch: steps of a whole epoch.
    epochs_done: epochs trained (and validated) so far.

  Returns:
    The projected epoch time of the whole run, in seconds.
  """
  epochs = -(-total_steps // steps_per_epoch)  # The short last one counts.
  return (elapsed_s + max(0, total_steps - steps_done) * step_s +
          max(0, epochs - epochs_done) * val_s)


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
      the run set the decay's end then and move it later
      (`HeldCosineDecay`).

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
