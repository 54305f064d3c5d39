"""TensorFlow's start-up log lines, filtered by TF_CPP_MIN_LOG_LEVEL again.

TensorFlow 2.19 and later log from C++ through Abseil while their shared
libraries load, before `absl::InitializeLog()` has run, and those lines
ignore TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442). With
TensorFlow 2.21 on a CPU-only machine every process that imports it prints,
twice and even at level 3:

  WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
  I0000 00:00:1796607109.318064    1621 port.cc:153] oneDNN custom operations are on. ...
  I0000 00:00:1796607109.318412    1621 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.

Lines logged after the import obey the variable. `install()` (called by
every binary, hcd.cli.errors.guard) makes the first `import tensorflow` of
the process run with file descriptor 2 sent to a temporary file; once the
import is done, the lines TF_CPP_MIN_LOG_LEVEL lets through are written to
stderr, so a binary prints what the level asks for, as with TensorFlow 2.17
(e.g. exactly one line when make_shards refuses). Python's own writes to
sys.stderr during the import are not captured. With the variable unset or
0 nothing is changed. A crash inside the import (an abort, not an
exception) loses the captured lines.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

# Abseil's line ("I0000 00:00:1796607109.318064    1621 port.cc:153] ...")
# and TensorFlow's older one ("2024-12-07 01:31:21.774922: E external/...]").
_ABSL_LINE = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")
_TF_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) \S+:\d+\] ")
_BANNER = ("WARNING: All log messages before absl::InitializeLog() is called "
           "are written to STDERR")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}


def min_log_level() -> int:
  """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0 when unset or bad)."""
  try:
    return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
  except ValueError:
    return 0


def filter_log(text: str, level: int) -> str:
  """The lines of `text` that TF_CPP_MIN_LOG_LEVEL=`level` lets through.

  A log line is kept when its severity (I, W, E, F = 0..3) is at least
  `level`; a line that is not a log line goes with the one before it (a
  multi-line message), or is kept at the start. Abseil's banner about
  InitializeLog is dropped at any level above 0.
  """
  kept = []
  keep = True
  for line in text.splitlines(keepends=True):
    match = _ABSL_LINE.match(line) or _TF_LINE.match(line)
    if match:
      keep = _SEVERITY[match.group(1)] >= level
    elif line.rstrip("\r\n") == _BANNER:
      if level > 0:
        continue
      keep = True
    if keep:
      kept.append(line)
  return "".join(kept)


@contextlib.contextmanager
def filtered_stderr(level: int):
  """Sends file descriptor 2 to a temporary file for the block, then
  writes to stderr what `filter_log(..., level)` keeps of it.

  sys.stderr (Python's own writes) keeps going to the real stderr.
  """
  try:
    log = tempfile.TemporaryFile() if level > 0 else None
  except OSError:
    log = None
  if log is None:
    yield
    return
  with log:
    python_stderr = sys.stderr
    python_stderr.flush()
    saved = os.dup(2)
    sys.stderr = open(saved, "w", closefd=False,  # pylint: disable=consider-using-with
                      encoding=getattr(python_stderr, "encoding", None),
                      errors="backslashreplace")
    os.dup2(log.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      sys.stderr = python_stderr
      os.dup2(saved, 2)
      os.close(saved)
      log.seek(0)
      text = filter_log(log.read().decode("utf-8", "replace"), level)
      if text:
        python_stderr.write(text)
        python_stderr.flush()


class _Finder(importlib.abc.MetaPathFinder):
  """Runs the first `import tensorflow` inside `filtered_stderr`."""

  def find_spec(self, fullname, path, target=None):
    del path, target  # Unused.
    if fullname != "tensorflow":
      return None
    uninstall()
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:
      return spec
    loader = spec.loader

    class _Loader(importlib.abc.Loader):

      def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(loader, name)

      def create_module(self, spec):
        return loader.create_module(spec)

      def exec_module(self, module):
        try:
          with filtered_stderr(min_log_level()):
            loader.exec_module(module)
        finally:
          module.__loader__ = loader
          if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = loader

    spec.loader = _Loader()
    return spec


_FINDER = _Finder()


def install() -> None:
  """Filters the start-up log of this process's first `import tensorflow`.

  A no-op once TensorFlow is imported; the level is read at the import.
  """
  if "tensorflow" not in sys.modules and _FINDER not in sys.meta_path:
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
  """Undoes `install()` (the first import of TensorFlow also does)."""
  if _FINDER in sys.meta_path:
    sys.meta_path.remove(_FINDER)
