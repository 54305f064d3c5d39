"""Atomic file writes and output checks shared by every tool (TensorFlow-free).

Every artifact is written under a temporary name and renamed into place, so
an interrupted tool never leaves a half-written file under a final name. The
temporary name is `<final name>.tmp-<pid>[suffix]`: the pid tells a rerun
which leftovers belong to a process that is gone (`remove_stale_tmp`).

A failed write removes its temporary file and raises an OSError that names
the final path (a failed `write()` names no file by itself), so a binary can
report "<path>: no space left on device" in one line.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import re
import shutil
from typing import Iterable, Iterator, Sequence

# `<name>.tmp-<pid>` plus an optional suffix (Keras insists on ".keras").
_TMP_RE = re.compile(r"\.tmp-(\d+)(\.[A-Za-z0-9]+)?$")


def tmp_name(path: str, suffix: str = "") -> str:
  """The temporary name this process writes `path` under."""
  return f"{path}.tmp-{os.getpid()}{suffix}"


def named_error(e: OSError, path: str) -> OSError:
  """The same OSError (same errno, same subclass) naming `path`."""
  return OSError(e.errno, e.strerror or os.strerror(e.errno or 0), path)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path to write; renames it to `path` on success.

  On any failure the temporary file (or directory) is removed, and an
  OSError is re-raised naming `path` rather than the temporary name.

  Args:
    path: the final path.
    suffix: appended to the temporary name (writers that insist on one).
  """
  tmp = tmp_name(path, suffix)
  try:
    yield tmp
    os.replace(tmp, path)
  except OSError as e:
    raise named_error(e, path) from None
  finally:
    remove_path(tmp)  # Still there only when the write or rename failed.


@contextlib.contextmanager
def made_dirs(path: str) -> Iterator[None]:
  """Creates a directory (and its missing parents) for the block.

  If the block fails, the directories this call created are removed again
  while still empty, so a run refused before it wrote anything leaves no
  empty skeleton behind.

  Raises:
    OSError: naming the directory that cannot be created.
  """
  created = []  # Deepest first.
  parent = os.path.abspath(path)
  while not os.path.isdir(parent):
    created.append(parent)
    parent = os.path.dirname(parent)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise named_error(e, path) from None
  try:
    yield
  except BaseException:
    for d in created:
      try:
        os.rmdir(d)
      except OSError:  # Not empty (or already gone): keep it.
        break
    raise


def remove_path(path: str) -> None:
  """Deletes a file, link or directory tree; nothing if it does not exist."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


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

  Raises:
    OSError: naming `path` (no space left, read-only, a directory, ...);
      nothing is left behind.
  """
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8", newline="") as f:
      if isinstance(text, str):
        f.write(text)
      else:
        for piece in text:
          f.write(piece)
      if fsync:
        f.flush()
        os.fsync(f.fileno())


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


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: it exists, owned by someone else.
    return True
  return True


def is_stale_tmp(name: str) -> bool:
  """True for a temporary name (`*.tmp-<pid>*`) whose process is gone.

  A live pid keeps its file: another tool (e.g. hcd_evaluate writing into a
  run that hcd_train resumes) may be about to rename it into place.
  """
  m = _TMP_RE.search(name)
  return bool(m) and not _pid_alive(int(m.group(1)))


def remove_stale_tmp(directory: str, recursive: bool = False,
                     prefix: str = "") -> list[str]:
  """Deletes the stale temporary files of killed writers in `directory`.

  Args:
    directory: where to look (nothing happens if it does not exist).
    recursive: also look in its subdirectories.
    prefix: only names that start with it (e.g. one output file's name, in
      a directory shared with other things).

  Returns:
    The removed paths.
  """
  removed = []
  if not os.path.isdir(directory):
    return removed
  for root, dirs, files in os.walk(directory):
    for name in files + dirs:
      path = os.path.join(root, name)
      if name.startswith(prefix) and is_stale_tmp(name):
        remove_path(path)
        removed.append(path)
    dirs[:] = [d for d in dirs if recursive and
               os.path.join(root, d) not in removed]
  return removed


def _nearest_existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def _refuse(code: int, path: str):
  raise OSError(code, os.strerror(code), path)


def _check_writable_dir(existing: str, path: str) -> None:
  if not os.path.isdir(existing):
    _refuse(errno.ENOTDIR, existing)
  if not os.access(existing, os.W_OK | os.X_OK):
    read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
    _refuse(errno.EROFS if read_only else errno.EACCES, path)


def check_output_dir(path: str) -> None:
  """Checks that a directory can be created (or written) at `path`.

  Creates nothing: a run that fails later must not leave an empty directory
  behind. Called before a tool reads any data, so a bad output path fails in
  a second instead of after the work.

  Raises:
    OSError: ENOTDIR (a file is in the way), EROFS (read-only file system)
      or EACCES (permission denied), naming the path.
  """
  _check_writable_dir(_nearest_existing(path), path)


def check_output_file(path: str) -> None:
  """Checks that a file can be written at `path` (see `check_output_dir`).

  Raises:
    OSError: EISDIR when `path` is a directory, EEXIST when it is another
      kind of non-regular file (a device: renaming over /dev/null would
      replace the device), else as `check_output_dir` for its parent.
  """
  if os.path.isdir(path):
    _refuse(errno.EISDIR, path)
  if os.path.exists(path) and not os.path.isfile(path):
    raise OSError(errno.EEXIST, "exists and is not a regular file", path)
  existing = _nearest_existing(os.path.dirname(os.path.abspath(path)))
  _check_writable_dir(existing, path)
