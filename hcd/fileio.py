"""File helpers shared by every tool: atomic writes, sizes (TensorFlow-free).

Every artifact is written under a temporary name and renamed into place, so
an interrupted tool never leaves a half-written file under a final name.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Iterable, Sequence


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
  try:
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
  finally:
    if os.path.exists(tmp):  # Only when the write or rename failed.
      os.remove(tmp)


def atomic_write_csv(path: str, rows: Iterable[Sequence], fsync: bool = True
                     ) -> None:
  """Writes rows as CSV (the csv module, "\\n" lines), atomically.

  A field is quoted where it has to be (a comma, a quote, a line break), so
  `csv.reader` reads back exactly the rows written: ids are file names, and
  a file name can hold any of these.

  Args:
    path: the final path.
    rows: the header and data rows; fields are written with str(), so pass
      floats as repr() text to keep them exact.
    fsync: see `atomic_write_text`.
  """
  rows = [[str(f) for f in row] for row in rows]
  # csv quotes a field that holds a character of the line terminator; with
  # "\n" lines a bare "\r" would stay unquoted and end the row early for a
  # reader, so a file holding one quotes every field.
  bare_cr = any("\r" in f for row in rows for f in row)
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n",
             quoting=csv.QUOTE_ALL if bare_cr else csv.QUOTE_MINIMAL
             ).writerows(rows)
  atomic_write_text(path, buf.getvalue(), fsync)


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
