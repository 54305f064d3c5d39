"""The training loop: prepare a run, train epoch by epoch, write its results.

`train_and_evaluate` reads top-down: `_prepare` checks the config, plans
the data, builds the Trainer and restores the run's checkpoint; each epoch
is `_train_epoch` (compiled steps, mid-epoch checkpoints, progress),
`_validate` and `_end_epoch` (history, time budget and ETA, best model,
checkpoint); `artifacts.finish_run` writes the final model and metrics.
Each part's own job lives in its module:

  * hcd/train/steps.py: the Trainer, its XLA-compiled per-replica steps
    (why not `model.fit`: see there), the optimizer and the weight EMA;
  * hcd/train/checkpoints.py: which run a directory holds, the run's
    checkpoints, restoring the newest that restores;
  * hcd/train/budget.py: --time_budget_min's plan and the ETA;
  * hcd/train/artifacts.py: the run directory's files.

Resume: the latest checkpoint is written at the end of every epoch (and
every `checkpoint_every_steps`); a restarted run restores it and continues
at the interrupted epoch (from its start, or from the last mid-epoch
checkpoint), so it ends with exactly `epochs` epochs. Randomness is a
function of the step (hcd/train/steps.py) and a resumed run restarts its
data stream from a seed derived from the step, so a resumed run needs
nothing but the checkpoint (model, optimizer, epoch and step counters, best
AUC, EMA, time-budget plan). The two newest checkpoints are kept: when the
newest does not restore (a file cut short), the run resumes from the one
before and says so; a damaged index is rebuilt from the checkpoint files,
and a directory holding another run is refused (hcd/train/checkpoints.py).
A rerun first deletes what a killed run left half-written
(hcd.rundir.RunDir.remove_stale_temp).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from absl import logging
import tensorflow as tf

from hcd import fileio
from hcd import progress
from hcd import rundir
from hcd.data import features
from hcd.data import pipeline
from hcd.data import subsets
from hcd.train import artifacts
from hcd.train import budget
from hcd.train import checkpoints
from hcd.train import runtime
from hcd.train import schedule
from hcd.train import steps
from hcd.train.config import ConfigError
from hcd.train.config import TrainConfig


class TrainingDiverged(RuntimeError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass
class _Run:
  """What the epochs of one run share, once `_prepare` has set it up."""
  config: TrainConfig
  strategy: Any
  trainer: steps.Trainer
  plan: subsets.DataPlan
  run: rundir.RunDir
  chief: bool
  write_dir: str
  steps_per_epoch: int
  val_steps: int
  learning_rate: float
  num_params: int
  latest_saver: checkpoints.Saver
  best_saver: checkpoints.Saver
  start_epoch: int
  start_step: int
  history: list
  train_iter: Any = None
  val_ds: Any = None
  tb_writer: Any = None
  epoch_times: list = dataclasses.field(default_factory=list)
  step_times: list = dataclasses.field(default_factory=list)

  def total_steps(self) -> int:
    return int(self.trainer.total_steps.numpy())


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
    TrainingDiverged: the training loss became NaN or infinite.
    hcd.data.manifest.ManifestError: missing shard manifest (names the path).
    hcd.data.shard_reader.ShardFileError: a missing, truncated or corrupt shard
      (names it and the remedy).
    hcd.data.shard_reader.PipelineError: bad group CSV, unlabelled shards.
    OSError: the run directory cannot be written (names the path: read-only,
      no space left, ...).
  """
  try:
    return _train_and_evaluate(config, strategy, flags_text)
  except tf.errors.DataLossError:
    # A record failed its CRC while training, and TensorFlow's error names no
    # file; planning rereads every shard and names the one at fault.
    subsets.run_plan(config.data_settings())
    raise


def _train_and_evaluate(config: TrainConfig, strategy,
                        flags_text: str | None) -> dict[str, Any]:
  """`train_and_evaluate` without the naming of a corrupt shard."""
  r = _prepare(config, strategy, flags_text)
  epoch = r.start_epoch
  while epoch * r.steps_per_epoch < r.total_steps():
    row, trained, train_time = _train_epoch(r, epoch)
    val_time = _validate(r, row)
    _end_epoch(r, epoch, row, trained, train_time, val_time)
    epoch += 1
  return artifacts.finish_run(
      config, r.trainer, r.plan, r.run, r.chief, r.history, r.epoch_times,
      r.step_times, r.num_params, r.write_dir)


def _check_model(config: TrainConfig) -> None:
  """Refuses an unknown model or override before any data is read.

  Raises:
    ConfigError: the message lists the known names or overrides.
  """
  from hcd import models  # pylint: disable=g-import-not-at-top
  try:
    models.get_spec(config.model)
    models.check_overrides(config.model, config.model_kwargs)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_batch(config: TrainConfig, strategy, plan: subsets.DataPlan):
  replicas = strategy.num_replicas_in_sync
  if config.batch_size % replicas:
    raise ConfigError(f"batch_size {config.batch_size} is not divisible by "
                      f"the {replicas} replicas")
  if not config.steps_per_epoch and plan.train.num_examples < config.batch_size:
    raise ConfigError(
        f"the training subset has {plan.train.num_examples} images, fewer "
        f"than one batch of {config.batch_size}")


def _prepare(config: TrainConfig, strategy,
             flags_text: str | None) -> _Run:
  """Checks, plans, builds and restores a run; then writes its run dir.

  Every check (config, model, output directory, shards, resumability)
  comes before the first write.

  Over 60 lines: every check before the first write, in the order
  they run, reads best in one place.
  """
  from hcd import models  # pylint: disable=g-import-not-at-top
  config.validate()
  _check_model(config)
  if strategy is None:
    runtime.configure_devices(config.cpu_logical_devices)
    strategy = runtime.create_strategy(config.strategy)
  jit = runtime.resolve_jit_compile(config.jit_compile)
  precision = runtime.resolve_mixed_precision(config.mixed_precision)
  runtime.set_mixed_precision(precision)
  chief = runtime.is_chief(strategy)
  run = rundir.RunDir(config.workdir)
  if chief:
    # Also before any data is read: a read-only --workdir fails in a second.
    fileio.check_output_dir(config.workdir)
  plan = subsets.run_plan(config.data_settings())
  _check_batch(config, strategy, plan)
  steps_per_epoch = (config.steps_per_epoch or
                     plan.train.num_examples // config.batch_size)
  val_steps = 0
  if plan.val is not None:
    val_steps = config.val_steps or pipeline.eval_steps(plan.val,
                                                        config.batch_size)
  learning_rate = config.learning_rate or models.default_learning_rate(
      config.model)
  trainer = steps.Trainer(config, strategy, learning_rate, steps_per_epoch,
                          jit)
  derived = {
      "num_params": int(trainer.model.count_params()),
      "image_shape": list(features.IMAGE_SHAPE),
      "learning_rate": learning_rate, "steps_per_epoch": steps_per_epoch,
      "val_steps": val_steps,
      "runtime": runtime.describe(strategy, jit, precision),
      "data": {"train": plan.train.summary(),
               "val": plan.val.summary() if plan.val else None},
  }
  write_dir = runtime.worker_write_dir(config.workdir, strategy)
  latest, latest_saver, best_saver = checkpoints.open_run(
      trainer, run, {**config.to_dict(), **derived}, chief,
      None if chief else write_dir, config.epochs,
      budgeted=schedule.budget_active(config.time_budget_min, config.epochs,
                                      config.warmup_epochs))
  if chief:
    artifacts.start_run_dir(run, flags_text, {**config.to_dict(), **derived})
  _log_start(config, plan, trainer, derived, latest, jit, precision)
  start_epoch = int(trainer.epoch.numpy())
  r = _Run(
      config=config, strategy=strategy, trainer=trainer, plan=plan, run=run,
      chief=chief, write_dir=write_dir, steps_per_epoch=steps_per_epoch,
      val_steps=val_steps, learning_rate=learning_rate,
      num_params=derived["num_params"], latest_saver=latest_saver,
      best_saver=best_saver, start_epoch=start_epoch,
      start_step=int(trainer.step.numpy()),
      history=[row for row in rundir.read_history(run.workdir)
               if int(row["epoch"]) <= start_epoch] if latest else [])
  _open_datasets(r)
  return r


def _log_start(config, plan, trainer, derived, latest, jit, precision):
  logging.info("model %s: %d parameters; %d steps/epoch of %d images; "
               "%d validation steps; jit_compile=%s; mixed_precision=%s; "
               "oneDNN=%s; %s",
               config.model, derived["num_params"],
               derived["steps_per_epoch"], config.batch_size,
               derived["val_steps"], jit, precision,
               derived["runtime"]["onednn"], derived["runtime"]["strategy"])
  logging.info("train: %s", plan.train.summary())
  if plan.val:
    logging.info("val: %s", plan.val.summary())
  if latest:
    logging.info("resumed from %s: %d epoch(s) and %d step(s) done", latest,
                 int(trainer.epoch.numpy()), int(trainer.step.numpy()))


def _open_datasets(r: _Run) -> None:
  """The distributed train iterator, validation set and summary writer."""
  config, plan = r.config, r.plan
  global_batch = config.batch_size
  # A fresh data stream per (re)start, seeded by where training stands.
  stream_seed = config.seed + 1_000_003 * r.start_step
  train_ds = r.strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.train_dataset(
          plan.train, ctx.get_per_replica_batch_size(global_batch),
          seed=stream_seed, input_context=ctx, cache=config.cache,
          shuffle_blocks=config.shuffle_blocks, mix_size=config.mix_size))
  if plan.val is not None:
    r.val_ds = r.strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.eval_dataset(
            plan.val, ctx.get_per_replica_batch_size(global_batch),
            steps=r.val_steps, input_context=ctx))
  r.train_iter = iter(train_ds)
  if r.chief and config.tensorboard:
    r.tb_writer = tf.summary.create_file_writer(r.run.tensorboard)


def _epoch_steps(r: _Run, epoch: int) -> tuple[int, int]:
  """(the run's epochs as planned now, this epoch's steps).

  Whole epochs, but a time budget's last epoch may be shorter.
  """
  total_steps = r.total_steps()
  num_epochs = -(-total_steps // r.steps_per_epoch)
  return num_epochs, min(r.steps_per_epoch,
                         total_steps - epoch * r.steps_per_epoch)


def _train_epoch(r: _Run, epoch: int) -> tuple[dict, int, float]:
  """Trains one epoch (the rest of it after a mid-epoch resume).

  Returns:
    (the epoch's row with the training metrics, steps trained now, seconds).

  Raises:
    TrainingDiverged: the epoch's training loss is not finite.
  """
  config, trainer = r.config, r.trainer
  num_epochs, epoch_steps = _epoch_steps(r, epoch)
  trainer.train_metrics.reset()
  done = (r.start_step - epoch * r.steps_per_epoch
          if epoch == r.start_epoch else 0)
  done = min(max(done, 0), epoch_steps)
  bar = progress.bar(total=epoch_steps, desc=f"epoch {epoch + 1}/"
                     f"{num_epochs}", unit="step", leave=False,
                     enabled=r.chief and not config.log_every_steps)
  bar.update(done)
  t0 = time.perf_counter()
  trained = 0
  next_log = config.log_every_steps
  every = config.checkpoint_every_steps
  while done < epoch_steps:
    n = min(config.steps_per_loop, epoch_steps - done)
    if every:
      n = min(n, every - int(trainer.step.numpy()) % every)
    trainer.train_loop(r.train_iter, tf.constant(n, tf.int64))
    done += n
    trained += n
    bar.update(n)
    if every and int(trainer.step.numpy()) % every == 0 and (
        done < epoch_steps):
      r.latest_saver.save(int(trainer.step.numpy()))
    if config.log_every_steps and trained >= next_log:
      next_log += config.log_every_steps
      _log_progress(r, epoch, done, epoch_steps, trained,
                    time.perf_counter() - t0)
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
        f"{r.learning_rate:.3g}); lower --learning_rate (or add "
        f"--warmup_epochs) and start again with a new --workdir")
  return row, trained, train_time


def _log_progress(r: _Run, epoch, done, epoch_steps, trained, elapsed):
  # Read on every worker: under multi-worker, reading a metric is a
  # collective.
  m = r.trainer.train_metrics.result()
  if r.chief:
    logging.info("epoch %d step %d/%d: loss %.4f acc %.4f auc %.4f, "
                 "%.0f img/s", epoch + 1, done, epoch_steps,
                 m["loss"], m["accuracy"], m["auc"],
                 trained * r.config.batch_size / max(elapsed, 1e-9))


def _validate(r: _Run, row: dict) -> float:
  """Adds the validation metrics to `row`; returns the seconds taken."""
  if r.val_ds is None:
    row.update({"val_loss": None, "val_accuracy": None, "val_auc": None})
    return 0.0
  t0 = time.perf_counter()
  row.update(r.trainer.evaluate(iter(r.val_ds), r.val_steps))
  return time.perf_counter() - t0


def _end_epoch(r: _Run, epoch: int, row: dict, trained: int,
               train_time: float, val_time: float) -> None:
  """Records the epoch, plans the budget, saves the best model and state."""
  config, trainer = r.config, r.trainer
  row.update({
      "epoch_time_s": train_time + val_time,
      "step_time_s": train_time / max(trained, 1),
      "images_per_s": trained * config.batch_size / max(train_time, 1e-9),
      "lr": trainer.current_lr(),
  })
  if trained:
    r.epoch_times.append(row["epoch_time_s"])
    r.step_times.append(row["step_time_s"])
  r.history.append(row)
  if r.chief:
    rundir.write_history(r.run, r.history)
    artifacts.write_summaries(r.tb_writer, row, epoch + 1)
  num_epochs, eta = _plan_and_eta(r, epoch, val_time)
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
      r.best_saver.save(epoch + 1)
      if r.chief:
        artifacts.save_keras_model(trainer.model, r.run.best_model)
  r.latest_saver.save(int(trainer.step.numpy()))


def _plan_and_eta(r: _Run, epoch: int, val_time: float) -> tuple[int, str]:
  """(the run's epochs, the ETA text) after `epoch`, planning the budget.

  A budgeted run decides at epoch decide_at at its pace, then plans again
  after every epoch but the last, at the pace of the last two; its ETA is
  the plan's own projection, so the two never disagree.
  """
  config = r.config
  num_epochs, _ = _epoch_steps(r, epoch)
  decide_at = schedule.decision_epoch(config.warmup_epochs)
  budgeted = schedule.budget_active(config.time_budget_min, config.epochs,
                                    config.warmup_epochs)
  if budgeted and epoch + 1 >= decide_at and (
      int(r.trainer.step.numpy()) < r.total_steps()):
    first = epoch + 1 == decide_at
    num_epochs, time_left = budget.fit_to_budget(
        config, r.trainer, r.history, r.step_times[-(1 if first else 2):],
        val_time, r.steps_per_epoch, first)
    return num_epochs, budget.eta_text(time_left)
  return num_epochs, budget.eta(r.epoch_times, num_epochs - epoch - 1)


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.4f}"
