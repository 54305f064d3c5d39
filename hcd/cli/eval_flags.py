"""Flags of hcd_evaluate, hcd_predict, hcd_report and tools/eda, defined once.

Each binary calls the `define_*` function it needs at import time; the
definitions live only here so names, defaults and help texts cannot drift
between binaries. Library code never sees FLAGS: the binaries turn the
values into explicit arguments.
"""

from __future__ import annotations

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def _define_model_flags() -> None:
  flags.DEFINE_string(
      "workdir", None, "Run directory written by hcd_train (its best.keras or "
      "model.keras is used; see --model).")
  flags.DEFINE_string(
      "model_path", None, "A .keras model file to use instead of (or besides) "
      "a run directory.")
  flags.DEFINE_enum("model", "best", ["best", "final"],
                    "Which model of a run: best (best.keras, best validation "
                    "AUC) or final (model.keras, last epoch).")
  flags.DEFINE_list(
      "ensemble", [], "More runs (directories) or .keras files whose "
      "probabilities are averaged with --workdir's; a shell-style pattern "
      "takes every match, e.g. --ensemble='runs/cv/fold*' for the runs of a "
      "K-fold experiment (hcd_train --num_folds).")


def _define_input_flags(split_default: str | None,
                        split_help: str = "Split to read.") -> None:
  flags.DEFINE_string(
      "shards_dir", None, "TFRecord shards directory (tools/make_shards); "
      "default: the run's own (config.json shards_dir) when no --data_dir.")
  flags.DEFINE_string(
      "data_dir", None, "Image folder instead of shards: the Kaggle layout "
      "(<data_dir>/<split>/<id>.tif), a class-folder layout "
      "(<data_dir>/<split>/<0|1>/*) or a plain folder of TIFFs. Every file "
      "is checked first and decoded to exactly the pixels tools/make_shards "
      "stores (imagecodecs; plain TIFF strips are sliced in tf.data); a "
      "file it refuses is named.")
  flags.DEFINE_string("split", split_default, split_help)
  flags.DEFINE_string(
      "labels_csv", None, "Labels for a Kaggle-layout --data_dir (default: "
      "<data_dir>/train_labels.csv for the train split).")
  flags.DEFINE_integer("batch_size", 256, "Images per prediction batch.")
  flags.DEFINE_integer(
      "tta", 1, "Dihedral test-time augmentation: 1, 2, 4 or 8 transforms, "
      "probabilities averaged.")
  flags.DEFINE_boolean(
      "skip_unreadable", False, "Leave out images that cannot be decoded "
      "(listed in the log and a side file) instead of refusing.")
  flags.DEFINE_boolean("jit_compile", False,
                       "XLA-compile the prediction step.")
  flags.DEFINE_boolean("progress", True, "Show progress bars.")


def define_evaluate_flags() -> None:
  """Flags of hcd_evaluate."""
  _define_model_flags()
  _define_input_flags(
      None, "Split to evaluate. Default: with shards and --workdir, the "
      "run's own validation images (its val_split, or the val_fraction part "
      "of its training split, from config.json); otherwise 'valid'.")
  flags.DEFINE_string(
      "threshold", "0.5", "Decision threshold for accuracy_at_threshold and "
      "the confusion matrix: a probability, or 'youden' / 'accuracy' to "
      "choose it on the evaluated data (optimistic).")
  flags.DEFINE_string(
      "out_dir", None, "Where metrics.json, roc.png, confusion_matrix.png and "
      "predictions.csv go (default: <workdir>/eval, or eval/ beside "
      "--model_path; required when --ensemble alone names the models).")
  flags.DEFINE_string(
      "restain_to", None, "Also score the split re-stained to the H&E stain "
      "of this source: a whole-slide image (e.g. an Aperio .svs from another "
      "lab) or a folder of patches. One mapping for the whole split (its "
      "stain estimated from all its images), so the differences between "
      "patches survive; metrics.json gets each method's AUC beside the "
      "clean one under 'restained', and restain.png shows examples.")
  flags.DEFINE_list(
      "restain_method", ["macenko", "reinhard"], "Re-staining methods for "
      "--restain_to: macenko (stain vectors and concentrations) and/or "
      "reinhard (LAB means and deviations).")


def define_predict_flags() -> None:
  """Flags of hcd_predict."""
  _define_model_flags()
  _define_input_flags("test")
  flags.DEFINE_string("out", None, "The submission CSV to write (id,label "
                      "with label the probability of tumour).")
  flags.DEFINE_string(
      "sample_submission", None, "Kaggle's sample_submission.csv: the output "
      "has exactly its ids, in its order; missing, extra or duplicate ids "
      "are refused. Default: <data_dir>/sample_submission.csv when "
      "predicting the test split of a Kaggle-layout --data_dir that has one "
      "(said in the log); --sample_submission= (empty) writes the predicted "
      "ids in input order instead.")
  flags.DEFINE_float(
      "skipped_prob", 0.5, "With --skip_unreadable and --sample_submission: "
      "the probability written for skipped images (Kaggle needs every row).")
  flags.DEFINE_string(
      "export_dir", None, "Instead of predicting, export the model as a "
      "safe-mode .keras and a SavedModel (uint8 in, probability out) here.")


def define_slide_flags() -> None:
  """Flags of hcd_slide (whole-slide inference)."""
  _define_model_flags()
  flags.DEFINE_string(
      "slides", None, "The slides: a shell-style pattern ('slides/*.svs') or "
      "a CSV with a 'path' column (relative to the CSV's folder).")
  flags.DEFINE_string("out_dir", None, "Where <slide name>/ folders and "
                      "slides.csv go.")
  flags.DEFINE_integer("batch_size", 256, "Tiles per prediction batch.")
  flags.DEFINE_integer(
      "tta", 1, "Dihedral test-time augmentation: 1, 2, 4 or 8 transforms, "
      "probabilities averaged (as hcd_predict).")
  flags.DEFINE_integer(
      "stride", 32, "Target-resolution pixels between tiles (96-px tiles); "
      "32: each heatmap cell is the centre square a PCam label describes.")
  flags.DEFINE_float(
      "target_mpp", 0.972, "Microns per pixel of the tiles: the model's "
      "training resolution (PCam/Kaggle: about 0.972, Camelyon level 2).")
  flags.DEFINE_float(
      "mpp", None, "Microns per level-0 pixel, for slides whose metadata has "
      "none (otherwise such a slide is refused) and to override it.")
  flags.DEFINE_float("min_tissue", 0.1, "Smallest tissue fraction of a "
                     "predicted tile (0 predicts every tile).")
  flags.DEFINE_float("threshold", 0.5, "Probability from which a cell is "
                     "tumour: regions.geojson and the tumour area.")
  flags.DEFINE_string("labels_csv", None, "Slide labels (columns slide,label "
                      "0/1): slide_metrics.json gets the slide-level "
                      "ROC-AUC of the max score (Camelyon16's metric).")
  flags.DEFINE_integer("num_workers", 1, "Hosts sharing the slide set (each "
                       "takes every N-th slide and writes its own rows).")
  flags.DEFINE_integer(
      "worker_index", None, "This host's index in [0, num_workers). "
      "Default: JOB_COMPLETION_INDEX (Kubernetes Indexed Job) or "
      "SLURM_ARRAY_TASK_ID, else 0.")
  flags.DEFINE_boolean("merge", False, "Instead of predicting, join the "
                       "workers' rows in --out_dir into slides.csv (and the "
                       "AUC, with --labels_csv).")
  flags.DEFINE_boolean("jit_compile", False,
                       "XLA-compile the prediction step.")
  flags.DEFINE_boolean("progress", True, "Show progress bars.")


def define_eda_flags(split_default: str = "train") -> None:
  """Flags of the EDA figures (tools/eda, and hcd_report's EDA part)."""
  flags.DEFINE_string("shards_dir", None, "EDA from this shards directory.")
  flags.DEFINE_string("data_dir", None, "EDA from this image folder.")
  flags.DEFINE_string("split", split_default, "Split to describe.")
  flags.DEFINE_string("labels_csv", None,
                      "Labels for a Kaggle-layout --data_dir.")
  flags.DEFINE_string("scan_dir", None, "Scan directory of "
                      "tools/scan_quality: its scan.csv's flagged images are "
                      "drawn.")
  flags.DEFINE_string("scan_csv", None, "A scan.csv (instead of --scan_dir).")
  flags.DEFINE_integer("num_samples", 16, "Patches in the sample grid.")
  flags.DEFINE_integer("seed", 0, "Sample selection seed.")


def define_report_flags() -> None:
  """Flags of hcd_report (run comparison + optional EDA figures)."""
  flags.DEFINE_list("workdirs", [], "Run directories to compare.")
  flags.DEFINE_list("names", [], "Row names for the runs (default: the "
                    "directory names).")
  flags.DEFINE_string("out_dir", None, "Where the report goes.")
  flags.DEFINE_list("slides_dirs", [], "hcd_slide output folders (--out_dir):"
                    " their slides and slide-level ROC-AUC go into slides.md.")
  define_eda_flags()


def show_in_help(doc: str | None) -> None:
  """Makes --help of a console script list these flags and its docstring.

  absl's --help shows the key flags and docstring of the `__main__` module,
  which for a console script is pip's generated wrapper; registering the
  flags for sys.argv[0] and copying the docstring fixes that.
  """
  import sys  # pylint: disable=g-import-not-at-top
  for flag in FLAGS.get_flags_for_module(__name__):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  main = sys.modules.get("__main__")
  if main is not None and doc and not getattr(main, "__doc__", None):
    main.__doc__ = doc


def sample_submission_path(values) -> tuple[str | None, bool]:
  """The sample submission hcd_predict orders its output by.

  An explicit --sample_submission wins; an empty one means none. Unset, a
  Kaggle-layout --data_dir's own sample_submission.csv is used for its test
  split (hcd.eval.submission.kaggle_sample_submission).

  Args:
    values: the parsed absl FlagValues of hcd_predict.

  Returns:
    (path or None, whether the path is the default rather than given).
  """
  from hcd.eval import submission  # pylint: disable=g-import-not-at-top
  if values.sample_submission is not None:
    return values.sample_submission or None, False
  path = submission.kaggle_sample_submission(values.data_dir, values.split)
  return path, path is not None


def model_paths(values) -> list[str]:
  """The model files named by --workdir, --model_path, --ensemble, --model.

  Args:
    values: the parsed absl FlagValues of hcd_evaluate or hcd_predict.

  Returns:
    Paths of the .keras files to load (several: an ensemble).

  Raises:
    hcd.rundir.RunError: a run or model file that does not exist.
  """
  import glob  # pylint: disable=g-import-not-at-top
  from hcd import rundir  # pylint: disable=g-import-not-at-top
  run_dirs = [values.workdir] if values.workdir else []
  files = [values.model_path] if values.model_path else []
  for entry in values.ensemble:
    matches = [entry]
    if glob.has_magic(entry):
      matches = sorted(glob.glob(entry))
      if not matches:
        raise rundir.RunError(f"--ensemble={entry}: the pattern matches no "
                            f"run directory or .keras file")
    for e in matches:
      (files if e.endswith(".keras") else run_dirs).append(e)
  return rundir.resolve_model_paths(run_dirs, files, values.model)


def check_input_flags(values) -> None:
  """Checks the flags hcd_evaluate and hcd_predict share, before any work.

  The one up-front check of both binaries, called first in their mains:
  a bad value fails in a second, before a model is loaded or a data
  directory is listed (checking every image of a folder takes minutes).
  The allowed values are the libraries' own (hcd.eval.predict), so these
  checks and the libraries' cannot drift apart.

  Args:
    values: the parsed absl FlagValues of hcd_evaluate or hcd_predict;
      --skipped_prob is checked where the binary defines it.

  Raises:
    absl.app.UsageError: naming the flag, what is allowed and the value.
  """
  from hcd.eval import predict  # pylint: disable=g-import-not-at-top
  try:
    predict.tta_transforms(values.tta)
    if "skipped_prob" in values:
      predict.check_skipped_prob(values.skipped_prob)
  except ValueError as e:  # The message names the flag.
    raise app.UsageError(str(e)) from None
  if values.batch_size < 1:
    raise app.UsageError(f"--batch_size must be >= 1 (images per "
                         f"prediction batch), got {values.batch_size}")
  if "restain_method" in values:
    try:
      # Imported here: no TensorFlow, and --help stays fast.
      from hcd.eval import restain  # pylint: disable=g-import-not-at-top
      restain.check_methods(values.restain_method)
    except ValueError as e:
      raise app.UsageError(str(e)) from None


def evaluate_out_dir(values) -> str:
  """Where hcd_evaluate writes: --out_dir, else beside the model it scores.

  Args:
    values: the parsed absl FlagValues of hcd_evaluate.

  Returns:
    --out_dir; else <workdir>/eval with --workdir; else eval/ beside
    --model_path.

  Raises:
    absl.app.UsageError: no --out_dir and only --ensemble names the
      models (an ensemble's metrics belong in no single member's
      directory), or no model at all.
  """
  import os  # pylint: disable=g-import-not-at-top
  from hcd import rundir  # pylint: disable=g-import-not-at-top
  if values.out_dir:
    return values.out_dir
  if values.workdir:
    return rundir.RunDir(values.workdir).eval
  if values.model_path:
    return os.path.join(os.path.dirname(os.path.abspath(values.model_path)),
                        rundir.EVAL_DIR)
  if not values.ensemble:
    raise app.UsageError("no model given: pass a run directory (--workdir), "
                         "a .keras file (--model_path) or --ensemble")
  raise app.UsageError(
      "--out_dir is required when --ensemble alone names the models (no "
      "--workdir or --model_path): the ensemble's metrics belong in no "
      "single run's eval/ directory")
