"""The writer side of tools/make_shards: one task writes one shard.

A `ShardTask` names a shard's images, in write order, and how to screen
them; `write_shard_task` reads, checks (hcd.data.screening) and writes them
block by block under a temporary name, renames the finished shard into
place and writes its sidecar last (a shard without one is redone by the
next run). `run_tasks` runs the tasks in this process or in a pool of
writer processes that die with their parent. Planning which shards to write
and assembling the manifest is hcd/data/writer.py's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
from typing import Callable, Iterator

import numpy as np

from hcd import fileio
from hcd.data import decode
from hcd.data import features
from hcd.data import parallel
from hcd.data import screening
from hcd.data.manifest import ShardError
from hcd.data.tfrecord import encode_block_head
from hcd.data.tfrecord import RecordWriter
from hcd.fileio import atomic_write_text

# Test hook: a writer process SIGKILLs itself (and the main process) after
# writing this many blocks, to test recovery from kill -9 deterministically.
KILL_AFTER_BLOCKS_ENV = "HCD_MAKE_SHARDS_KILL_AFTER_BLOCKS"


@contextlib.contextmanager
def open_shard(path: str) -> Iterator[RecordWriter]:
  """A RecordWriter on the shard's temporary name (`fileio.tmp_name`).

  The caller renames `writer.path` to `path` when the shard is complete.
  Whatever happens before that, the partial file is deleted; an OSError
  (disk full, say) is re-raised naming the shard, since a failed write()
  names no file and "No space left on device" alone does not say where.

  Args:
    path: the shard's final path.

  Yields:
    The open RecordWriter.
  """
  writer = None
  try:
    writer = RecordWriter(fileio.tmp_name(path))
    yield writer
  except OSError as e:
    raise fileio.named_error(e, path) from None
  finally:
    if writer is not None:
      writer.abort()  # A no-op once the file has been renamed into place.




@dataclasses.dataclass
class ShardTask:
  """One shard to write: which images, where, how to screen them."""
  index: int
  path: str
  sidecar: str
  fingerprint: str
  members: list  # [(path, id, label)] in write order.
  dark_max: int
  bright_min: int
  dark_bright: str  # "exclude" or "keep" (then only flagged).
  block_size: int
  skip_invalid: bool


_blocks_written = 0


def _maybe_die() -> None:
  """Test hook: simulates kill -9 of the whole run (KILL_AFTER_BLOCKS_ENV)."""
  global _blocks_written
  _blocks_written += 1
  limit = os.environ.get(KILL_AFTER_BLOCKS_ENV)
  if limit and _blocks_written >= int(limit):
    if _main_pid and _main_pid != os.getpid():
      os.kill(_main_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class _ShardBuilder:
  """A shard's images gathered block by block; each full block is screened
  for dark and bright images and written."""

  def __init__(self, task: ShardTask, writer: RecordWriter,
               on_progress: Callable[[int], None] | None):
    self.task = task
    self.writer = writer
    self.on_progress = on_progress
    self.block = np.empty((task.block_size,) + features.IMAGE_SHAPE, np.uint8)
    self.paths: list[str] = []
    self.ids: list[str] = []
    self.labels: list[int] = []
    self.excluded: list[dict] = []
    self.flagged: list[dict] = []
    self.invalid: list[dict] = []
    self.counts: collections.Counter = collections.Counter()
    self.layouts = decode.TiffLayoutCache()

  def add(self, path: str, rid: str, label: int) -> None:
    """Reads and checks one image; writes the block once it is full."""
    try:
      img = decode.read_image(path, self.layouts)
    except decode.ImageError as e:
      self.invalid.append({"id": rid, "path": path, "reason": e.reason})
      return
    # A Kaggle id is the SHA-1 of the pixels: a mismatch means the file
    # is not the image its name (and so its label) claims.
    mismatch = screening.check_sha1(rid, img)
    if mismatch:
      self.invalid.append({"id": rid, "path": path, "reason": mismatch})
      return
    self.block[len(self.ids)] = img
    self.paths.append(path)
    self.ids.append(rid)
    self.labels.append(label)
    if len(self.ids) == self.task.block_size:
      self.flush()

  def _screen(self, n: int):
    """(images, ids, labels) of the block to write; records dark/bright."""
    task, ids, labels = self.task, self.ids, self.labels
    flat = self.block[:n].reshape(n, -1)
    mx, mn = flat.max(axis=1), flat.min(axis=1)
    bad = (screening.is_dark(mx, task.dark_max) |
           screening.is_bright(mn, task.bright_min))
    if not bad.any():
      return self.block[:n], ids, labels
    for j in np.nonzero(bad)[0]:
      reason = screening.dark_bright_reason(mn[j], mx[j], task.dark_max,
                                            task.bright_min)
      (self.excluded if task.dark_bright == "exclude" else self.flagged
       ).append({"id": ids[j], "path": self.paths[j], "reason": reason})
    if task.dark_bright != "exclude":
      return self.block[:n], ids, labels
    keep = np.nonzero(~bad)[0]
    return (self.block[:n][keep], [ids[j] for j in keep],
            [labels[j] for j in keep])

  def flush(self) -> None:
    """Writes the images gathered so far as one record."""
    n = len(self.ids)
    if not n:
      return
    images, keep_ids, keep_labels = self._screen(n)
    if keep_ids:
      self.writer.write(
          encode_block_head(images.nbytes, keep_ids, keep_labels), images)
      self.counts.update(keep_labels)
    if self.on_progress:
      self.on_progress(n)
    self.paths.clear()
    self.ids.clear()
    self.labels.clear()
    _maybe_die()

  def result(self, num_bytes: int, sha: str) -> dict:
    """The task's result; "entry" is None when invalid images refuse it."""
    task = self.task
    result = {"index": task.index, "fingerprint": task.fingerprint,
              "entry": None, "excluded": self.excluded,
              "flagged": self.flagged, "invalid": self.invalid}
    if self.invalid and not task.skip_invalid:
      return result
    result["excluded"] = self.excluded + self.invalid
    result["invalid"] = []
    result["entry"] = {
        "file": os.path.basename(task.path),
        "num_examples": sum(self.counts.values()),
        "num_records": self.writer.num_records,
        "label_counts": {str(k): v for k, v in sorted(self.counts.items())},
        "bytes": num_bytes,
        "sha256": sha,
        "fingerprint": task.fingerprint,
    }
    return result


def write_shard_task(task: ShardTask,
                     on_progress: Callable[[int], None] | None = None
                     ) -> dict:
  """Decodes, screens and writes one shard, then its sidecar.

  Args:
    task: the shard.
    on_progress: called with the number of images of each block done.

  Returns:
    {"index", "fingerprint", "entry" (None if not written), "excluded",
     "flagged", "invalid"}. Invalid images (unreadable, bad shape, pixels
    not hashing to a Kaggle id) are excluded with `skip_invalid`; otherwise
    the shard is not written and they are returned in "invalid".
  """
  # Any failure, and a shard refused for its invalid images, leaves no
  # partial file behind (open_shard).
  with open_shard(task.path) as writer, parallel.gc_paused():
    shard = _ShardBuilder(task, writer, on_progress)
    for path, rid, label in task.members:
      shard.add(path, rid, label)
    shard.flush()
    result = shard.result(*writer.close())
    if result["entry"] is None:
      return result
    os.replace(writer.path, task.path)
  # The sidecar goes last: a shard without one is simply redone.
  atomic_write_text(task.sidecar, json.dumps(result) + "\n", fsync=False)
  return result


_progress_counter = None
_main_pid = None


def _die_with_parent() -> None:
  """Makes Linux SIGKILL this process when its parent dies.

  Without it, pool workers outlive a killed (kill -9) main process: they
  block forever on the task queue, still holding the split's lock.
  """
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # Not Linux: workers exit on EOF only.
    return
  if os.getppid() == 1:  # The parent died before prctl took effect.
    os._exit(1)  # pylint: disable=protected-access


def _init_worker(counter, main_pid: int) -> None:
  global _progress_counter, _main_pid
  _die_with_parent()
  _progress_counter = counter
  _main_pid = main_pid
  # Ctrl-C goes to the whole process group; let the main process handle it
  # (it cancels the pool) instead of every worker printing a traceback.
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _add_progress(n: int) -> None:
  with _progress_counter.get_lock():
    _progress_counter.value += n


def _pool_write_shard(task: ShardTask) -> dict:
  return write_shard_task(task, _add_progress)


def run_tasks(tasks: list[ShardTask], workers: int,
              pbar) -> Iterator[dict]:
  """Runs shard tasks in this process (workers <= 1) or a process pool."""
  global _main_pid
  _main_pid = os.getpid()
  if workers <= 1 or len(tasks) <= 1:
    for t in tasks:
      yield write_shard_task(t, pbar.update)
    return
  # Forked while this process is free of TensorFlow (the CLI), else
  # forkserver (see hcd.data.parallel).
  ctx = parallel.pool_context()
  counter = ctx.Value("q", 0)
  with concurrent.futures.ProcessPoolExecutor(
      min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
      initargs=(counter, os.getpid())) as pool:
    pending = {pool.submit(_pool_write_shard, t) for t in tasks}
    try:
      while pending:
        done, pending = concurrent.futures.wait(
            pending, timeout=0.2,
            return_when=concurrent.futures.FIRST_COMPLETED)
        pbar.update(counter.value - pbar.n)
        for f in done:
          yield f.result()
    except concurrent.futures.process.BrokenProcessPool:
      raise ShardError("a make_shards worker process died (killed, or out of "
                       "memory); rerun the same command to resume") from None
    except BaseException:
      for f in pending:
        f.cancel()
      raise
