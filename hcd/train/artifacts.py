"""What a training run writes into its run directory, and when.

Names, paths and the TensorFlow-free readers and writers of a run directory
(JSON, CSV, history, predictions) live in hcd/rundir.py; this module writes
a training run's files: the directory itself with flags.txt and config.json
once every check has passed (`start_run_dir`), TensorBoard summaries per
epoch, Keras models, and at the end model.keras, the validation
predictions, metrics.json and the plots (`finish_run`). Each file is
written under a temporary name and renamed into place
(hcd.fileio.atomic_path).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import logging
import numpy as np

from hcd import fileio
from hcd import rundir
from hcd.data import pipeline
from hcd.train import runtime


def save_keras_model(model, path: str) -> None:
  """Saves a Keras model atomically (Keras insists on a .keras suffix).

  Custom layers are first replaced by standard ones computing the same
  (hcd.models.standard_model), so the file loads in safe mode without hcd.

  Raises:
    OSError: naming `path` (no space left, read-only, ...).
  """
  from hcd import models  # pylint: disable=g-import-not-at-top
  with fileio.atomic_path(path, ".keras") as tmp:
    models.standard_model(model).save(tmp)


def write_plots_and_metrics(run: rundir.RunDir, history: Sequence[dict],
                            y_true, y_prob, extra: dict) -> dict:
  """Writes metrics.json and the two plots from validation predictions.

  Args:
    run: the run directory.
    history: the epoch rows.
    y_true: validation labels (None without validation).
    y_prob: the final model's probabilities.
    extra: entries merged into metrics.json (best_epoch, timings, ...).

  Returns:
    The metrics dict that was written.
  """
  from hcd import metrics as hcd_metrics  # pylint: disable=g-import-not-at-top
  from hcd import plots  # pylint: disable=g-import-not-at-top
  if history:
    plots.plot_history(history, run.metrics_plot,
                       title=os.path.basename(os.path.normpath(run.workdir)))
  result = {}
  if y_true is not None and len(y_true):
    result = hcd_metrics.binary_metrics(y_true, y_prob)
    plots.plot_confusion(result["confusion_matrix_normalized"],
                         run.confusion_plot,
                         title="Validation confusion matrix (normalised)",
                         counts=result["confusion_matrix"])
  result.update(extra)
  rundir.write_json(run.metrics, result)
  return result


def start_run_dir(run: rundir.RunDir, flags_text: str | None,
                  config: dict) -> None:
  """Creates the run directory, cleans it, writes flags.txt and config.json.

  Called once the run has passed every check, so a run that fails them
  leaves nothing behind; if these first writes fail (no space left), the
  directories this call created are removed again.

  Args:
    run: the run directory.
    flags_text: the resolved flags (None: no flags.txt).
    config: config.json's content.
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


def write_summaries(writer, row: dict, step: int) -> None:
  """Writes an epoch's row as TensorBoard scalars (no-op without a writer).

  Args:
    writer: a tf.summary writer, or None.
    row: the epoch's history row.
    step: the TensorBoard step (the epoch number).
  """
  if writer is None:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
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


def finish_run(config, trainer, plan, run: rundir.RunDir, chief: bool,
               history: list, epoch_times: list, step_times: list,
               num_params: int, write_dir: str) -> dict[str, Any]:
  """Final artifacts: model.keras, predictions, metrics.json, plots.

  Over 60 lines only for documenting each argument.

  Args:
    config: the run's TrainConfig.
    trainer: its hcd.train.steps.Trainer, trained.
    plan: its hcd.data.subsets.DataPlan.
    run: the run directory.
    chief: whether this worker writes the files.
    history: every epoch's row.
    epoch_times, step_times: the timings of the epochs trained in this
      process (empty: taken from the history).
    num_params: the model's parameter count.
    write_dir: this worker's write directory (removed on non-chiefs).

  Returns:
    metrics.json's content on the chief, {"weights_sha256"} elsewhere.
  """
  # The final model is the averaged one when EMA is on (the checkpoint
  # keeps both, so a restarted run gets here with the same weights).
  trainer.use_averaged_weights()
  digest = trainer.weights_digest()
  logging.info("final weights sha256 %s", digest)
  if not chief:
    runtime.barrier(trainer.strategy)  # Wait for the chief's writes.
    runtime.remove_worker_dir(write_dir, config.workdir)
    return {"weights_sha256": digest}
  save_keras_model(trainer.model, run.model)
  best_epoch = int(trainer.best_epoch.numpy())
  if plan.val is None or best_epoch == 0:
    save_keras_model(trainer.model, run.best_model)
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
      "time_per_epoch_s": _median(epoch_times),
      "time_per_step_s": _median(step_times),
      "images_per_s": _median([r["images_per_s"] for r in history]),
      "total_train_time_s": float(sum(r.get("epoch_time_s") or 0
                                      for r in history)),
      "num_params": num_params,
      "weights_sha256": digest,
  }
  result = write_plots_and_metrics(run, history, y_true, y_prob, extra)
  runtime.barrier(trainer.strategy)
  roc_auc = result.get("roc_auc")
  logging.info("wrote %s: val AUC %s, best epoch %d", config.workdir,
               "-" if roc_auc is None else f"{roc_auc:.4f}", best_epoch)
  return result


def _median(values) -> float | None:
  return float(np.median(values)) if len(values) else None
