"""The run directory (`hcd_train --workdir`): its names, paths, readers, writers.

hcd_train writes a run directory; hcd_evaluate, hcd_predict and hcd_report
read it. Every file name of that contract is spelled here and nowhere else,
with the code that reads and writes the JSON and CSV files, picks the model
file (best or final), reads a run for the report and cleans up what a killed
run left behind. WORKSPACE.md ("Run directory") documents the same layout.

Why a top-level module (not hcd/train/artifacts.py or hcd/eval/runs.py, where
the names used to be typed twice): both the training and the evaluation
packages use it, and neither should import the other for it. It imports no
TensorFlow, Keras or matplotlib, so reading runs (hcd_report, tools) stays
fast; the writers that need those (saving a Keras model, drawing the plots)
live in hcd/train/artifacts.py and take their paths from here.

Layout:

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
  eval/                  hcd_evaluate's default output (EvalDir)

Every file is written under a temporary name and renamed into place
(hcd.fileio), so a killed run never leaves a truncated file under a final
name; `remove_stale_temp` deletes the temporary leftovers on the next run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from hcd import fileio

FLAGS_FILE = "flags.txt"
CONFIG_FILE = "config.json"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_CHECKPOINTS_DIR = "best"  # Inside CHECKPOINTS_DIR.
MODEL_FILE = "model.keras"
BEST_MODEL_FILE = "best.keras"
PLOTS_DIR = "plots"
METRICS_PLOT = "metrics.png"
CONFUSION_PLOT = "confusion_matrix.png"
VAL_PREDICTIONS = "val_predictions.csv"
METRICS_FILE = "metrics.json"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
# A non-chief worker's scratch checkpoints: workertemp_<task type>_<index>.
WORKER_TEMP_PREFIX = "workertemp_"
# hcd_evaluate's outputs, in <workdir>/eval or its --out_dir.
EVAL_METRICS = "metrics.json"
EVAL_ROC_PLOT = "roc.png"
EVAL_CONFUSION_PLOT = "confusion_matrix.png"
EVAL_PREDICTIONS = "predictions.csv"
EVAL_RESTAIN_PLOT = "restain.png"  # hcd_evaluate --restain_to's examples.

# --model=best|final -> file in the run directory.
MODEL_FILES = {"best": BEST_MODEL_FILE, "final": MODEL_FILE}

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "auc", "val_loss",
                   "val_accuracy", "val_auc", "epoch_time_s", "step_time_s",
                   "images_per_s", "lr")

# Temporary names TensorFlow gives checkpoint files while it writes them:
# Checkpoint.write builds `<prefix>_temp/part-*` and renames the parts, and
# the `checkpoint` state file is written as `checkpoint.tmp<uuid hex>`. A
# killed save leaves them behind.
_TF_TEMP_DIR_RE = re.compile(r"_temp$")
_TF_TEMP_FILE_RE = re.compile(r"\.tmp[0-9a-f]{32}$")


class RunError(ValueError):
  """A missing or unusable run directory or model; names the path."""


class RunDir:
  """Paths of one run directory."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.flags = os.path.join(workdir, FLAGS_FILE)
    self.config = os.path.join(workdir, CONFIG_FILE)
    self.history_csv = os.path.join(workdir, HISTORY_CSV)
    self.history_json = os.path.join(workdir, HISTORY_JSON)
    self.checkpoints = os.path.join(workdir, CHECKPOINTS_DIR)
    self.best_checkpoints = os.path.join(self.checkpoints,
                                         BEST_CHECKPOINTS_DIR)
    self.model = os.path.join(workdir, MODEL_FILE)
    self.best_model = os.path.join(workdir, BEST_MODEL_FILE)
    self.plots = os.path.join(workdir, PLOTS_DIR)
    self.metrics_plot = os.path.join(self.plots, METRICS_PLOT)
    self.confusion_plot = os.path.join(self.plots, CONFUSION_PLOT)
    self.val_predictions = os.path.join(workdir, VAL_PREDICTIONS)
    self.metrics = os.path.join(workdir, METRICS_FILE)
    self.tensorboard = os.path.join(workdir, TENSORBOARD_DIR)
    self.eval = os.path.join(workdir, EVAL_DIR)

  def worker_temp(self, task_type: str, task_id: int) -> str:
    """A non-chief worker's scratch directory for its checkpoint writes."""
    return os.path.join(self.workdir,
                        f"{WORKER_TEMP_PREFIX}{task_type}_{task_id}")

  def remove_stale_temp(self) -> list[str]:
    """Deletes what killed writers left in the run directory.

    That is hcd's `*.tmp-<pid>` files of processes that are gone, the
    `*_temp/` directories and `checkpoint.tmp<hex>` files of interrupted
    TensorFlow checkpoint saves, and non-chief workers' scratch directories.
    Only the chief calls this, at the start of a run, before any save.

    Returns:
      The removed paths.
    """
    stale = []
    for root in (self.checkpoints, self.best_checkpoints):
      for name in _listdir(root):
        path = os.path.join(root, name)
        if (os.path.isdir(path) and _TF_TEMP_DIR_RE.search(name) or
            os.path.isfile(path) and _TF_TEMP_FILE_RE.search(name)):
          stale.append(path)
    stale += [os.path.join(self.workdir, name)
              for name in _listdir(self.workdir)
              if name.startswith(WORKER_TEMP_PREFIX)]
    for path in stale:
      fileio.remove_path(path)
    return fileio.remove_stale_tmp(self.workdir, recursive=True) + stale


def _listdir(path: str) -> list[str]:
  return os.listdir(path) if os.path.isdir(path) else []


class EvalDir:
  """Paths of hcd_evaluate's output directory (default `<workdir>/eval`)."""

  def __init__(self, out_dir: str):
    self.out_dir = out_dir
    self.metrics = os.path.join(out_dir, EVAL_METRICS)
    self.roc_plot = os.path.join(out_dir, EVAL_ROC_PLOT)
    self.confusion_plot = os.path.join(out_dir, EVAL_CONFUSION_PLOT)
    self.predictions = os.path.join(out_dir, EVAL_PREDICTIONS)
    self.restain_plot = os.path.join(out_dir, EVAL_RESTAIN_PLOT)


# ----------------------------------------------------------------------------
# Writers.


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
  """Writes JSON atomically (NaN -> null, numpy values as Python ones).

  Raises:
    OSError: naming `path` (see hcd.fileio.atomic_write_text).
  """
  fileio.atomic_write_text(path, json.dumps(_clean(obj), indent=1,
                                            sort_keys=True,
                                            default=_json_default) + "\n")


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
  fileio.atomic_write_text(run.history_csv, buf.getvalue())


def write_predictions(path: str, ids: Sequence[str], labels, probs) -> str:
  """Writes `id,label,prob` rows atomically (probabilities never rounded).

  The format of val_predictions.csv and of hcd_evaluate's predictions.csv;
  ids are quoted where a CSV needs it (they are file names).

  Returns:
    path.
  """
  fileio.atomic_write_csv(path, [("id", "label", "prob")] + [
      (i, int(l), repr(float(p))) for i, l, p in zip(ids, labels, probs)])
  return path


# ----------------------------------------------------------------------------
# Readers.


@dataclasses.dataclass
class Run:
  """What a run directory records (missing parts are empty)."""
  workdir: str
  config: dict[str, Any]
  history: list[dict[str, Any]]
  metrics: dict[str, Any]


def read_json(path: str):
  """Reads a JSON file of a run.

  Raises:
    RunError: invalid JSON, naming the file.
    OSError: the file cannot be read.
  """
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise RunError(f"{path}: invalid JSON: {e}") from None


def read_predictions(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Reads an `id,label,prob` file (see `write_predictions`).

  Returns:
    (ids, int64 labels, float64 probabilities); empty when the file is
    missing.

  Raises:
    RunError: a file that is not id,label,prob, naming it (and the line of
      a bad row).
  """
  # Late import: hcd.data pulls in the image codecs, which most users of
  # this module (reports, plots) never need.
  from hcd.data import sources  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    return [], np.zeros(0, np.int64), np.zeros(0)
  columns = ("id", "label", "prob")
  ids, labels, probs = [], [], []
  with sources.open_csv(path, columns, "predictions CSV",
                        error=RunError) as (reader, header):
    # An id is kept exactly as written, spaces and all.
    for line, (i, label, prob) in sources.cells(
        reader, *(header.index(c) for c in columns), strip=False):
      try:
        labels.append(int(label))
        probs.append(float(prob))
      except ValueError:
        raise RunError(f"{path}:{line}: not an id,label,prob row: "
                       f"label {label!r}, prob {prob!r}") from None
      ids.append(i)
  return ids, np.array(labels, np.int64), np.array(probs, np.float64)


def _number(v):
  """CSV cell -> int/float/None, leaving other strings alone."""
  if v is None or v == "":
    return None
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(
      v).lower() else f


def _history_rows(obj, path: str) -> list[dict[str, Any]]:
  # Accept rows, {"history": rows} and Keras-style {"metric": [values]}.
  if isinstance(obj, dict) and isinstance(obj.get("history"), list):
    obj = obj["history"]
  if isinstance(obj, dict):
    n = {len(v) for v in obj.values() if isinstance(v, list)}
    if len(n) != 1:
      raise RunError(f"{path}: history columns have unequal lengths")
    rows = [{k: v[i] for k, v in obj.items()} for i in range(n.pop())]
    for i, r in enumerate(rows):
      r.setdefault("epoch", i + 1)
    return rows
  if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
    return obj
  raise RunError(f"{path}: expected a list of per-epoch rows")


def _require_dir(workdir: str) -> None:
  if not os.path.isdir(workdir):
    raise RunError(f"{workdir}: run directory does not exist")


def read_config(workdir: str) -> dict[str, Any]:
  """Returns a run's config.json ({} when it has none).

  Raises:
    RunError: missing run directory or invalid JSON.
  """
  _require_dir(workdir)
  path = RunDir(workdir).config
  return read_json(path) if os.path.isfile(path) else {}


def read_history(workdir: str) -> list[dict[str, Any]]:
  """Reads a run's per-epoch history (history.json, else history.csv).

  Returns:
    One dict per epoch ([] when the run has no history file).

  Raises:
    RunError: a history file that cannot be parsed.
  """
  run = RunDir(workdir)
  if os.path.isfile(run.history_json):
    return _history_rows(read_json(run.history_json), run.history_json)
  if os.path.isfile(run.history_csv):
    with open(run.history_csv, newline="", encoding="utf-8-sig") as f:
      return [{k: _number(v) for k, v in row.items()}
              for row in csv.DictReader(f)]
  return []


def read_run(workdir: str) -> Run:
  """Reads config.json, history and metrics.json of a run directory.

  Raises:
    RunError: missing directory, a directory with none of those files, or
      an unparsable file (named).
  """
  _require_dir(workdir)
  run = RunDir(workdir)
  config = read_config(workdir)
  metrics = read_json(run.metrics) if os.path.isfile(run.metrics) else {}
  history = read_history(workdir)
  if not (config or metrics or history):
    raise RunError(f"{workdir}: not a run directory (no {CONFIG_FILE}, "
                   f"{HISTORY_CSV}/json or {METRICS_FILE})")
  return Run(workdir, config, history, metrics)


def finite(v) -> float | None:
  """Returns v as a finite float, or None."""
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


# ----------------------------------------------------------------------------
# Model files.


def model_file(workdir: str, which: str = "best") -> str:
  """Returns the path of a run's saved model.

  Args:
    workdir: the run directory.
    which: "best" (best.keras, best validation AUC) or "final" (model.keras).

  Returns:
    The existing .keras path.

  Raises:
    RunError: unknown `which`, missing run directory, or missing model file
      (the message lists the .keras files the run does have).
  """
  if which not in MODEL_FILES:
    raise RunError(f"unknown model choice {which!r}; choose one of "
                   f"{sorted(MODEL_FILES)}")
  _require_dir(workdir)
  path = os.path.join(workdir, MODEL_FILES[which])
  if not os.path.isfile(path):
    have = sorted(f for f in os.listdir(workdir) if f.endswith(".keras"))
    other = "final" if which == "best" else "best"
    if MODEL_FILES[other] in have:
      hint = f"; it has {have} (try --model={other})"
    elif have:
      hint = f"; it has {have} (pass one with --model_path)"
    else:
      hint = "; it has no .keras model (did training finish?)"
    raise RunError(f"{path}: no {which} model in run {workdir}{hint}")
  return path


def resolve_model_paths(workdirs: Sequence[str] = (),
                        model_paths: Sequence[str] = (),
                        which: str = "best") -> list[str]:
  """Resolves run directories and .keras files to a list of model files.

  Args:
    workdirs: run directories (each contributes its `which` model).
    model_paths: .keras files given directly.
    which: "best" or "final".

  Returns:
    Model paths, runs first, in the order given.

  Raises:
    RunError: nothing given, or any run/model that does not exist.
  """
  paths = [model_file(w, which) for w in workdirs]
  for p in model_paths:
    if not os.path.isfile(p):
      raise RunError(f"{p}: model file does not exist")
    if not p.endswith(".keras"):
      raise RunError(f"{p}: expected a .keras model file")
    paths.append(p)
  if not paths:
    raise RunError("no model given: pass a run directory (--workdir) or a "
                   ".keras file (--model_path)")
  return paths
