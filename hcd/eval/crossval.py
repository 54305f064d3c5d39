"""K-fold cross-validation results: per-fold and out-of-fold (OOF) AUC.

A K-fold experiment is K hcd_train runs with the same data and split
settings and `--num_folds=K --fold=0..K-1`; each run validates on its fold
and writes that fold's predictions to `val_predictions.csv`. Together the
folds hold one out-of-fold prediction per training image, and their AUC
(scikit-learn on all of them at once) is the experiment's cross-validated
AUC: unlike the mean of the per-fold AUCs it also penalises folds whose
probabilities are calibrated differently, which matters when their models
are ensembled (hcd_predict --ensemble).

  groups = cross_validation(["runs/f0", "runs/f1", ...])

Runs are grouped by what defines the folds (shards, split, seed, K, group
CSV); runs without folds are ignored.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from hcd import metrics as hcd_metrics
from hcd import rundir

# The settings that define which images are in which fold.
_FOLD_KEYS = ("shards_dir", "train_split", "split_seed", "num_folds",
              "group_csv")


@dataclasses.dataclass
class FoldGroup:
  """The runs of one K-fold experiment and their scores.

  Attributes:
    num_folds: K.
    folds: fold index -> (run name, its validation AUC or None).
    missing: fold indices without a run.
    oof_auc: AUC of all folds' validation predictions pooled (None with
      fewer than two classes or no predictions).
    mean_fold_auc: mean of the per-fold AUCs.
    num_examples: pooled predictions.
    ids, labels, probs, fold_of: the pooled out-of-fold predictions.
  """
  num_folds: int
  folds: dict[int, tuple[str, float | None]]
  missing: list[int]
  oof_auc: float | None
  mean_fold_auc: float | None
  num_examples: int
  ids: list[str]
  labels: np.ndarray
  probs: np.ndarray
  fold_of: np.ndarray


def cross_validation(loaded: Sequence[rundir.Run],
                     names: Sequence[str] | None = None) -> list[FoldGroup]:
  """Groups fold runs into K-fold experiments and scores them.

  Args:
    loaded: runs read by hcd.rundir.read_run.
    names: display names, one per run (default: directory names).

  Returns:
    One FoldGroup per K-fold experiment, in order of first appearance.

  Raises:
    hcd.rundir.RunError: a fold given twice in one experiment, or an
      unreadable val_predictions.csv (named).
  """
  groups: dict[tuple, list[tuple[str, rundir.Run]]] = {}
  for k, run in enumerate(loaded):
    cfg = run.config
    if int(cfg.get("num_folds") or 0) < 2:
      continue
    key = tuple(str(cfg.get(x) or "") for x in _FOLD_KEYS)
    name = names[k] if names else os.path.basename(
        os.path.normpath(run.workdir))
    groups.setdefault(key, []).append((name, run))
  out = []
  for members in groups.values():
    num_folds = int(members[0][1].config["num_folds"])
    folds: dict[int, tuple[str, float | None]] = {}
    ids, labels, probs, fold_of = [], [], [], []
    for name, run in members:
      fold = int(run.config.get("fold") or 0)
      if fold in folds:
        raise rundir.RunError(
            f"{run.workdir}: fold {fold} of {num_folds} is also run "
            f"{folds[fold][0]}; give each fold once")
      folds[fold] = (name, rundir.finite(run.metrics.get("roc_auc")))
      i, l, p = rundir.read_predictions(
          rundir.RunDir(run.workdir).val_predictions)
      ids += i
      labels.append(l)
      probs.append(p)
      fold_of.append(np.full(len(i), fold))
    labels, probs = np.concatenate(labels), np.concatenate(probs)
    oof = None
    if len(labels) and len(np.unique(labels)) == 2:
      oof = hcd_metrics.binary_metrics(labels, probs)["roc_auc"]
    scored = [a for _, a in folds.values() if a is not None]
    out.append(FoldGroup(
        num_folds=num_folds, folds=dict(sorted(folds.items())),
        missing=[f for f in range(num_folds) if f not in folds],
        oof_auc=oof,
        mean_fold_auc=float(np.mean(scored)) if scored else None,
        num_examples=len(ids), ids=ids, labels=labels, probs=probs,
        fold_of=np.concatenate(fold_of)))
  return out


def markdown(groups: Sequence[FoldGroup]) -> str:
  """A "Cross-validation" section: per-fold AUC and the pooled OOF AUC."""
  if not groups:
    return ""
  lines = ["", "## Cross-validation", ""]
  for g in groups:
    lines += ["| fold | run | val AUC |", "|---:|---|---:|"]
    for fold, (name, auc) in g.folds.items():
      lines.append(f"| {fold} | {name} | "
                   f"{'—' if auc is None else f'{auc:.4f}'} |")
    oof = "—" if g.oof_auc is None else f"{g.oof_auc:.4f}"
    mean = "—" if g.mean_fold_auc is None else f"{g.mean_fold_auc:.4f}"
    text = (f"\n{len(g.folds)} of {g.num_folds} folds: out-of-fold AUC "
            f"**{oof}** over {g.num_examples} images (mean of fold AUCs "
            f"{mean})")
    if g.missing:
      text += f"; folds {g.missing} not given, so OOF covers part of the data"
    lines += [text + ".", ""]
  return "\n".join(lines)


def oof_rows(groups: Sequence[FoldGroup]) -> list[tuple]:
  """The pooled out-of-fold predictions as CSV rows, header first:
  id,label,prob,fold,num_folds."""
  rows = [("id", "label", "prob", "fold", "num_folds")]
  for g in groups:
    rows += [(i, int(l), repr(float(p)), int(f), g.num_folds)
             for i, l, p, f in zip(g.ids, g.labels, g.probs, g.fold_of)]
  return rows


def summary(groups: Sequence[FoldGroup]) -> list[dict[str, Any]]:
  """JSON-friendly per-experiment numbers (for logs and tests)."""
  return [{"num_folds": g.num_folds, "folds": {str(f): a for f, (_, a) in
                                               g.folds.items()},
           "missing": g.missing, "oof_auc": g.oof_auc,
           "mean_fold_auc": g.mean_fold_auc, "num_examples": g.num_examples}
          for g in groups]
