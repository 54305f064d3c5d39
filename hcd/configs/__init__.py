"""Experiment flagfiles for hcd_train, shipped with the package.

  python -m hcd.configs --out_dir=WORKSPACE   # copies *.flags there
  cd WORKSPACE && hcd_train --flagfile=model1.flags

absl resolves a nested `--flagfile=base.flags` relative to the current
directory, so the files are meant to sit together in the workspace root and
be used from there (their --shards_dir=shards and --workdir=runs/<name> are
relative to it too).
"""

from __future__ import annotations

import os
import shutil

BASE = "base.flags"
EXPERIMENTS = ("model1.flags", "model2.flags", "model3.flags", "resnet.flags",
               "pcam.flags", "pcam_cpu.flags", "pcam_ens96.flags",
               "pcam_ens64.flags", "kaggle_gpu.flags")
FLAGFILES = (BASE,) + EXPERIMENTS


def flagfile_path(name: str) -> str:
  """Returns the packaged path of a flagfile.

  Raises:
    ValueError: unknown name (lists the known ones).
  """
  if name not in FLAGFILES:
    raise ValueError(f"unknown flagfile {name!r}; known: {list(FLAGFILES)}")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def copy_flagfiles(out_dir: str, overwrite: bool = False) -> list[str]:
  """Copies the flagfiles into `out_dir` (e.g. a workspace root).

  Args:
    out_dir: destination directory (created if missing).
    overwrite: replace files that already exist (default: keep a user's
      edited copy and report it as skipped).

  Returns:
    The paths written.
  """
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name in FLAGFILES:
    dst = os.path.join(out_dir, name)
    if os.path.exists(dst) and not overwrite:
      continue
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.copyfile(flagfile_path(name), tmp)
    os.replace(tmp, dst)
    written.append(dst)
  return written
