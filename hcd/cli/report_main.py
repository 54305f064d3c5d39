"""hcd_report: run comparison table + validation-AUC overlay, EDA figures.

  hcd_report --workdirs=runs/model1,runs/model2,runs/resnet --out_dir=reports
  hcd_report --workdirs=runs/model1 --out_dir=reports
      --data_dir=data --scan_dir=scans/train     # + EDA figures
  hcd_report --slides_dirs=heatmaps --out_dir=reports  # hcd_slide results
"""

import os

from absl import app
from absl import flags

from hcd import fileio
from hcd.cli import errors
from hcd.cli import eval_flags

eval_flags.define_report_flags()
FLAGS = flags.FLAGS


@errors.guard("hcd_report")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out_dir:
    raise app.UsageError("--out_dir is required")
  scan_csv = FLAGS.scan_csv or (os.path.join(FLAGS.scan_dir, "scan.csv")
                                if FLAGS.scan_dir else None)
  eda_wanted = bool(FLAGS.shards_dir or FLAGS.data_dir or scan_csv)
  if not FLAGS.workdirs and not eda_wanted and not FLAGS.slides_dirs:
    raise app.UsageError("give --workdirs to compare runs and/or --data_dir, "
                         "--shards_dir, --scan_dir for EDA figures, or "
                         "--slides_dirs for hcd_slide results")
  # Imported after flag parsing so --help stays fast.
  from hcd.eval import eda  # pylint: disable=g-import-not-at-top
  from hcd.eval import report  # pylint: disable=g-import-not-at-top
  # Before any run is read: an unwritable --out_dir fails now.
  fileio.check_output_dir(FLAGS.out_dir)
  fileio.remove_stale_tmp(FLAGS.out_dir)
  # Any failure is one error line (errors.guard), exit status 1.
  if FLAGS.workdirs:
    out = report.compare_runs(FLAGS.workdirs, FLAGS.out_dir,
                              FLAGS.names or None)
    with open(out["markdown"], encoding="utf-8") as f:
      print(f.read())
    print(f"hcd_report: wrote {out['markdown']}, {out['csv']}"
          + (f", {out['val_auc_png']}" if out["val_auc_png"] else
             " (no validation AUC history to plot)"))
  if FLAGS.slides_dirs:
    from hcd.eval import slide_outputs  # pylint: disable=g-import-not-at-top
    path = slide_outputs.write_slides_report(FLAGS.slides_dirs, FLAGS.out_dir)
    with open(path, encoding="utf-8") as f:
      print(f.read())
    print(f"hcd_report: wrote {path}")
  if eda_wanted:
    figs = eda.make_eda(FLAGS.out_dir, FLAGS.shards_dir, FLAGS.data_dir,
                        FLAGS.split, scan_csv, FLAGS.num_samples,
                        FLAGS.seed, FLAGS.labels_csv)
    written = [v for k, v in figs.items() if k in (
        "label_frequency", "samples", "flagged") and v]
    print(f"hcd_report: EDA figures {written}; label counts "
          f"{figs['label_counts']}; flagged images {figs['num_flagged']}")
  return 0


def run():
  """Console-script entry point."""
  eval_flags.show_in_help(__doc__)
  app.run(main, flags_parser=errors.flags_parser("hcd_report"))


if __name__ == "__main__":
  run()
