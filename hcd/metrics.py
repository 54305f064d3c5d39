"""Binary classification metrics for tumour probabilities (scikit-learn).

One function, `binary_metrics`, produces every number that training,
`hcd_evaluate` and `hcd_report` write, so the three never disagree about how
accuracy or AUC was computed. The result is JSON-ready (plain floats, ints,
lists; an undefined metric is None, never NaN, which JSON cannot hold).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from sklearn import metrics as skm

# Probabilities are clipped this far from 0 and 1 for the log-loss, so one
# confidently wrong prediction gives a large but finite loss.
LOG_LOSS_EPS = 1e-7

THRESHOLD_METHODS = ("youden", "accuracy")


def _check(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
  """Validates and converts labels and probabilities to flat arrays."""
  y_true = np.asarray(y_true)
  y_prob = np.asarray(y_prob, dtype=np.float64)
  if y_prob.ndim == 2 and y_prob.shape[1] == 1:
    y_prob = y_prob[:, 0]  # Model output [B, 1].
  if y_true.ndim != 1 or y_prob.ndim != 1:
    raise ValueError(f"y_true and y_prob must be 1-D (or y_prob [n, 1]); got "
                     f"shapes {y_true.shape} and {y_prob.shape}")
  if len(y_true) != len(y_prob):
    raise ValueError(f"y_true has {len(y_true)} labels but y_prob has "
                     f"{len(y_prob)} probabilities")
  if len(y_true) == 0:
    raise ValueError("no examples: y_true and y_prob are empty")
  bad = ~np.isin(y_true, (0, 1))
  if bad.any():
    idx = np.nonzero(bad)[0]
    raise ValueError(f"y_true must hold only 0 and 1; {len(idx)} other "
                     f"value(s), e.g. {y_true[idx[0]].item()!r} at index {idx[0]} "
                     f"(unlabelled examples, label -1, cannot be scored)")
  bad = ~np.isfinite(y_prob) | (y_prob < 0) | (y_prob > 1)
  if bad.any():
    idx = np.nonzero(bad)[0]
    raise ValueError(f"y_prob must be finite probabilities in [0, 1]; "
                     f"{len(idx)} bad value(s), e.g. {y_prob[idx[0]].item()!r} at "
                     f"index {idx[0]}")
  return y_true.astype(np.int64), y_prob


def _float_or_none(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def confusion_counts(y_true, y_prob, threshold: float = 0.5) -> np.ndarray:
  """Returns the 2x2 confusion matrix [[tn, fp], [fn, tp]] at a threshold.

  A probability >= threshold is predicted positive.

  Raises:
    ValueError: on invalid inputs (see `binary_metrics`).
  """
  y_true, y_prob = _check(y_true, y_prob)
  y_pred = (y_prob >= threshold).astype(np.int64)
  return skm.confusion_matrix(y_true, y_pred, labels=[0, 1])


def normalize_confusion(cm) -> np.ndarray:
  """Normalises a confusion matrix by row (true class); empty rows stay 0."""
  cm = np.asarray(cm, dtype=np.float64)
  rows = cm.sum(axis=1, keepdims=True)
  return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def choose_threshold(y_true, y_prob, method: str = "youden") -> float:
  """Chooses a decision threshold from labelled data.

  Args:
    y_true: labels in {0, 1}.
    y_prob: probabilities of class 1.
    method: "youden" maximises TPR - FPR (balanced; insensitive to the class
      ratio of the data it was chosen on); "accuracy" maximises accuracy.

  Returns:
    The threshold, a float in [0, 1].

  Raises:
    ValueError: unknown method, invalid inputs, or only one class present.
  """
  if method not in THRESHOLD_METHODS:
    raise ValueError(f"unknown threshold method {method!r}; known: "
                     f"{list(THRESHOLD_METHODS)}")
  y_true, y_prob = _check(y_true, y_prob)
  if len(np.unique(y_true)) < 2:
    raise ValueError("choosing a threshold needs both classes in y_true")
  fpr, tpr, thr = skm.roc_curve(y_true, y_prob)
  # roc_curve's first threshold is +inf (predict nothing positive).
  thr = np.clip(thr, 0.0, 1.0)
  if method == "youden":
    k = int(np.argmax(tpr - fpr))
  else:
    pos = y_true.sum()
    neg = len(y_true) - pos
    correct = tpr * pos + (1 - fpr) * neg
    k = int(np.argmax(correct))
  return float(thr[k])


def binary_metrics(y_true: Sequence[int], y_prob: Sequence[float],
                   threshold: float = 0.5) -> dict[str, Any]:
  """Computes the standard metrics of a binary probabilistic classifier.

  Args:
    y_true: labels in {0, 1}, shape [n].
    y_prob: probabilities of class 1, shape [n] or [n, 1].
    threshold: the decision threshold for `accuracy_at_threshold` (accuracy
      and the confusion matrices use 0.5 and `threshold` respectively; a
      probability >= threshold is predicted positive).

  Returns:
    A JSON-ready dict with keys roc_auc, pr_auc (average precision), accuracy
    (at 0.5), accuracy_at_threshold, threshold, log_loss, confusion_matrix
    (counts [[tn, fp], [fn, tp]] at `threshold`), confusion_matrix_normalized
    (rows sum to 1), num_examples, positive_fraction. roc_auc and pr_auc are
    None when y_true holds only one class (they are undefined).

  Raises:
    ValueError: mismatched lengths, no examples, labels other than 0/1,
      probabilities outside [0, 1] or NaN, or a threshold outside [0, 1].
  """
  y_true, y_prob = _check(y_true, y_prob)
  threshold = float(threshold)
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], got {threshold}")
  both = len(np.unique(y_true)) == 2
  cm = skm.confusion_matrix(y_true, (y_prob >= threshold).astype(np.int64),
                            labels=[0, 1])
  clipped = np.clip(y_prob, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
  return {
      "roc_auc": _float_or_none(skm.roc_auc_score(y_true, y_prob))
                 if both else None,
      "pr_auc": _float_or_none(skm.average_precision_score(y_true, y_prob))
                if both else None,
      "accuracy": float(skm.accuracy_score(y_true, y_prob >= 0.5)),
      "accuracy_at_threshold": float(
          skm.accuracy_score(y_true, y_prob >= threshold)),
      "threshold": threshold,
      "log_loss": float(skm.log_loss(y_true, clipped, labels=[0, 1])),
      "confusion_matrix": cm.astype(int).tolist(),
      "confusion_matrix_normalized": normalize_confusion(cm).tolist(),
      "num_examples": int(len(y_true)),
      "positive_fraction": float(y_true.mean()),
  }


def validation_metrics(y_true, y_prob, weights=None) -> dict[str, Any]:
  """The per-epoch validation numbers of training, computed exactly.

  Args:
    y_true: labels in {0, 1}.
    y_prob: probabilities of class 1.
    weights: optional per-example weights (default 1).

  Returns:
    {"val_loss": weighted binary cross-entropy (probabilities clipped to
    [LOG_LOSS_EPS, 1 - LOG_LOSS_EPS]), "val_accuracy": weighted accuracy at
    0.5, "val_auc": scikit-learn ROC AUC (None with one class)}.

  Raises:
    ValueError: invalid inputs (see `binary_metrics`).
  """
  y_true, y_prob = _check(y_true, y_prob)
  w = np.ones(len(y_true)) if weights is None else np.asarray(
      weights, np.float64)
  p = np.clip(y_prob, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
  loss = -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p))
  both = len(np.unique(y_true)) == 2
  return {
      "val_loss": float(np.average(loss, weights=w)),
      "val_accuracy": float(np.average((y_prob >= 0.5) == y_true, weights=w)),
      "val_auc": _float_or_none(skm.roc_auc_score(y_true, y_prob,
                                                  sample_weight=w))
                 if both else None,
  }
