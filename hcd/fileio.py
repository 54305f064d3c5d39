"""File helpers shared by every tool: atomic writes, sizes (TensorFlow-free).

Every artifact is written under a temporary name and renamed into place, so
an interrupted tool never leaves a half-written file under a final name.
"""

from __future__ import annotations

import os
from typing import Iterable


def atomic_write_text(path: str, text: str | Iterable[str],
                      fsync: bool = True) -> None:
  """Writes text under a temporary name, then renames it into place.

  Args:
    path: the final path.
    text: the contents: one string, or strings written one after another
      (a large file need not be joined into one string first).
    fsync: flush to disk before the rename. Shard sidecars skip it: a rename
      is atomic against a killed process without it, and on ext4 an fsync
      while gigabytes of shards are dirty can stall for seconds.
  """
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    if isinstance(text, str):
      f.write(text)
    else:
      for piece in text:
        f.write(piece)
    if fsync:
      f.flush()
      os.fsync(f.fileno())
  os.replace(tmp, path)


def file_size(path: str) -> int:
  """Returns a file's size in bytes.

  Args:
    path: the file.

  Returns:
    Its size, or -1 if it is missing or unreadable.
  """
  try:
    return os.path.getsize(path)
  except OSError:
    return -1
