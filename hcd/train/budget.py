"""The time budget of a run (--time_budget_min) and its ETA.

A budgeted run measures its pace after epoch `schedule.decision_epoch`,
plans how many steps fit (whole epochs, then a shorter last one; at most
--epochs), and plans again after every later epoch at the pace of the last
two (a box's speed drifts within a run). The cosine learning rate is
re-anchored at each plan (schedule.HeldCosineDecay.replan), so it anneals
to 0 when the budget ends; the plan is checkpointed with the run. The pure
arithmetic of a plan is hcd/train/schedule.py's; this module applies it to
a running Trainer and logs it. Without a budget the ETA comes from the
epochs' median time.
"""

from __future__ import annotations

import datetime
import statistics

from absl import logging

from hcd.train import runtime
from hcd.train import schedule
from hcd.train.config import TrainConfig


def fit_to_budget(config: TrainConfig, trainer, history: list,
                  step_times: list, val_time: float, steps_per_epoch: int,
                  first: bool) -> tuple[int, float]:
  """Plans a budgeted run's length from the time spent and the pace.

  The pace is the mean time per step of `step_times` (the decision epoch's
  alone the first time, then the last two epochs': a box's speed drifts
  within a run) and this epoch's validation time (right after a mid-epoch
  resume the epoch's own wall time would cover only part of it). Workers
  average their figures, so every worker plans the same length. The
  cosine's end moves to the new last step; its value now stays.

  Over 60 lines only for documenting each argument.

  Args:
    config: the run's config.
    trainer: the steps.Trainer (total_steps and the schedule are set).
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


def eta(epoch_times: list[float], remaining: float) -> str:
  """Wall time left for `remaining` epochs, as h:mm:ss ("" when none).

  The median of the epochs after the first: the first also traces the step
  functions, and a CPU run of pcam.flags lasts 30 minutes to 2 hours
  depending on the box, which a user wants to know after one epoch. (A
  budgeted run, once planned, logs its plan's projection instead.)
  """
  if remaining <= 0 or not epoch_times:
    return ""
  typical = statistics.median(epoch_times[1:] or epoch_times)
  return eta_text(typical * remaining)


def eta_text(seconds: float) -> str:
  """", eta h:mm:ss" for `seconds` > 0, else ""."""
  if seconds <= 0:
    return ""
  return ", eta " + str(datetime.timedelta(seconds=round(seconds)))
