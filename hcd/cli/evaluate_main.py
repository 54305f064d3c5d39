"""hcd_evaluate: metrics.json and ROC / confusion-matrix PNGs for a model.

  hcd_evaluate --workdir=runs/model1 --shards_dir=shards --split=valid --tta=8
  hcd_evaluate --model_path=export/model.keras --data_dir=pcam --split=valid
  hcd_evaluate --workdir=runs/pcam --data_dir=pcam --split=valid --tta=8 \
      --restain_to=slides/other_lab.svs      # + AUC in another lab's stain
"""

import json

from absl import app
from absl import flags
from absl import logging

from hcd import fileio
from hcd.cli import errors
from hcd.cli import eval_flags

eval_flags.define_evaluate_flags()
FLAGS = flags.FLAGS


@errors.guard("hcd_evaluate")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # First, before TensorFlow is imported or any file is looked at: the
  # same checks as hcd_predict's.
  eval_flags.check_input_flags(FLAGS)
  # Imported after flag parsing so --help stays fast.
  from hcd.eval import evaluate  # pylint: disable=g-import-not-at-top
  from hcd.eval import inputs  # pylint: disable=g-import-not-at-top
  from hcd import rundir  # pylint: disable=g-import-not-at-top
  # Any failure is one error line (errors.guard), exit status 1.
  threshold = evaluate.parse_threshold(FLAGS.threshold)
  model_paths = eval_flags.model_paths(FLAGS)
  out_dir = eval_flags.evaluate_out_dir(FLAGS)
  # Before any data is read: an unwritable --out_dir fails now.
  fileio.check_output_dir(out_dir)
  fileio.remove_stale_tmp(out_dir)
  config = rundir.read_config(FLAGS.workdir) if FLAGS.workdir else {}
  shards_dir = FLAGS.shards_dir
  if not shards_dir and not FLAGS.data_dir and config.get("shards_dir"):
    shards_dir = config["shards_dir"]
    logging.info("reading the run's shards %s", shards_dir)
  source = None
  if shards_dir and FLAGS.split is None and config:
    source = inputs.run_validation_source(config, shards_dir,
                                          FLAGS.batch_size)
  if source is None:
    source = inputs.open_source(shards_dir, FLAGS.data_dir,
                                FLAGS.split or "valid", FLAGS.batch_size,
                                FLAGS.labels_csv, FLAGS.skip_unreadable,
                                FLAGS.progress)
  for p in source.skipped:
    logging.warning("skipped unreadable image %s: %s", p.path, p.reason)
  logging.info("evaluating %s on %s (TTA %d)", model_paths,
               source.description, FLAGS.tta)
  result = evaluate.evaluate(model_paths, source, out_dir, FLAGS.tta,
                             threshold, FLAGS.progress, FLAGS.jit_compile,
                             FLAGS.restain_to, FLAGS.restain_method)
  auc = result["roc_auc"]
  print(json.dumps({k: result[k] for k in (
      "roc_auc", "pr_auc", "accuracy", "accuracy_at_threshold", "threshold",
      "log_loss", "confusion_matrix", "num_examples")}))
  print(f"hcd_evaluate: {result['num_examples']} images, ROC AUC "
        f"{'n/a' if auc is None else f'{auc:.4f}'}, accuracy "
        f"{result['accuracy']:.4f}; wrote {out_dir}/metrics.json, roc.png, "
        f"confusion_matrix.png")
  for method, m in result.get("restained", {}).items():
    auc = m["roc_auc"]
    print(f"hcd_evaluate: re-stained to {FLAGS.restain_to} ({method}): ROC "
          f"AUC {'n/a' if auc is None else f'{auc:.4f}'}"
          + (f" ({-m['auc_drop']:+.4f})" if m["auc_drop"] is not None
             else ""))
  if result.get("restained"):
    print(f"hcd_evaluate: examples in {out_dir}/restain.png")
  return 0


def run():
  """Console-script entry point."""
  eval_flags.show_in_help(__doc__)
  app.run(main, flags_parser=errors.flags_parser("hcd_evaluate"))


if __name__ == "__main__":
  run()
