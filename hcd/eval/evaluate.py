"""Evaluating models on labelled data: metrics.json, ROC and confusion PNGs.

  evaluate(["runs/a/best.keras"], source, "runs/a/eval/valid", tta=8)

writes into `out_dir` (names: hcd.rundir.EvalDir):
  metrics.json          hcd.metrics.binary_metrics (accuracy at 0.5 and at
                        the chosen threshold, ROC-AUC, PR-AUC, log-loss,
                        confusion matrix counts and normalised) + what was
                        evaluated (models, data, TTA, threshold method)
  roc.png               ROC curve with its AUC
  confusion_matrix.png  normalised confusion matrix (counts in brackets)
  predictions.csv       id,label,prob
  restain.png           with restain_to: patches as they are and re-stained

With `restain_to` (hcd_evaluate --restain_to=SOURCE) the same models are
also scored on the split re-stained to SOURCE's stain (hcd.eval.restain),
by each method asked for; metrics.json then holds, under "restained", each
method's ROC-AUC (and the rest) beside the clean one, at the same TTA and
threshold.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import numpy as np

from hcd import metrics as metrics_lib
from hcd import plots
from hcd import rundir
from hcd.eval import inputs
from hcd.eval import predict as predict_lib
from hcd.eval import restain

log = logging.getLogger(__name__)


def parse_threshold(value) -> float | str:
  """Parses --threshold: a number in [0, 1] or a method name.

  Raises:
    ValueError: neither a probability nor one of metrics.THRESHOLD_METHODS.
  """
  if isinstance(value, str) and value in metrics_lib.THRESHOLD_METHODS:
    return value
  try:
    t = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"--threshold must be a number in [0, 1] or one of "
                     f"{list(metrics_lib.THRESHOLD_METHODS)}; got "
                     f"{value!r}") from None
  if not 0.0 <= t <= 1.0:
    raise ValueError(f"--threshold must be in [0, 1], got {t}")
  return t


def evaluate(model_paths: Sequence[str], source: inputs.Source, out_dir: str,
             tta: int = 1, threshold: float | str = 0.5,
             progress: bool = True, jit_compile: bool = False,
             restain_to: str | None = None,
             restain_methods: Sequence[str] = ("macenko", "reinhard")
             ) -> dict:
  """Evaluates one model (or the average of several) on labelled data.

  Over 60 lines only for documenting each argument.

  Args:
    model_paths: .keras files (see rundir.resolve_model_paths); several are
      ensembled by averaging.
    source: labelled input (hcd.eval.inputs.open_source).
    out_dir: where metrics.json and the plots go (created).
    tta: dihedral test-time views (1, 2, 4, 8).
    threshold: decision threshold in [0, 1], or "youden"/"accuracy" to
      choose it on this data (optimistic: it is tuned on what it scores).
    progress: show progress bars.
    jit_compile: XLA-compile the prediction step.
    restain_to: a whole-slide image or a folder of patches whose stain the
      split is also scored in (hcd.eval.restain); None: clean only.
    restain_methods: the re-staining methods, of restain.METHODS.

  Returns:
    The metrics dict that was written to metrics.json.

  Raises:
    hcd.rundir.RunError: a model that does not load.
    hcd.data.shard_reader.ShardFileError: an unreadable shard (named).
    ValueError: unlabelled examples, bad tta or threshold.
    OSError: an output that cannot be written (named).
  """
  threshold = parse_threshold(threshold)
  predict_lib.tta_transforms(tta)  # Fail before loading anything.
  target = None
  if restain_to:
    restain_methods = restain.check_methods(restain_methods)
    # Before any model is loaded: a bad source fails in seconds.
    target = restain.source_pixels(restain_to)
  models = [predict_lib.load_model(p) for p in model_paths]
  predict_fn = predict_lib.make_predict_fn(models, tta, jit_compile)
  t0 = time.perf_counter()
  with source.naming_bad_shard():
    preds = predict_lib.predict(models, source.dataset, tta,
                                source.num_examples, progress, jit_compile,
                                desc="evaluate", predict_fn=predict_fn)
  seconds = time.perf_counter() - t0
  _check_labelled(preds, source)
  if isinstance(threshold, str):
    method = threshold
    threshold = metrics_lib.choose_threshold(preds.labels, preds.probs,
                                             method)
  else:
    method = "fixed"
  result = metrics_lib.binary_metrics(preds.labels, preds.probs, threshold)
  result.update({
      "threshold_method": method,
      "models": [os.path.abspath(p) for p in model_paths],
      "data": source.description,
      "tta": tta,
      "predict_seconds": seconds,
      "images_per_s": len(preds.ids) / seconds if seconds > 0 else None,
  })
  out = rundir.EvalDir(out_dir)
  if target is not None:
    result["restained"] = _restained(
        source, target, restain_to, restain_methods, preds.ids,
        result["roc_auc"], threshold, predict_fn, progress, out.restain_plot)
  os.makedirs(out_dir, exist_ok=True)
  _write_outputs(out, result, preds, model_paths[0], source.description)
  return result


def _check_labelled(preds, source: inputs.Source) -> None:
  """Raises ValueError naming images without a 0/1 label."""
  unlabelled = [i for i, l in zip(preds.ids, preds.labels) if l not in (0, 1)]
  if unlabelled:
    raise ValueError(f"{source.description}: {len(unlabelled)} image(s) "
                     f"have no label (e.g. {unlabelled[:3]}); evaluation "
                     f"needs a labelled split (hcd_predict scores unlabelled "
                     f"data)")


def _write_outputs(out: rundir.EvalDir, result: dict, preds,
                   first_model: str, description: str) -> None:
  """The ROC and confusion plots, predictions.csv and metrics.json."""
  title = os.path.basename(os.path.dirname(os.path.abspath(first_model)))
  if result["roc_auc"] is not None:
    plots.plot_roc(preds.labels, preds.probs, out.roc_plot,
                   title=f"ROC {title} (TTA {result['tta']})")
  else:
    log.warning("only one class in %s: no ROC curve", description)
  plots.plot_confusion(result["confusion_matrix_normalized"],
                       out.confusion_plot,
                       title=f"{title}, threshold {result['threshold']:.3f}",
                       counts=result["confusion_matrix"])
  rundir.write_predictions(out.predictions, preds.ids, preds.labels,
                           preds.probs)
  rundir.write_json(out.metrics, result)


def _restained(source: inputs.Source, target, restain_to: str,
               methods: Sequence[str], clean_ids: Sequence[str],
               clean_auc: float | None, threshold: float, predict_fn,
               progress: bool, plot_path: str) -> dict:
  """Scores the split re-stained to `target` by each method.

  Args:
    source: the labelled split.
    target: the stain source's tissue pixels (restain.source_pixels).
    restain_to: its path, for metrics.json.
    methods: of restain.METHODS.
    clean_ids: the ids of the clean pass, in its order.
    clean_auc: its ROC-AUC (the drop is measured against it).
    threshold: the clean run's decision threshold, used as is.
    predict_fn: the clean run's prediction function (no second trace).
    progress: show progress bars.
    plot_path: where the before/after PNG goes.

  Returns:
    {method: binary_metrics + "auc_drop" + the fitted mapping}.
  """
  with source.naming_bad_shard():
    split_tissue = restain.split_tissue(source.dataset, source.num_examples)
  results, examples = {}, {}
  first = next(iter(source.dataset.take(1)))
  # Up to 4 patches of each class, for the PNG.
  labels = first["label"].numpy()
  pick = np.concatenate([np.flatnonzero(labels == c)[:4] for c in (0, 1)])
  sample = first["image"].numpy()[pick]
  for method in methods:
    mapping = restain.StainMapping.fit(method, split_tissue, target)
    examples[method] = mapping.apply(sample)
    with source.naming_bad_shard():
      preds = predict_lib.predict(
          [], restain.restained_dataset(source.dataset, mapping),
          num_examples=source.num_examples, progress=progress,
          desc=f"evaluate restained ({method})", predict_fn=predict_fn)
    if preds.ids != clean_ids:
      raise RuntimeError("the re-stained pass read the split in another "
                         "order than the clean one")
    m = metrics_lib.binary_metrics(preds.labels, preds.probs, threshold)
    m.update(auc_drop=(clean_auc - m["roc_auc"]
                       if None not in (clean_auc, m["roc_auc"]) else None),
             source=os.path.abspath(restain_to), method=method,
             mapping=mapping.params, split_tissue_pixels=len(split_tissue),
             source_tissue_pixels=len(target))
    results[method] = m
    log.info("re-stained to %s by %s: ROC AUC %s (clean %s)", restain_to,
             method, m["roc_auc"], clean_auc)
  if len(sample):
    restain.example_grid(sample, labels[pick], examples, plot_path,
                         f"{source.description} re-stained to "
                         f"{os.path.basename(os.path.normpath(restain_to))}")
  return results
