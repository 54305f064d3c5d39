"""Checkpoints and resume: which run a directory holds, and restoring it.

A run directory is resumed by whatever run is started on it, so this module
guards it twice:

  * `check_resumable`: a directory that holds a `config.json` belongs to the
    run that wrote it. Another run (other model, data, fold, schedule, ...)
    is refused before anything is written, whatever state `checkpoints/` is
    in: a missing or damaged checkpoint index must never turn into a silent
    fresh start that overwrites another model's results.
  * `restore_latest`: restores the newest checkpoint that restores cleanly.
    The index (`checkpoints/checkpoint`, TensorFlow's CheckpointState) is
    read first; when it is missing, empty or unreadable while checkpoint
    files exist, the checkpoints are found by listing their `.index` files,
    the newest intact one is restored and the index is written again, so
    that the CheckpointManager keeps pruning the old ones.

`Saver` writes checkpoints (latest or best), under multi-worker training
through the non-chief workers' scratch directories.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from absl import logging
import tensorflow as tf

from hcd import rundir
from hcd.train.config import BOOKKEEPING_KEYS
from hcd.train.config import ConfigError

# config.json entries that may differ when a run is resumed: the
# bookkeeping, the devices it runs on, and `epochs` (a finished run resumed
# with more epochs trains on). Everything else (model, data, fold, the rest
# of the schedule, augmentation, seeds) must be the checkpoint's own.
RESUME_FREE_KEYS = BOOKKEEPING_KEYS | {
    "epochs", "strategy", "cpu_logical_devices", "jit_compile", "cache"}

# The CheckpointManager's file names: <prefix>-<number>.index beside
# <prefix>-<number>.data-NNNNN-of-NNNNN, and the index file "checkpoint".
_PREFIX = "ckpt"
_INDEX_FILE = "checkpoint"
_CKPT_INDEX_RE = re.compile(rf"^{_PREFIX}-(\d+)\.index$")


def first_line(e: BaseException) -> str:
  """`Type: first line of the message` of an exception."""
  text = str(getattr(e, "message", None) or e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def listed_checkpoints(directory: str) -> list[str]:
  """The checkpoints in `directory` by their files, oldest first.

  Args:
    directory: a checkpoints directory (not searched recursively, so
      `checkpoints/best/` is not part of `checkpoints/`).

  Returns:
    Checkpoint prefixes (`<directory>/ckpt-<n>`), by number.
  """
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  numbers = sorted(int(m.group(1)) for m in map(_CKPT_INDEX_RE.match, names)
                   if m)
  return [os.path.join(directory, f"{_PREFIX}-{n}") for n in numbers]


def _read_index(directory: str):
  """TensorFlow's CheckpointState of `directory`, and why it is unusable.

  Returns:
    (state, problem): the state when the index names a checkpoint, else
    None; `problem` says what is wrong with the index when checkpoint files
    exist without a usable one (None when all is well or there is nothing).
  """
  try:
    state = tf.train.get_checkpoint_state(directory)
  # A 0-byte index raises ValueError ("Invalid checkpoint state"); an
  # unparsable one is logged by TensorFlow and returned as None.
  except (ValueError, tf.errors.OpError) as e:
    state, why = None, first_line(e)
  else:
    why = "cannot be parsed"
  if state is not None and state.model_checkpoint_path:
    return state, None
  if not listed_checkpoints(directory):
    return None, None
  path = os.path.join(directory, _INDEX_FILE)
  if not os.path.exists(path):
    return None, f"its index {path} is missing"
  if os.path.getsize(path) == 0:
    return None, f"its index {path} is empty"
  return None, f"its index {path} {why}"


def rewrite_index(directory: str, newest: str) -> None:
  """Writes the index of `directory` again from its checkpoint files.

  Every listed checkpoint up to `newest` is entered with its file time, so
  that a CheckpointManager created afterwards prunes them as usual. Newer
  ones (which did not restore) are left out of it but kept on disk: the run
  continues from `newest` and saves over their numbers.

  Args:
    directory: the checkpoints directory.
    newest: the prefix of the checkpoint the run resumes from.
  """
  listed = listed_checkpoints(directory)
  keep = listed[:listed.index(newest) + 1]
  # Relative paths, as the CheckpointManager writes them (a moved run
  # directory still resumes).
  tf.compat.v1.train.update_checkpoint_state(
      directory, os.path.basename(newest),
      [os.path.basename(p) for p in keep],
      all_model_checkpoint_timestamps=[
          os.path.getmtime(p + ".index") for p in keep])


def _candidates(directory: str) -> tuple[list[str], str | None]:
  """Checkpoints to try (newest last), and what is wrong with the index."""
  state, problem = _read_index(directory)
  if state is None:
    return listed_checkpoints(directory), problem
  paths = list(state.all_model_checkpoint_paths)
  if state.model_checkpoint_path not in paths:
    paths.append(state.model_checkpoint_path)
  return paths, None


def restore_latest(checkpoint, directory: str,
                   repair: bool = True) -> str | None:
  """Restores the newest checkpoint of `directory` that restores cleanly.

  The CheckpointManager keeps the two newest checkpoints. When the newest
  cannot be read back (e.g. its .data file was cut short by a full disk or a
  crash of the machine), the run falls back to the one before and logs one
  line saying which and why, instead of losing the run. When the index is
  missing or damaged, the checkpoints are found by their files.

  Args:
    checkpoint: the tf.train.Checkpoint to restore into.
    directory: the checkpoints directory.
    repair: write the index again when it was missing or damaged (the
      chief does; other workers only read).

  Returns:
    The restored checkpoint's path, or None when there is no checkpoint.

  Raises:
    ConfigError: checkpoints exist but none restores; names the directory
      and the remedy.
  """
  paths, problem = _candidates(directory)
  if not paths:
    return None
  failed = []
  for path in reversed(paths):  # Newest first.
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
    # A damaged file raises IndexError, DataLossError, NotFoundError, ...;
    # another model's checkpoint raises ValueError or AssertionError. Either
    # way the older checkpoint is the one to try.
    except Exception as e:  # pylint: disable=broad-except
      failed.append((path, first_line(e)))
      continue
    if failed:
      logging.warning("checkpoint %s does not restore (%s); fell back to the "
                      "previous checkpoint, %s", *failed[0], path)
    if problem:
      logging.warning("%s: %s; resumed from the newest checkpoint that "
                      "restores, %s, found by listing the files", directory,
                      problem, os.path.basename(path))
      if repair:
        rewrite_index(directory, path)
    return path
  reasons = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in failed)
  index = f"{problem}; " if problem else ""
  raise ConfigError(
      f"{directory}: {index}no checkpoint restores ({reasons}); were they "
      f"written by another model or config, or damaged? Use a new --workdir, "
      f"or delete {directory} to train this run from the start")


def check_resumable(run: rundir.RunDir, new_config: dict) -> None:
  """Refuses a run directory that holds another run.

  Why: a run directory is resumed whatever the flags say, so the same
  --workdir with, e.g., another --fold would continue the first fold's model,
  score it on images it trained on and write the results over the first
  fold's; and a directory whose checkpoints cannot be read must not be
  trained over from scratch by another model. So a directory holding a
  `config.json` is compared with it whatever `checkpoints/` holds. Settings
  missing from the old config.json (written by an older hcd) are not
  compared.

  Args:
    run: the run directory.
    new_config: the config.json this run would write.

  Raises:
    ConfigError: the directory's run differs; names the settings (old and
      new values) and the remedies. Or its config.json cannot be read.
  """
  try:
    old = rundir.read_json(run.config)
  except FileNotFoundError:
    if listed_checkpoints(run.checkpoints):
      logging.warning("%s has a checkpoint but no %s: resuming without "
                      "checking its settings", run.workdir, rundir.CONFIG_FILE)
    return
  except (OSError, ValueError) as e:
    raise ConfigError(
        f"{run.config}: cannot be read ({first_line(e)}), so the run this "
        f"directory holds is unknown; pass a new --workdir, or delete "
        f"{run.workdir} to start over") from None
  if not isinstance(old, dict):
    raise ConfigError(f"{run.config}: not a JSON object; pass a new "
                      f"--workdir, or delete {run.workdir} to start over")
  # Through JSON, as config.json holds it (tuples become lists).
  new = json.loads(json.dumps(new_config))
  differ = [f"{k}: {json.dumps(old[k])} there, {json.dumps(new[k])} now"
            for k in sorted(set(old) & set(new))
            if k not in RESUME_FREE_KEYS and old[k] != new[k]]
  if differ:
    raise ConfigError(
        f"{run.workdir} holds another run ({rundir.CONFIG_FILE}), which this "
        f"one would resume or overwrite: {'; '.join(differ)}. Pass a new "
        f"--workdir, rerun with the settings of its {rundir.FLAGS_FILE}, or "
        f"delete {run.workdir} to start over")


def check_not_past_end(run: rundir.RunDir, done_epochs: int, done_steps: int,
                       total_steps: int, epochs: int) -> None:
  """Refuses to end a run at fewer steps than its checkpoint already has.

  A finished 2-epoch run started again with --epochs=1 would otherwise
  rewrite its model and metrics and a config.json saying 1 epoch beside a
  history of 2.

  Raises:
    ConfigError: naming the run, its epochs and the remedies.
  """
  if done_steps > total_steps:
    raise ConfigError(
        f"{run.workdir} has trained {done_epochs} epoch(s) ({done_steps} "
        f"steps), more than this run's {epochs} epoch(s) ({total_steps} "
        f"steps); pass --epochs={done_epochs} or more to resume it, or a new "
        f"--workdir")


class Saver:
  """Saves one kind of checkpoint (latest or best).

  Under multi-worker every worker must take part in a save; the chief keeps
  its checkpoints, the others write to their temporary directory, which is
  then deleted (the Keras/TF convention).
  """

  def __init__(self, checkpoint, directory: str, temp_dir: str | None,
               max_to_keep: int):
    self._checkpoint = checkpoint
    self._temp_dir = temp_dir
    self._directory = directory
    self._max_to_keep = max_to_keep
    self._manager = None

  def save(self, number: int) -> None:
    if self._temp_dir:
      os.makedirs(self._temp_dir, exist_ok=True)
      self._checkpoint.write(os.path.join(self._temp_dir, "ckpt"))
      shutil.rmtree(self._temp_dir, ignore_errors=True)
      return
    if self._manager is None:
      _, problem = _read_index(self._directory)
      if problem:
        # The manager cannot start on a damaged index (an empty one raises);
        # rebuilt from the files, the old checkpoints are still pruned.
        logging.warning("%s: %s; written again from the checkpoint files",
                        self._directory, problem)
        rewrite_index(self._directory,
                      listed_checkpoints(self._directory)[-1])
      self._manager = tf.train.CheckpointManager(
          self._checkpoint, self._directory, max_to_keep=self._max_to_keep,
          checkpoint_name=_PREFIX)
    self._manager.save(checkpoint_number=number)


def run_checkpoints(trainer, budgeted: bool):
  """(the run checkpoint, the best-model checkpoint) of a Trainer.

  The run checkpoint holds everything a resumed run needs: the model, the
  optimizer, the epoch and step counters, the best AUC and its epoch, the
  weight EMA and, with a time budget, the planned length and where the
  cosine stands and ends (so a resumed run anneals as planned).

  Args:
    trainer: a hcd.train.steps.Trainer.
    budgeted: whether the run has an active time budget.
  """
  from hcd.train import schedule  # pylint: disable=g-import-not-at-top
  ckpt = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer,
                             epoch=trainer.epoch, step=trainer.step,
                             best_auc=trainer.best_auc,
                             best_epoch=trainer.best_epoch)
  if trainer.ema:
    ckpt.ema = trainer.ema.averages
  if budgeted:
    ckpt.total_steps = trainer.total_steps
    if isinstance(trainer.lr_schedule, schedule.HeldCosineDecay):
      ckpt.lr_plan = tf.train.Checkpoint(**trainer.lr_schedule.variables)
  best = tf.train.Checkpoint(model=trainer.model, epoch=trainer.epoch,
                             best_auc=trainer.best_auc)
  return ckpt, best


def open_run(trainer, run: rundir.RunDir, run_config: dict, chief: bool,
             temp_dir: str | None, epochs: int, budgeted: bool):
  """Checks a run directory, restores its newest checkpoint, makes savers.

  Nothing is written: a directory holding another run, or a run already
  past its end, is refused as it is.

  Args:
    trainer: a hcd.train.steps.Trainer (restored in place).
    run: the run directory.
    run_config: the config.json the run will write (config and derived).
    chief: whether this worker writes the run's files (and may repair a
      damaged checkpoint index).
    temp_dir: a non-chief worker's scratch directory (None on the chief).
    epochs: the run's --epochs.
    budgeted: whether the run has an active time budget.

  Returns:
    (the restored checkpoint's path or None, the latest Saver, the best
    Saver).

  Raises:
    ConfigError: another run's directory, checkpoints of which none
      restores, or a finished run asked to train past its end.
  """
  # Before the run writes the new config.json over the old one.
  check_resumable(run, run_config)
  ckpt, best = run_checkpoints(trainer, budgeted)
  # Every worker restores the chief's checkpoint (a shared filesystem),
  # and before anything is written, so that a run it cannot continue
  # leaves the directory as it was.
  latest = restore_latest(ckpt, run.checkpoints, repair=chief)
  if latest:
    check_not_past_end(
        run, int(trainer.epoch.numpy()), int(trainer.step.numpy()),
        int(trainer.total_steps.numpy()), epochs)
  return (latest, Saver(ckpt, run.checkpoints, temp_dir, max_to_keep=2),
          Saver(best, run.best_checkpoints, temp_dir, max_to_keep=1))
