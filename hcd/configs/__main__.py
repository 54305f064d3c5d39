"""Copies hcd_train's experiment flagfiles into a workspace.

  python -m hcd.configs --out_dir=.   # then: hcd_train --flagfile=model1.flags
  python -m hcd.configs --out_dir=ws --overwrite
"""

import argparse
import os
import sys

import hcd.configs as configs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m hcd.configs",
      description="Copy hcd_train flagfiles (" + ", ".join(configs.FLAGFILES) +
      ") into a workspace root.")
  parser.add_argument("--out_dir", default=".",
                      help="destination (the workspace root); default: .")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace existing files (default: keep them)")
  args = parser.parse_args(argv)
  written = configs.copy_flagfiles(args.out_dir, overwrite=args.overwrite)
  for name in configs.FLAGFILES:
    path = os.path.join(args.out_dir, name)
    state = "wrote" if path in written else "kept existing"
    print(f"{state} {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
