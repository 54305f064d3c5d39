"""How the binaries fail: one line, `<prog>: error: <file>: <what>; <remedy>`.

Library code raises errors whose message names the file at fault and the
remedy (hcd's own error types), OSErrors that carry the path (hcd.fileio
names the final path of a failed write) and TensorFlow errors whose message
names the file. `guard` wraps a binary's `main` so that every failure is
printed as one such line and the binary exits non-zero: a traceback is for
bugs, not for a full disk. `HCD_TRACEBACK=1` re-raises, to see one anyway.
`guard` also makes TensorFlow's start-up log obey TF_CPP_MIN_LOG_LEVEL
(hcd.tflog), so that stderr holds that line alone.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable

from absl import app

from hcd import tflog
from hcd.text import one_line

TRACEBACK_ENV = "HCD_TRACEBACK"

_WRITE_ELSEWHERE = "write elsewhere"
_REMEDIES = {
    errno.ENOSPC: "free some space there or " + _WRITE_ELSEWHERE,
    errno.EDQUOT: "free some space there or " + _WRITE_ELSEWHERE,
    errno.EROFS: _WRITE_ELSEWHERE,
    errno.EACCES: _WRITE_ELSEWHERE + " or fix the permissions",
    errno.EPERM: _WRITE_ELSEWHERE + " or fix the permissions",
    errno.EISDIR: "give a file name, not a directory",
    errno.EEXIST: "give the name of a new or regular file",
    errno.ENOTDIR: "a file is in the way; remove it or choose another path",
}


def _tf_error(e: BaseException) -> bool:
  tf = sys.modules.get("tensorflow")  # Never imported just to check.
  return tf is not None and isinstance(e, tf.errors.OpError)


def describe(e: BaseException, where: str | None = None) -> str:
  """The one-line description of a failure.

  Args:
    e: the exception.
    where: the output path to name when an OSError names none.

  Returns:
    "<path>: <cause>; <remedy>" for OSErrors (cause as the system says it,
    e.g. "no space left on device"), TensorFlow's own words for its errors
    (which name the file), else the exception's message.
  """
  if isinstance(e, OSError) and e.errno is not None:
    path = e.filename or where
    cause = (e.strerror or os.strerror(e.errno)).lower()
    text = f"{path}: {cause}" if path else cause
    remedy = _REMEDIES.get(e.errno)
    return f"{text}; {remedy}" if remedy else text
  if _tf_error(e):
    from hcd.data import shard_reader  # pylint: disable=g-import-not-at-top
    text = shard_reader.op_message(e)
    if "no space left on device" in text.lower():
      text += "; " + _REMEDIES[errno.ENOSPC]
    return text
  return str(e) or type(e).__name__


def guard(prog: str, exit_code: int = 1,
          where: Callable[[], str | None] | None = None):
  """Decorates a binary's `main(argv)`: any failure becomes one error line.

  Args:
    prog: the binary's name, the line's prefix.
    exit_code: the exit status of a failure.
    where: returns the output path to name for an OSError without one.

  Returns:
    The decorator. A usage error (a bad flag value) is one line too, not
    absl's page of usage text: `<prog>: error: <what>; --help lists the
    flags`, with the error's exit code.
  """

  def decorate(main):

    @functools.wraps(main)
    def guarded(argv):
      # TensorFlow's start-up lines obey TF_CPP_MIN_LOG_LEVEL (hcd.tflog).
      tflog.install()
      try:
        return main(argv)
      except app.UsageError as e:
        if os.environ.get(TRACEBACK_ENV):
          raise
        print(f"{prog}: error: {one_line(e)}; --help lists the flags",
              file=sys.stderr)
        return e.exitcode
      except Exception as e:  # pylint: disable=broad-except
        if os.environ.get(TRACEBACK_ENV):
          raise
        text = one_line(describe(e, where() if where else None))
        print(f"{prog}: error: {text}", file=sys.stderr)
        return exit_code

    return guarded

  return decorate


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """absl's flag parser, with a parse error as one line.

  For `app.run(main, flags_parser=...)`: a malformed value (`--tta=abc`), an
  unknown flag or a missing flagfile prints `<prog>: error: <what>; --help
  lists the flags` and exits 1, instead of absl's two lines.

  Args:
    prog: the binary's name, the line's prefix.

  Returns:
    The parser: argv in, the remaining arguments out.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"{prog}: error: {one_line(e)}; --help lists the flags",
            file=sys.stderr)
      sys.exit(1)

  return parse
