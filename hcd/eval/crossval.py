"""K-fold cross-validation results: per-fold and out-of-fold (OOF) AUC.

A K-fold experiment is K hcd_train runs with the same settings and
`--num_folds=K --fold=0..K-1`; each run validates on its fold
and writes that fold's predictions to `val_predictions.csv`. Together the
folds hold one out-of-fold prediction per training image, and their AUC
(scikit-learn on all of them at once) is the experiment's cross-validated
AUC: unlike the mean of the per-fold AUCs it also penalises folds whose
probabilities are calibrated differently, which matters when their models
are ensembled (hcd_predict --ensemble).

  groups = cross_validation(["runs/f0", "runs/f1", ...])

An experiment is the runs whose config.json settings agree except for the
fold and what each run records about itself (its directory, the sizes it
derived from its fold's images, the machine it ran on): so K folds of one
recipe are one experiment, and another recipe on the same folds (another
model, learning rate, augmentation, ...) is a second experiment with its
own OOF AUC. Runs without folds are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from hcd import metrics as hcd_metrics
from hcd import rundir
from hcd.train.config import BOOKKEEPING_KEYS

# The settings that define which images are in which fold. They are part of
# an experiment's recipe like any other setting; they are named here to say
# whether two experiments were scored on the same folds.
_FOLD_KEYS = ("shards_dir", "train_split", "split_seed", "num_folds",
              "group_csv")

# config.json entries that differ between the folds of one recipe, so they
# must not split an experiment: the fold and the run's directory; what the
# run derived from its fold's images (subset sizes, and the step counts
# hcd_train writes over --steps_per_epoch/--val_steps=0); the machine it ran
# on; and bookkeeping that does not change the model trained.
_PER_RUN_KEYS = BOOKKEEPING_KEYS | {
    "fold", "data", "steps_per_epoch", "val_steps"}


@dataclasses.dataclass
class FoldGroup:
  """The runs of one K-fold experiment and their scores.

  Attributes:
    label: the settings that tell this experiment from the others of the
      same report, e.g. "model=resnet" ("" when there is only one).
    fold_settings: the settings that define the folds (shards_dir,
      train_split, split_seed, num_folds, group_csv).
    num_folds: K.
    folds: fold index -> (run name, its validation AUC or None).
    missing: fold indices without a run.
    oof_auc: AUC of all folds' validation predictions pooled (None with
      fewer than two classes or no predictions).
    mean_fold_auc: mean of the per-fold AUCs.
    num_examples: pooled predictions.
    ids, labels, probs, fold_of: the pooled out-of-fold predictions.
  """
  label: str
  fold_settings: dict[str, Any]
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


def recipe(config: dict[str, Any]) -> dict[str, Any]:
  """The settings of a run that its experiment's other folds share.

  Args:
    config: a run's config.json.

  Returns:
    config without the per-run entries (fold, workdir, derived sizes and
    step counts, runtime, logging and checkpoint cadence).
  """
  return {k: v for k, v in config.items() if k not in _PER_RUN_KEYS}


def _canonical(value) -> str:
  # JSON with sorted keys: hashable, and equal for equal nested settings
  # (model_overrides is a dict).
  return json.dumps(value, sort_keys=True, default=str)


def _recipe_key(config: dict[str, Any]) -> str:
  return _canonical(recipe(config))


def _labels(recipes: Sequence[dict[str, Any]]) -> list[str]:
  """Per experiment, `key=value` of the settings that differ between them."""
  if len(recipes) < 2:
    return [""] * len(recipes)
  keys = sorted({k for r in recipes for k in r})
  differ = [k for k in keys
            if len({_canonical(r.get(k)) for r in recipes}) > 1]
  # Every differing setting, so that two labels are never equal.
  return [", ".join(f"{k}={_text(r.get(k))}" for k in differ)
          for r in recipes]


def _text(value) -> str:
  return value if isinstance(value, str) else _canonical(value)


def cross_validation(loaded: Sequence[rundir.Run],
                     names: Sequence[str] | None = None) -> list[FoldGroup]:
  """Groups fold runs into K-fold experiments and scores them.

  Runs belong to one experiment when their config.json settings agree
  except for the per-run entries (`recipe`); two recipes trained on the
  same folds are two experiments, each with its own out-of-fold AUC.

  Over 60 lines only for documenting each argument.

  Args:
    loaded: runs read by hcd.rundir.read_run.
    names: display names, one per run (default: directory names).

  Returns:
    One FoldGroup per K-fold experiment, in order of first appearance.

  Raises:
    hcd.rundir.RunError: a fold given twice in one experiment (both runs
      named), or an unreadable val_predictions.csv (named).
  """
  groups: dict[str, list[tuple[str, rundir.Run]]] = {}
  for k, run in enumerate(loaded):
    cfg = run.config
    if int(cfg.get("num_folds") or 0) < 2:
      continue
    name = names[k] if names else os.path.basename(
        os.path.normpath(run.workdir))
    groups.setdefault(_recipe_key(cfg), []).append((name, run))
  labels = _labels([recipe(m[0][1].config) for m in groups.values()])
  out = []
  for label, members in zip(labels, groups.values()):
    first = members[0][1].config
    num_folds = int(first["num_folds"])
    folds: dict[int, tuple[str, float | None]] = {}
    ids, labels_, probs, fold_of = [], [], [], []
    for name, run in members:
      fold = int(run.config.get("fold") or 0)
      if fold in folds:
        raise rundir.RunError(
            f"{run.workdir}: fold {fold} of {num_folds} is also run "
            f"{folds[fold][0]}; give each fold once (runs whose config.json "
            f"settings agree except for fold and run directory are one "
            f"experiment)")
      folds[fold] = (name, rundir.finite(run.metrics.get("roc_auc")))
      i, l, p = rundir.read_predictions(
          rundir.RunDir(run.workdir).val_predictions)
      ids += i
      labels_.append(l)
      probs.append(p)
      fold_of.append(np.full(len(i), fold))
    y, p = np.concatenate(labels_), np.concatenate(probs)
    oof = None
    if len(y) and len(np.unique(y)) == 2:
      oof = hcd_metrics.binary_metrics(y, p)["roc_auc"]
    scored = [a for _, a in folds.values() if a is not None]
    out.append(FoldGroup(
        label=label, fold_settings={k: first.get(k) for k in _FOLD_KEYS},
        num_folds=num_folds, folds=dict(sorted(folds.items())),
        missing=[f for f in range(num_folds) if f not in folds],
        oof_auc=oof,
        mean_fold_auc=float(np.mean(scored)) if scored else None,
        num_examples=len(ids), ids=ids, labels=y, probs=p,
        fold_of=np.concatenate(fold_of)))
  return out


def markdown(groups: Sequence[FoldGroup]) -> str:
  """A "Cross-validation" section: per-fold AUC and the pooled OOF AUC.

  Args:
    groups: from `cross_validation`.

  Returns:
    Markdown, one table per experiment headed by its label; with several
    experiments, whether they share their folds. "" without experiments.
  """
  if not groups:
    return ""
  lines = ["", "## Cross-validation", ""]
  if len(groups) > 1:
    differ = [k for k in _FOLD_KEYS
              if len({_canonical(g.fold_settings.get(k)) for g in groups}) > 1]
    lines += [f"{len(groups)} experiments, " + (
        "all on the same folds: their out-of-fold AUCs score the same "
        "images" if not differ else
        f"not all on the same folds (they differ in {', '.join(differ)}): "
        f"their out-of-fold AUCs score different splits") + ".", ""]
  for g in groups:
    if g.label:
      lines += [f"### {g.label}", ""]
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
  """The pooled out-of-fold predictions as CSV rows.

  Args:
    groups: from `cross_validation`.

  Returns:
    Rows, header first: id,label,prob,fold,num_folds,experiment; with
    several experiments an id appears once per experiment, told apart by
    `experiment` (the experiment's label, "" when there is only one).
  """
  rows = [("id", "label", "prob", "fold", "num_folds", "experiment")]
  for g in groups:
    rows += [(i, int(l), repr(float(p)), int(f), g.num_folds, g.label)
             for i, l, p, f in zip(g.ids, g.labels, g.probs, g.fold_of)]
  return rows


def summary(groups: Sequence[FoldGroup]) -> list[dict[str, Any]]:
  """JSON-friendly per-experiment numbers (for logs and tests).

  Args:
    groups: from `cross_validation`.

  Returns:
    Per experiment: label, fold_settings, num_folds, folds (fold -> AUC),
    runs (fold -> run name), missing, oof_auc, mean_fold_auc, num_examples.
  """
  return [{"label": g.label, "fold_settings": g.fold_settings,
           "num_folds": g.num_folds,
           "folds": {str(f): a for f, (_, a) in g.folds.items()},
           "runs": {str(f): n for f, (n, _) in g.folds.items()},
           "missing": g.missing, "oof_auc": g.oof_auc,
           "mean_fold_auc": g.mean_fold_auc, "num_examples": g.num_examples}
          for g in groups]
