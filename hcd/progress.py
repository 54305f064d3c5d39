"""Progress bars: one policy for every long-running step of hcd.

tqdm draws them. On a terminal a bar redraws twice a second. Where stderr is
not a terminal (docker logs, nohup, CI), tqdm's default would still append
an update every 0.1 s to the log; there a bar writes every 30 s instead,
and its final state when it closes.
"""

from __future__ import annotations

import sys

# Seconds between updates when stderr is a log file or pipe, not a terminal.
LOG_INTERVAL_S = 30.0
_TERMINAL_INTERVAL_S = 0.5


def bar(iterable=None, *, total: int | None = None, desc: str | None = None,
        unit: str = "it", enabled: bool = True, **kwargs):
  """A tqdm progress bar on stderr, paced for a terminal or for a log.

  Args:
    iterable: what to iterate, as tqdm(iterable) (None: call update()).
    total: the number of units (default: len(iterable), where it has one).
    desc: the bar's label.
    unit: what is counted ("img", "step", "shard").
    enabled: False: a bar that draws nothing (the --noprogress flags).
    **kwargs: further tqdm options (leave, smoothing, ...).

  Returns:
    The tqdm bar (a context manager; iterate it when given an iterable).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  # Imported here: tqdm's import is a visible share of a short tool run.
  interactive = sys.stderr.isatty()
  kwargs.setdefault("mininterval",
                    _TERMINAL_INTERVAL_S if interactive else LOG_INTERVAL_S)
  return tqdm(iterable, total=total, desc=desc, unit=unit,
              disable=not enabled, dynamic_ncols=interactive,
              file=sys.stderr, **kwargs)
