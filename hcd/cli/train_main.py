"""hcd_train: train a model from TFRecord shards into a run directory.

  hcd_train --flagfile=model1.flags
  hcd_train --flagfile=resnet.flags --val_split=valid --epochs=3

Flags: hcd/cli/flags.py. Experiment flagfiles: hcd/configs/ (put them in a
workspace with `python -m hcd.configs --out_dir=.`). An interrupted run
resumes from its last checkpoint when started again with the same flags.
"""

import logging as std_logging
import sys

from absl import app

from hcd.cli import errors
from hcd.cli import flags as train_flags

FLAGS = train_flags.FLAGS


@errors.guard("hcd_train", exit_code=2)
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported after flag parsing so that --help does not load TensorFlow.
  from hcd.train import loop  # pylint: disable=g-import-not-at-top
  # TensorFlow's INFO lines (per-collective and per-save notes) drown the
  # per-epoch log; its warnings and errors still show.
  std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
  # Failures become one error line (errors.guard), exit status 2.
  config = train_flags.config_from_flags(FLAGS)
  loop.train_and_evaluate(config, strategy=None,
                          flags_text=train_flags.resolved_flags_text(
                              config, FLAGS))


def run():
  """Console-script entry point (setup.cfg: hcd_train)."""
  # absl's --help shows the main module's doc and key flags; under a console
  # script the main module is a shim, so point both at this binary's.
  for flag in FLAGS.get_flags_for_module(train_flags):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules.get("__main__")
  if main_module is not None and not main_module.__doc__:
    main_module.__doc__ = __doc__
  app.run(main, flags_parser=errors.flags_parser("hcd_train"))


if __name__ == "__main__":
  run()
