"""PNG figures: training curves, ROC, confusion matrix, run comparison, EDA.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly,
never through pyplot, so no global backend or figure registry is touched
(safe in servers, threads and tests) and nothing needs a display. Every PNG
is written under a temporary name and renamed into place, so a reader never
sees a half-written plot.

Every function validates its input and raises ValueError naming what is
wrong, and returns the path it wrote.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from hcd import fileio

CLASS_NAMES = ("normal (0)", "tumour (1)")
# The label depends only on this centre square (PCam definition).
CENTRE = 32


def _figure(figsize):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=figsize, dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save_png(fig, path: str) -> str:
  """Saves a figure as PNG atomically (temporary name, then rename).

  Args:
    fig: a matplotlib Figure.
    path: destination; its parent directory is created.

  Returns:
    path.

  Raises:
    OSError: naming `path` (no space left, read-only, ...).
  """
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", bbox_inches="tight")
  return path


def _finite_rows(rows: Sequence[Mapping], key: str):
  """(epochs, values) of the rows where `key` holds a finite number."""
  xs, ys = [], []
  for r in rows:
    v = r.get(key)
    try:
      v = float(v)
    except (TypeError, ValueError):
      continue
    if math.isfinite(v):
      xs.append(float(r["epoch"]))
      ys.append(v)
  return xs, ys


def _check_rows(rows, what: str) -> list[Mapping]:
  rows = list(rows or [])
  if not rows:
    raise ValueError(f"{what}: no history rows to plot")
  for i, r in enumerate(rows):
    if not isinstance(r, Mapping) or "epoch" not in r:
      raise ValueError(f"{what}: row {i} has no 'epoch' key: {r!r}")
  return rows


def plot_history(history_rows: Sequence[Mapping], path: str,
                 title: str | None = None) -> str:
  """Plots loss, accuracy and AUC per epoch, train against validation.

  Args:
    history_rows: one dict per epoch with "epoch" and any of loss, accuracy,
      auc, val_loss, val_accuracy, val_auc (missing or NaN values are
      skipped, so a run without validation still plots).
    path: the PNG to write.
    title: optional figure title.

  Returns:
    path.

  Raises:
    ValueError: no rows, a row without "epoch", or no metric to plot.
  """
  rows = _check_rows(history_rows, "plot_history")
  panels = []
  for key, label in (("loss", "loss"), ("accuracy", "accuracy"),
                     ("auc", "ROC AUC")):
    train = _finite_rows(rows, key)
    val = _finite_rows(rows, "val_" + key)
    if train[0] or val[0]:
      panels.append((label, train, val))
  if not panels:
    raise ValueError("plot_history: rows hold none of loss, accuracy, auc, "
                     f"val_loss, val_accuracy, val_auc; keys: "
                     f"{sorted(rows[0])}")
  fig = _figure((4.2 * len(panels), 3.4))
  for i, (label, train, val) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    if train[0]:
      ax.plot(*train, "o-", label="train")
    if val[0]:
      ax.plot(*val, "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.set_title(label)
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  return save_png(fig, path)


def plot_confusion(cm_normalized, path: str, title: str = "Confusion matrix",
                   counts=None,
                   class_names: Sequence[str] = CLASS_NAMES) -> str:
  """Draws a normalised 2x2 confusion matrix as a heat map.

  Args:
    cm_normalized: 2x2 array, rows = true class, each row summing to 1
      (or 0 for a class absent from the data).
    path: the PNG to write.
    title: figure title.
    counts: optional 2x2 counts, printed under the fractions.
    class_names: names of class 0 and class 1.

  Returns:
    path.

  Raises:
    ValueError: not 2x2, not finite, values outside [0, 1], or counts of the
      wrong shape.
  """
  cm = np.asarray(cm_normalized, dtype=np.float64)
  if cm.shape != (2, 2):
    raise ValueError(f"plot_confusion: expected a 2x2 matrix, got shape "
                     f"{cm.shape}")
  if not np.isfinite(cm).all() or (cm < 0).any() or (cm > 1 + 1e-6).any():
    raise ValueError(f"plot_confusion: normalised values must be in [0, 1]; "
                     f"got {cm.tolist()} (pass counts via counts=)")
  if counts is not None:
    counts = np.asarray(counts)
    if counts.shape != (2, 2):
      raise ValueError(f"plot_confusion: counts must be 2x2, got "
                       f"{counts.shape}")
  fig = _figure((4.4, 3.8))
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(cm, cmap="Blues", vmin=0.0, vmax=1.0)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  for i in range(2):
    for j in range(2):
      text = f"{cm[i, j]:.3f}"
      if counts is not None:
        text += f"\n({int(counts[i, j])})"
      ax.text(j, i, text, ha="center", va="center",
              color="white" if cm[i, j] > 0.5 else "black")
  ax.set_xticks([0, 1], labels=list(class_names))
  ax.set_yticks([0, 1], labels=list(class_names))
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  return save_png(fig, path)


def plot_roc(y_true, y_prob, path: str, title: str = "ROC curve") -> str:
  """Draws the ROC curve with its AUC.

  Args:
    y_true: labels in {0, 1}.
    y_prob: probabilities of class 1.
    path: the PNG to write.
    title: figure title.

  Returns:
    path.

  Raises:
    ValueError: invalid inputs or only one class present (no ROC curve).
  """
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  from hcd import metrics  # pylint: disable=g-import-not-at-top
  y_true, y_prob = metrics._check(y_true, y_prob)  # pylint: disable=protected-access
  if len(np.unique(y_true)) < 2:
    raise ValueError("plot_roc: a ROC curve needs both classes in y_true")
  fpr, tpr, _ = skm.roc_curve(y_true, y_prob)
  auc = skm.roc_auc_score(y_true, y_prob)
  fig = _figure((4.6, 4.2))
  ax = fig.add_subplot(1, 1, 1)
  ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.4f}")
  ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  return save_png(fig, path)


def plot_runs_auc(runs: Mapping[str, Sequence[Mapping]], path: str,
                  key: str = "val_auc",
                  title: str = "Validation ROC AUC per epoch") -> str:
  """Overlays one metric's curve per run (by default the validation AUC).

  Args:
    runs: run name -> history rows (dicts with "epoch" and `key`).
    path: the PNG to write.
    key: the history column to plot.
    title: figure title.

  Returns:
    path.

  Raises:
    ValueError: no runs, or no run with a finite value of `key`.
  """
  if not runs:
    raise ValueError("plot_runs_auc: no runs given")
  fig = _figure((6.4, 4.2))
  ax = fig.add_subplot(1, 1, 1)
  drawn = 0
  for name, rows in runs.items():
    xs, ys = _finite_rows(_check_rows(rows, f"plot_runs_auc[{name}]"), key)
    if xs:
      ax.plot(xs, ys, "o-", label=name)
      drawn += 1
  if not drawn:
    raise ValueError(f"plot_runs_auc: no run has any value of {key!r} "
                     f"(runs: {list(runs)})")
  ax.set_xlabel("epoch")
  ax.set_ylabel(key)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  return save_png(fig, path)


def label_bar(counts: Mapping, path: str, title: str = "Label frequency",
              class_names: Sequence[str] = CLASS_NAMES) -> str:
  """Draws a bar chart of label counts, annotated with counts and shares.

  Args:
    counts: label (0/1, int or str) -> number of images.
    path: the PNG to write.
    title: figure title.
    class_names: display names of labels 0 and 1.

  Returns:
    path.

  Raises:
    ValueError: empty counts, a negative or non-integer count, or no images.
  """
  if not counts:
    raise ValueError("label_bar: no label counts given")
  items = []
  for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])):
    if isinstance(v, bool) or not float(v).is_integer() or v < 0:
      raise ValueError(f"label_bar: count for label {k!r} must be a "
                       f"non-negative integer, got {v!r}")
    items.append((str(k), int(v)))
  total = sum(v for _, v in items)
  if total == 0:
    raise ValueError("label_bar: all counts are zero")
  names = [class_names[int(k)] if k in ("0", "1") else k for k, _ in items]
  fig = _figure((4.6, 3.6))
  ax = fig.add_subplot(1, 1, 1)
  bars = ax.bar(names, [v for _, v in items], color=["tab:blue", "tab:red",
                                                     "tab:grey"][:len(items)])
  for bar, (_, v) in zip(bars, items):
    ax.annotate(f"{v:,}\n({v / total:.1%})",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom")
  ax.set_ylabel("images")
  ax.set_ylim(0, max(v for _, v in items) * 1.25)
  ax.set_title(title)
  return save_png(fig, path)


def sample_grid(images, path: str, labels: Sequence[int] | None = None,
                captions: Sequence[str] | None = None, ncols: int = 8,
                box: int | None = CENTRE, title: str | None = None,
                class_names: Sequence[str] = CLASS_NAMES) -> str:
  """Draws a grid of patches, each titled with its class, centre box drawn.

  Over 60 lines only for documenting each argument.

  Args:
    images: uint8 [n, H, W, 3] (n >= 1).
    path: the PNG to write.
    labels: optional n labels (0, 1, or -1 for unknown) shown as class names;
      the box is drawn green for 0 and red for 1.
    captions: optional n extra caption lines (e.g. scanner flags).
    ncols: images per row.
    box: side of the centre square to outline (None: no box).
    title: figure title.
    class_names: names of class 0 and class 1.

  Returns:
    path.

  Raises:
    ValueError: wrong image shape/dtype, or labels/captions of the wrong
      length.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
    raise ValueError(f"sample_grid: images must be [n>0, H, W, 3], got shape "
                     f"{images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"sample_grid: images must be uint8, got {images.dtype}")
  n, h, w = images.shape[:3]
  for name, seq in (("labels", labels), ("captions", captions)):
    if seq is not None and len(seq) != n:
      raise ValueError(f"sample_grid: {len(seq)} {name} for {n} images")
  if ncols < 1:
    raise ValueError(f"sample_grid: ncols must be >= 1, got {ncols}")
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top
  ncols = min(ncols, n)
  nrows = math.ceil(n / ncols)
  fig = _figure((1.6 * ncols, 1.9 * nrows + (0.4 if title else 0)))
  for i in range(n):
    ax = fig.add_subplot(nrows, ncols, i + 1)
    ax.imshow(images[i], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    lines = []
    color = "yellow"
    if labels is not None:
      lab = int(labels[i])
      lines.append(class_names[lab] if lab in (0, 1) else "unlabelled")
      color = {0: "lime", 1: "red"}.get(lab, "yellow")
    if captions is not None and captions[i]:
      lines.append(str(captions[i]))
    if lines:
      ax.set_title("\n".join(lines), fontsize=7)
    if box:
      ax.add_patch(Rectangle(((w - box) / 2 - 0.5, (h - box) / 2 - 0.5), box,
                             box, fill=False, edgecolor=color, lw=1.2))
  if title:
    fig.suptitle(title)
  return save_png(fig, path)
