"""Process pools and loop helpers for the data tools (TensorFlow-free).

Workers are forked, so they start in milliseconds and inherit the parent's
imports; forking a process that has loaded TensorFlow (pytest, a notebook)
risks deadlocking on the locks of TF's threads, so there `forkserver` is
used instead and the workers start clean.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import multiprocessing
import sys
from typing import Callable, Iterable, Iterator, Sequence


def pool_context():
  """The multiprocessing context for data workers (see module docstring)."""
  return multiprocessing.get_context(
      "forkserver" if "tensorflow" in sys.modules else "fork")


def imap(fn: Callable, tasks: Sequence, workers: int) -> Iterator:
  """Yields fn(task) for each task, in order, over `workers` processes.

  Args:
    fn: a module-level (picklable) function.
    tasks: picklable arguments, one per call.
    workers: number of processes; 1 (or a single task) runs in-process.

  Returns:
    An iterator over the results, in task order.
  """
  if workers <= 1 or len(tasks) <= 1:
    yield from map(fn, tasks)
    return
  # Not multiprocessing.Pool: its worker-handler thread waits on the result
  # pipe without reading it, so it spins whenever a result is in transit
  # (0.15-0.25 s of the parent's CPU per 100k scanned images, taken from
  # the workers on a 2-core machine). The executor's manager thread reads
  # what it waits for.
  pool = concurrent.futures.ProcessPoolExecutor(
      min(workers, len(tasks)), mp_context=pool_context())
  try:
    yield from pool.map(fn, tasks)
  finally:
    # On an early exit (an error, Ctrl-C), tasks not started are dropped and
    # the running ones finish (each is short) before the workers exit.
    pool.shutdown(wait=True, cancel_futures=True)


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
  """Splits a sequence into consecutive slices of at most `size` items."""
  return [items[s:s + size] for s in range(0, len(items), size)]


@contextlib.contextmanager
def gc_paused():
  """Pauses the cyclic garbage collector (the code inside makes no cycles).

  With hundreds of thousands of live records, ids and tuples, every
  collection re-walks all of them (and, after `import tensorflow`, all of
  TensorFlow's objects): 10-20% of the time in the data tools' loops.
  """
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was_enabled:
      gc.enable()
