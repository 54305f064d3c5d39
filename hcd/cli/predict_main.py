"""hcd_predict: a Kaggle submission (probabilities) with dihedral TTA.

  hcd_predict --workdir=runs/resnet --shards_dir=shards --split=test
      --tta=8 --sample_submission=data/sample_submission.csv
      --out=submissions/resnet_tta8.csv
  hcd_predict --workdir=runs/resnet --data_dir=data --split=test ...  # TIFFs,
      # ids and order of data/sample_submission.csv when it exists
  hcd_predict --workdir=runs/a --ensemble=runs/b,runs/c ...           # mean
  hcd_predict --workdir=runs/resnet --export_dir=export/resnet        # export
"""

import json
import os

from absl import app
from absl import flags
from absl import logging

from hcd import fileio
from hcd.cli import errors
from hcd.cli import eval_flags

eval_flags.define_predict_flags()
FLAGS = flags.FLAGS


@errors.guard("hcd_predict", where=lambda: FLAGS.out)
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # First, before TensorFlow is imported or any file is looked at: the
  # same checks as hcd_evaluate's.
  eval_flags.check_input_flags(FLAGS)
  # Imported after flag parsing so --help stays fast.
  from hcd.eval import export  # pylint: disable=g-import-not-at-top
  from hcd.eval import inputs  # pylint: disable=g-import-not-at-top
  from hcd.eval import predict  # pylint: disable=g-import-not-at-top
  from hcd import rundir  # pylint: disable=g-import-not-at-top
  from hcd.eval import submission  # pylint: disable=g-import-not-at-top
  # Any failure is one error line (errors.guard), exit status 1.
  model_paths = eval_flags.model_paths(FLAGS)
  if FLAGS.export_dir:
    if len(model_paths) != 1:
      raise ValueError("--export_dir exports one model; drop --ensemble")
    info = export.export_model(model_paths[0], FLAGS.export_dir)
    print(f"hcd_predict: exported {model_paths[0]} to {info['keras']} and "
          f"{info.get('saved_model')}")
    return 0
  if not FLAGS.out:
    raise app.UsageError("--out (the submission CSV) is required")
  # Before any data is read: a directory or read-only place fails now.
  fileio.check_output_file(FLAGS.out)
  fileio.remove_stale_tmp(os.path.dirname(os.path.abspath(FLAGS.out)),
                          prefix=os.path.basename(FLAGS.out))
  sample, defaulted = eval_flags.sample_submission_path(FLAGS)
  if defaulted:
    logging.info("using %s for the submission's ids and order (the data "
                 "directory's own; --sample_submission chooses another)",
                 sample)
  sample_ids = submission.read_sample_ids(sample) if sample else None
  shards_dir = FLAGS.shards_dir
  if not shards_dir and not FLAGS.data_dir and FLAGS.workdir:
    shards_dir = rundir.read_config(FLAGS.workdir).get("shards_dir")
    if shards_dir:
      logging.info("reading the run's shards %s", shards_dir)
  source = inputs.open_source(shards_dir, FLAGS.data_dir, FLAGS.split,
                              FLAGS.batch_size, FLAGS.labels_csv,
                              FLAGS.skip_unreadable, FLAGS.progress)
  for p in source.skipped:
    logging.warning("skipped unreadable image %s: %s", p.path, p.reason)
  logging.info("predicting %s with %s, TTA %d", source.description,
               model_paths, FLAGS.tta)
  summary = predict.predict_submission(
      model_paths, source, FLAGS.out, FLAGS.tta, sample_ids,
      FLAGS.skipped_prob, FLAGS.progress, FLAGS.jit_compile)
  print(json.dumps(summary))
  msg = (f"hcd_predict: wrote {summary['rows']} rows to {FLAGS.out} "
         f"({summary['images_per_s']:.0f} images/s, TTA {FLAGS.tta}, "
         f"{len(model_paths)} model(s))")
  if source.skipped:
    msg += (f"; {len(source.skipped)} unreadable image(s) skipped, listed in "
            f"{summary['skipped_file']}")
  print(msg)
  return 0


def run():
  """Console-script entry point."""
  eval_flags.show_in_help(__doc__)
  app.run(main, flags_parser=errors.flags_parser("hcd_predict"))


if __name__ == "__main__":
  run()
