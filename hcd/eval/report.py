"""Run comparison: the notebook's conclusion table, made from run files.

  compare_runs(["runs/model1", "runs/resnet"], "reports/")

reads each run's config.json, history and metrics.json (hcd.rundir) and
writes
  runs.md       markdown table + a one-line conclusion (best run by val AUC);
                with K-fold runs (hcd_train --num_folds), a cross-validation
                section: per-fold AUC and the pooled out-of-fold AUC
  runs.csv      the same numbers, unformatted
  val_auc.png   the runs' validation-AUC curves overlaid
  oof_predictions.csv   with K-fold runs: id,label,prob,fold,num_folds,experiment

Like hcd_train's metrics.json, the accuracy and AUC columns describe the
final model: validation numbers from metrics.json (all validation images),
train accuracy from the last epoch of the history (without metrics.json,
the history's last row gives all three). "best epoch" is the epoch of the
best validation AUC, whose weights best.keras holds. Runs that hcd_evaluate
scored with --restain_to (eval/metrics.json) add the stain-shift columns:
the evaluated AUC, each re-stained AUC and their mean.
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from typing import Any, Sequence

from hcd import plots
from hcd import rundir
from hcd.eval import crossval
from hcd import fileio

# (key, markdown header, format) in table order.
COLUMNS = (
    ("run", "run", "{}"),
    ("model", "model", "{}"),
    ("parameters", "parameters", "{:,}"),
    ("learning_rate", "learning rate", "{:g}"),
    ("epochs", "epochs", "{}"),
    ("time_per_epoch_s", "time/epoch (s)", "{:.1f}"),
    ("time_per_step_ms", "time/step (ms)", "{:.1f}"),
    ("images_per_s", "images/s", "{:,.0f}"),
    ("train_accuracy", "train accuracy", "{:.4f}"),
    ("val_accuracy", "val accuracy", "{:.4f}"),
    ("val_auc", "val AUC", "{:.4f}"),
    ("best_epoch", "best epoch", "{}"),
)
# Shown when a run's hcd_evaluate (its eval/metrics.json) scored the split
# re-stained too (--restain_to): the clean AUC as evaluated (with its TTA),
# each re-stained AUC, and their mean, by which recipes are chosen.
SHIFT_COLUMNS = (
    ("eval_tta", "eval TTA", "{}"),
    ("eval_auc", "eval AUC", "{:.4f}"),
    ("restained_macenko_auc", "Macenko AUC", "{:.4f}"),
    ("restained_reinhard_auc", "Reinhard AUC", "{:.4f}"),
    ("shift_mean_auc", "mean of clean and re-stained", "{:.4f}"),
)


def _columns(rows: Sequence[dict[str, Any]]) -> tuple:
  """COLUMNS, and SHIFT_COLUMNS when some run has re-stained AUCs."""
  if any(r.get("shift_mean_auc") is not None for r in rows):
    return COLUMNS + SHIFT_COLUMNS
  return COLUMNS


def _shift_cells(workdir: str) -> dict[str, Any]:
  """The SHIFT_COLUMNS of a run, from its eval/metrics.json (if any)."""
  path = rundir.EvalDir(rundir.RunDir(workdir).eval).metrics
  if not os.path.isfile(path):
    return {}
  met = rundir.read_json(path)
  restained = met.get("restained") or {}
  cells = {"eval_tta": met.get("tta"),
           "eval_auc": rundir.finite(met.get("roc_auc"))}
  for method, m in restained.items():
    cells[f"restained_{method}_auc"] = rundir.finite(m.get("roc_auc"))
  aucs = [cells["eval_auc"]] + [cells.get(f"restained_{m}_auc")
                                for m in restained]
  if restained and None not in aucs:
    cells["shift_mean_auc"] = statistics.fmean(aucs)
  return cells


def _first(*values):
  for v in values:
    if v is not None and v != "":
      return v
  return None


def _median(rows, key):
  vals = [rundir.finite(r.get(key)) for r in rows]
  vals = [v for v in vals if v is not None]
  return statistics.median(vals) if vals else None


def summarize_run(run: rundir.Run, name: str | None = None) -> dict[str, Any]:
  """Returns one table row for a run (None where the run lacks a number).

  Args:
    run: a run read by hcd.rundir.read_run.
    name: the row label (default: the directory name).

  Returns:
    dict keyed by the COLUMNS keys.
  """
  cfg, met, hist = run.config, run.metrics, run.history
  best_epoch = _first(met.get("best_epoch"))
  if best_epoch is None and hist:
    scored = [r for r in hist if rundir.finite(r.get("val_auc")) is not None]
    if scored:
      best_epoch = max(scored, key=lambda r: float(r["val_auc"]))["epoch"]
  last = hist[-1] if hist else {}
  step_s = _first(rundir.finite(met.get("time_per_step_s")),
                  _median(hist, "step_time_s"))
  params = _first(met.get("num_params"), cfg.get("num_params"))
  return {
      "run": name or os.path.basename(os.path.normpath(run.workdir)),
      "model": cfg.get("model"),
      "parameters": int(params) if params is not None else None,
      "learning_rate": rundir.finite(cfg.get("learning_rate")),
      "epochs": len(hist) if hist else cfg.get("epochs"),
      "time_per_epoch_s": _first(rundir.finite(met.get("time_per_epoch_s")),
                                 _median(hist, "epoch_time_s")),
      "time_per_step_ms": step_s * 1000 if step_s is not None else None,
      "images_per_s": _first(rundir.finite(met.get("images_per_s")),
                             _median(hist, "images_per_s")),
      "train_accuracy": rundir.finite(last.get("accuracy")),
      "val_accuracy": _first(rundir.finite(met.get("accuracy")),
                             rundir.finite(last.get("val_accuracy"))),
      "val_auc": _first(rundir.finite(met.get("roc_auc")),
                        rundir.finite(last.get("val_auc"))),
      "best_epoch": int(best_epoch) if best_epoch is not None else None,
      **_shift_cells(run.workdir),
  }


def _cell(value, fmt: str) -> str:
  if value is None:
    return "—"
  try:
    return fmt.format(value)
  except (TypeError, ValueError):
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """Formats summary rows as a markdown table with a conclusion line."""
  columns = _columns(rows)
  lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
           "|" + "|".join("---" if k in ("run", "model") else "---:"
                          for k, _, _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns)
                 + " |")
  scored = [r for r in rows if r.get("val_auc") is not None]
  if scored:
    best = max(scored, key=lambda r: r["val_auc"])
    text = (f"\nBest validation AUC: **{best['run']}** ({best['model']}), "
            f"val AUC {best['val_auc']:.4f}")
    if best.get("val_accuracy") is not None:
      text += f", val accuracy {best['val_accuracy']:.4f}"
    others = [r for r in scored if r is not best]
    if others:
      second = max(others, key=lambda r: r["val_auc"])
      text += (f"; {best['val_auc'] - second['val_auc']:+.4f} AUC over the "
               f"next best, {second['run']}")
    lines.append(text + ".")
  shifted = [r for r in rows if r.get("shift_mean_auc") is not None]
  if shifted:
    # Valid is a few slides: the recipe to ship is the one that also holds
    # up in another lab's stain.
    best = max(shifted, key=lambda r: r["shift_mean_auc"])
    lines.append(f"Best mean of clean and re-stained AUC: **{best['run']}**, "
                 f"{best['shift_mean_auc']:.4f} (eval AUC "
                 f"{best['eval_auc']:.4f}, TTA {best['eval_tta']}).")
  return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[dict[str, Any]]) -> str:
  """Formats summary rows as CSV (raw numbers; empty where missing)."""
  buf = io.StringIO()
  columns = _columns(rows)
  w = csv.DictWriter(buf, [k for k, _, _ in columns], lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({k: "" if r.get(k) is None else r.get(k) for k, _, _ in columns})
  return buf.getvalue()


def compare_runs(workdirs: Sequence[str], out_dir: str,
                 names: Sequence[str] | None = None) -> dict[str, str]:
  """Writes the comparison table (md, csv) and the val-AUC overlay PNG.

  Args:
    workdirs: run directories.
    out_dir: output directory (created).
    names: row labels, one per run (default: directory names).

  Returns:
    {"markdown": path, "csv": path, "val_auc_png": path or None,
     "cross_validation": crossval.summary of the K-fold experiments,
     "oof_csv": path or None}.

  Raises:
    rundir.RunError: no runs, a missing or unreadable run directory.
    ValueError: names of the wrong length or repeated.
  """
  if not workdirs:
    raise rundir.RunError("no runs to compare (pass --workdirs=RUN1,RUN2)")
  if names is not None and len(names) != len(workdirs):
    raise ValueError(f"{len(names)} names for {len(workdirs)} runs")
  loaded = [rundir.read_run(w) for w in workdirs]
  rows = [summarize_run(r, names[i] if names else None)
          for i, r in enumerate(loaded)]
  labels = [r["run"] for r in rows]
  if len(set(labels)) != len(labels):
    raise ValueError(f"runs need distinct names, got {labels} (pass --names)")
  folds = crossval.cross_validation(loaded, labels)
  os.makedirs(out_dir, exist_ok=True)
  out = {"markdown": os.path.join(out_dir, "runs.md"),
         "csv": os.path.join(out_dir, "runs.csv"), "val_auc_png": None,
         "cross_validation": crossval.summary(folds), "oof_csv": None}
  fileio.atomic_write_text(out["markdown"], markdown_table(rows) +
                           crossval.markdown(folds))
  fileio.atomic_write_text(out["csv"], csv_table(rows))
  if folds:
    out["oof_csv"] = os.path.join(out_dir, "oof_predictions.csv")
    fileio.atomic_write_csv(out["oof_csv"], crossval.oof_rows(folds))
  curves = {lab: r.history for lab, r in zip(labels, loaded)
            if any(rundir.finite(h.get("val_auc")) is not None
                   for h in r.history)}
  if curves:
    out["val_auc_png"] = plots.plot_runs_auc(
        curves, os.path.join(out_dir, "val_auc.png"))
  return out
