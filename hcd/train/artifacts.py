"""The run-directory writers that need Keras or matplotlib.

Names, paths and the TensorFlow-free readers and writers of a run directory
(JSON, CSV, history, predictions) live in hcd/rundir.py; this module adds
only what needs the heavy libraries: saving a Keras model and drawing the
plots with metrics.json. Each file is written under a temporary name and
renamed into place (hcd.fileio.atomic_path).
"""

from __future__ import annotations

import os
from typing import Sequence

from hcd import fileio
from hcd import rundir


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
