"""The files of a run directory (`--workdir`), written atomically.

Layout (the contract that hcd_evaluate, hcd_predict and hcd_report read):

  flags.txt              resolved flags: a flagfile that reproduces the run
  config.json            the TrainConfig plus what the run derived
  history.csv, .json     one row per epoch (HISTORY_COLUMNS)
  checkpoints/           tf.train.Checkpoint, latest (resume)
  checkpoints/best/      tf.train.Checkpoint of the best val-AUC epoch
  model.keras            final model (uint8 in, probability out)
  best.keras             the best val-AUC model
  plots/metrics.png      loss / accuracy / AUC, train against validation
  plots/confusion_matrix.png   normalised, validation, final model
  val_predictions.csv    id,label,prob (final model)
  metrics.json           hcd.metrics.binary_metrics of the final model on
                         validation + best_epoch, timings, num_params
  tensorboard/           TensorBoard event files

Every file is written under a temporary name and renamed into place, so a
killed run never leaves a truncated file under a final name.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Sequence

from hcd.fileio import atomic_write_text

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "auc", "val_loss",
                   "val_accuracy", "val_auc", "epoch_time_s", "step_time_s",
                   "images_per_s", "lr")


class RunDir:
  """Paths of one run directory."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.flags = os.path.join(workdir, "flags.txt")
    self.config = os.path.join(workdir, "config.json")
    self.history_csv = os.path.join(workdir, "history.csv")
    self.history_json = os.path.join(workdir, "history.json")
    self.checkpoints = os.path.join(workdir, "checkpoints")
    self.best_checkpoints = os.path.join(workdir, "checkpoints", "best")
    self.model = os.path.join(workdir, "model.keras")
    self.best_model = os.path.join(workdir, "best.keras")
    self.plots = os.path.join(workdir, "plots")
    self.metrics_plot = os.path.join(workdir, "plots", "metrics.png")
    self.confusion_plot = os.path.join(workdir, "plots",
                                       "confusion_matrix.png")
    self.val_predictions = os.path.join(workdir, "val_predictions.csv")
    self.metrics = os.path.join(workdir, "metrics.json")
    self.tensorboard = os.path.join(workdir, "tensorboard")

  def makedirs(self) -> None:
    for d in (self.workdir, self.checkpoints, self.plots, self.tensorboard):
      os.makedirs(d, exist_ok=True)


def _json_default(obj):
  if hasattr(obj, "item"):  # numpy scalars
    return obj.item()
  if hasattr(obj, "tolist"):
    return obj.tolist()
  raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _clean(value):
  """NaN/inf become None: JSON has no NaN."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  return value


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (NaN -> null)."""
  atomic_write_text(path, json.dumps(_clean(obj), indent=1, sort_keys=True,
                                     default=_json_default) + "\n")


def read_history(run: RunDir) -> list[dict]:
  """Reads history.json ([] when absent)."""
  if not os.path.exists(run.history_json):
    return []
  with open(run.history_json, encoding="utf-8") as f:
    return json.load(f)


def write_history(run: RunDir, rows: Sequence[dict]) -> None:
  """Writes history.json and history.csv (HISTORY_COLUMNS), atomically."""
  rows = [_clean(dict(r)) for r in rows]
  write_json(run.history_json, rows)
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore",
                     lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if r.get(k) is None else r.get(k))
                for k in HISTORY_COLUMNS})
  atomic_write_text(run.history_csv, buf.getvalue())


def write_predictions(path: str, ids: Sequence[str], labels, probs) -> None:
  """Writes `id,label,prob` rows atomically (probabilities, never rounded)."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["id", "label", "prob"])
  for i, l, p in zip(ids, labels, probs):
    w.writerow([i, int(l), repr(float(p))])
  atomic_write_text(path, buf.getvalue())


def save_keras_model(model, path: str) -> None:
  """Saves a Keras model atomically (Keras insists on a .keras suffix).

  Custom layers are first replaced by standard ones computing the same
  (hcd.models.standard_model), so the file loads in safe mode without hcd.
  """
  from hcd import models  # pylint: disable=g-import-not-at-top
  tmp = f"{path}.tmp-{os.getpid()}.keras"
  models.standard_model(model).save(tmp)
  os.replace(tmp, path)


def write_plots_and_metrics(run: RunDir, history: Sequence[dict],
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
  os.makedirs(run.plots, exist_ok=True)
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
  write_json(run.metrics, result)
  return result
