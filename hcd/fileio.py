"""File helpers shared by every tool: atomic writes, sizes (TensorFlow-free).

Every artifact is written under a temporary name and renamed into place, so
an interrupted tool never leaves a half-written file under a final name.
"""

from __future__ import annotations

import os


def atomic_write_text(path: str, text: str, fsync: bool = True) -> None:
  """Writes text under a temporary name, then renames it into place.

  Args:
    path: the final path.
    text: the contents.
    fsync: flush to disk before the rename. Shard sidecars skip it: a rename
      is atomic against a killed process without it, and on ext4 an fsync
      while gigabytes of shards are dirty can stall for seconds.
  """
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    f.write(text)
    if fsync:
      f.flush()
      os.fsync(f.fileno())
  os.replace(tmp, path)


def file_size(path: str) -> int:
  """Returns a file's size in bytes, or -1 if it is missing or unreadable."""
  try:
    return os.path.getsize(path)
  except OSError:
    return -1
