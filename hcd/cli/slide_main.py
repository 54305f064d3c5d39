"""hcd_slide: a patch model's tumour heatmap of whole-slide images.

  hcd_slide --workdir=runs/resnet --slides='slides/*.svs' --out_dir=heatmaps
      --tta=8
  hcd_slide --ensemble='runs/cv/fold*' --slides=slides.csv --out_dir=heatmaps
      --labels_csv=slide_labels.csv           # + slide-level ROC-AUC
  hcd_slide ... --num_workers=4 --worker_index=2   # one host of four
  hcd_slide --merge --out_dir=heatmaps [--labels_csv=...]  # join the hosts

Each slide gets <out_dir>/<slide name>/ with tiles.csv, heatmap.npy/.png,
overlay.png, tissue_mask.png, regions.geojson and summary.json; the set gets
slides.csv. A rerun skips finished slides and continues a partly done one.
A bad slide is one error line naming it; the others go on, and the exit
status is 1 when any failed.
"""

import sys

from absl import app
from absl import flags

from hcd.cli import errors
from hcd.cli import eval_flags

eval_flags.define_slide_flags()
FLAGS = flags.FLAGS
PROG = "hcd_slide"


def _config():
  """The SlideConfig of the flags (checked before anything is read)."""
  from hcd.eval import slide  # pylint: disable=g-import-not-at-top
  cfg = slide.SlideConfig(
      target_mpp=FLAGS.target_mpp, mpp=FLAGS.mpp, stride=FLAGS.stride,
      min_tissue=FLAGS.min_tissue, threshold=FLAGS.threshold,
      batch_size=FLAGS.batch_size, tta=FLAGS.tta,
      jit_compile=FLAGS.jit_compile, progress=FLAGS.progress)
  try:
    slide.check_config(cfg)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  return cfg


def _merge(labels) -> int:
  from hcd.eval import slide  # pylint: disable=g-import-not-at-top
  path, metrics = slide.merge(FLAGS.out_dir, labels)
  print(f"{PROG}: joined the workers' rows into {path}" + (
      f"; slide-level ROC-AUC {metrics['roc_auc']}" if metrics else ""))
  return 0


@errors.guard(PROG, where=lambda: FLAGS.out_dir)
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out_dir:
    raise app.UsageError("--out_dir is required")
  cfg = _config()
  # Imported after flag parsing so --help stays fast.
  from hcd import fileio  # pylint: disable=g-import-not-at-top
  from hcd.eval import slide  # pylint: disable=g-import-not-at-top
  labels = slide.read_labels(FLAGS.labels_csv) if FLAGS.labels_csv else None
  if FLAGS.merge:
    return _merge(labels)
  if not FLAGS.slides:
    raise app.UsageError("--slides is required (a pattern or a CSV)")
  fileio.check_output_dir(FLAGS.out_dir)
  paths = slide.list_slides(FLAGS.slides)
  try:
    slide.worker_share(paths, FLAGS.num_workers, FLAGS.worker_index)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  model_paths = eval_flags.model_paths(FLAGS)
  result = slide.run_slides(
      model_paths, paths, FLAGS.out_dir, cfg, labels, FLAGS.num_workers,
      FLAGS.worker_index,
      log=lambda line: print(f"{PROG}: {line}", flush=True,
                             file=sys.stderr if line.startswith("error:")
                             else sys.stdout))
  msg = (f"{PROG}: {len(result.summaries)} slide(s) done, rows in "
         f"{result.rows_csv}")
  if result.metrics:
    msg += f"; slide-level ROC-AUC {result.metrics['roc_auc']}"
  if FLAGS.num_workers > 1:
    msg += (f" (worker {result.worker_index} of {FLAGS.num_workers}; "
            f"'{PROG} --merge --out_dir={FLAGS.out_dir}' joins them)")
  print(msg)
  if result.failed:
    print(f"{PROG}: error: {len(result.failed)} of "
          f"{len(result.failed) + len(result.summaries)} slide(s) failed "
          f"(one line each above); fix or remove them and rerun: finished "
          f"slides are skipped", file=sys.stderr)
    return 1
  return 0


def run():
  """Console-script entry point."""
  eval_flags.show_in_help(__doc__)
  app.run(main, flags_parser=errors.flags_parser(PROG))


if __name__ == "__main__":
  run()
