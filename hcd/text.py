"""Text for messages: one line per error, ids shown safely.

Used by every layer (the data layer names files and ids in its errors, the
binaries print them), so it lives at the top of the package and imports
nothing of hcd's.
"""

from __future__ import annotations


def one_line(msg) -> str:
  """Joins a possibly multi-line message into one line (for CLI errors).

  Args:
    msg: an exception or text.

  Returns:
    The first line, then the others joined by "; ".
  """
  parts = [p.strip() for p in str(msg).splitlines() if p.strip()]
  return " ".join(parts[:1] + ["; ".join(parts[1:])] * (len(parts) > 1))


def shown(text: str) -> str:
  """An id or file name as an error message shows it.

  As is when printable, else quoted with its control characters escaped
  ('ab\\rcd'), so that an id holding a carriage return or a newline cannot
  break or forge a line.
  """
  return text if text.isprintable() else repr(text)
