"""The shard writer: a resumable, parallel job that converts a split to shards.

`make_split` converts one split of a data directory in a single decode pass
per image (read, decode, screen by `hcd.data.screening`: shape, SHA-1 of the
pixels against a Kaggle id, dark/bright) and writes whole shards in worker
processes that never import TensorFlow (the bytes come from
`hcd.data.tfrecord`). Which image goes to which shard (`assign_shards`,
`shard_members`) depends only on the ids and labels, so the output never
depends on the number of workers. The layout and manifest are documented in
WORKSPACE.md ("Shards"); readers use `hcd.data.manifest`, and
`hcd.data.verify` rereads the output with TensorFlow.

Resumability: each finished shard is renamed into place and then gets a
sidecar `<out_dir>/.hcd-<split>.state/<shard>.json` holding its manifest
entry, the exclusions found in it, and a fingerprint of exactly what went
into it (paths, ids, labels, options). A rerun skips a shard whose sidecar
fingerprint matches and whose file has the recorded size, so a run killed at
any point (kill -9 included) resumes where it stopped, and a rerun on
finished output writes nothing. One lock per split keeps a second run out.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

import hcd
from hcd import progress as progress_lib
from hcd import text
from hcd.data import decode
from hcd.data import features
from hcd.data import parallel
from hcd.data import screening
from hcd.data import sources
from hcd.data.manifest import DATASET_NAME
from hcd.data.manifest import label_counts
from hcd.data.manifest import manifest_path
from hcd.data.manifest import shard_name
from hcd.data.manifest import state_dir
from hcd.data.tfrecord import encode_block_head
from hcd.data.tfrecord import RecordWriter
from hcd import fileio
from hcd.fileio import atomic_write_text
from hcd.fileio import file_size

# Shards of at most this many bytes: 100-200 MB each once there are two or
# more, big enough for sequential reads and few enough files to interleave.
MAX_SHARD_BYTES = 200_000_000
# Bytes per image in a shard beyond its pixels (id, label, framing), used only
# to estimate shard sizes.
_PER_IMAGE_OVERHEAD = 48
DARK_BRIGHT_MODES = ("auto", "exclude", "keep")
_SPLIT_RE = re.compile(r"[A-Za-z0-9_]+")
# Test hook: a writer process SIGKILLs itself (and the main process) after
# writing this many blocks, to test recovery from kill -9 deterministically.
KILL_AFTER_BLOCKS_ENV = "HCD_MAKE_SHARDS_KILL_AFTER_BLOCKS"


class ShardError(ValueError):
  """make_shards refuses, or a shard fails verification; names the file."""


def id_hash(ids: Sequence[str], seed: int = 0) -> np.ndarray:
  """Stable 64-bit hash per id (independent of Python's hash seed).

  Args:
    ids: image ids.
    seed: salts the hash.

  Returns:
    uint64 array, one hash per id.
  """
  out = np.empty(len(ids), np.uint64)
  salt = str(seed).encode()
  for k, i in enumerate(ids):
    out[k] = int.from_bytes(
        hashlib.blake2b(i.encode(), digest_size=8, key=salt).digest(), "little")
  return out


def _assign(h: np.ndarray, labels: np.ndarray, num_shards: int) -> np.ndarray:
  out = np.empty(len(h), np.int64)
  offset = 0
  for lab in np.unique(labels):
    idx = np.nonzero(labels == lab)[0]
    idx = idx[np.argsort(h[idx], kind="stable")]
    # Offsetting each label's deal keeps shard sizes within one of each other.
    out[idx] = (np.arange(len(idx)) + offset) % num_shards
    offset += len(idx)
  return out


def assign_shards(ids: Sequence[str], labels: Sequence[int],
                  num_shards: int) -> np.ndarray:
  """Assigns each image to a shard, deterministically and stratified by label.

  Within each label, images are ordered by a hash of their id and dealt
  round-robin, so each shard gets both classes in the split's proportion and
  the assignment depends only on the set of ids (not on listing order).

  Args:
    ids: image ids.
    labels: their labels (-1 for unlabelled).
    num_shards: number of shards.

  Returns:
    int array: the shard index of each image.
  """
  return _assign(id_hash(ids), np.asarray(labels), num_shards)


def shard_members(ids: Sequence[str], labels: Sequence[int],
                  num_shards: int) -> list[np.ndarray]:
  """Lists each shard's images in the order they are written.

  Shards are those of `assign_shards`; inside a shard, images are ordered
  by the id hash, so the classes are interleaved and any block of a shard is
  a random sample of it (the input pipeline relies on this).

  Args:
    ids: image ids.
    labels: their labels.
    num_shards: number of shards.

  Returns:
    num_shards int arrays of indices into `ids`.
  """
  h = id_hash(ids)
  assignment = _assign(h, np.asarray(labels), num_shards)
  order = np.lexsort((h, assignment))
  bounds = np.cumsum(np.bincount(assignment, minlength=num_shards))[:-1]
  return np.split(order, bounds)


def default_num_shards(num_images: int,
                       counts: dict[str, int] | None = None,
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> int:
  """Chooses a shard count: shards of at most `max_shard_bytes`.

  With two or more shards each is 100-200 MB (by default); small inputs get
  one. A labelled split never gets more shards than its smaller class has
  images, so every shard holds both classes.

  Args:
    num_images: images in the split.
    counts: label counts ({"0": n0, "1": n1}), if labelled.
    max_shard_bytes: the size cap.

  Returns:
    The number of shards, >= 1.
  """
  total = num_images * (features.IMAGE_BYTES + _PER_IMAGE_OVERHEAD)
  n = max(1, math.ceil(total / max_shard_bytes))
  classes = [counts.get(k, 0) for k in ("0", "1")] if counts else []
  if classes and min(classes) > 0:
    n = min(n, min(classes))
  return n


# --- Writing shards -----------------------------------------------------------


@contextlib.contextmanager
def _open_shard(path: str) -> Iterator[RecordWriter]:
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


def write_shard(path: str, images: np.ndarray, ids: Sequence[str],
                labels: Sequence[int],
                block_size: int = features.BLOCK_SIZE) -> dict:
  """Writes one shard of in-memory images atomically; returns its entry.

  Args:
    path: final shard path; written as `<path>.tmp-<pid>`, then renamed.
    images: uint8 [n, 96, 96, 3].
    ids: n ids.
    labels: n labels.
    block_size: images per record.

  Returns:
    The shard's manifest entry (file, counts, bytes, sha256).

  Raises:
    ValueError: images of the wrong dtype or shape, or n mismatches.
  """
  images = np.ascontiguousarray(images)
  n = len(ids)
  if images.dtype != np.uint8 or images.shape != (n,) + features.IMAGE_SHAPE:
    raise ValueError(f"{path}: images must be uint8 "
                     f"{(n,) + features.IMAGE_SHAPE}, got {images.dtype} "
                     f"{images.shape}")
  with _open_shard(path) as writer:
    for s in range(0, n, block_size):
      block = images[s:s + block_size]
      writer.write(encode_block_head(block.nbytes, ids[s:s + block_size],
                                     labels[s:s + block_size]), block)
    num_bytes, sha = writer.close()
    os.replace(writer.path, path)
  return {
      "file": os.path.basename(path),
      "num_examples": n,
      "num_records": writer.num_records,
      "label_counts": label_counts(labels),
      "bytes": num_bytes,
      "sha256": sha,
  }


def build_manifest(split: str, shard_entries: list[dict], source: dict,
                   excluded: list[dict] | None = None,
                   block_size: int = features.BLOCK_SIZE) -> dict:
  """Assembles a manifest dict (see WORKSPACE.md) from shard entries.

  Args:
    split: split name.
    shard_entries: one entry per shard (`write_shard`), in order.
    source: the manifest's "source" entry.
    excluded: images left out, {"id", "path", "reason"} each.
    block_size: images per record.

  Returns:
    The manifest, with totals over the entries.
  """
  totals: dict[str, int] = {}
  for e in shard_entries:
    for k, v in e["label_counts"].items():
      totals[k] = totals.get(k, 0) + v
  return {
      "schema_version": features.SCHEMA_VERSION,
      "record_format": features.RECORD_FORMAT,
      "name": DATASET_NAME,
      "split": split,
      "image_shape": list(features.IMAGE_SHAPE),
      "dtype": "uint8",
      "block_size": block_size,
      "num_examples": sum(e["num_examples"] for e in shard_entries),
      "label_counts": dict(sorted(totals.items())),
      "source": source,
      "shards": shard_entries,
      "excluded": excluded or [],
      "created": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%dT%H:%M:%SZ"),
      "hcd_version": hcd.__version__,
  }


def write_manifest(shards_dir: str, manifest: dict) -> str:
  """Writes a split's manifest atomically.

  Args:
    shards_dir: the shards directory.
    manifest: the manifest (its "split" names the file).

  Returns:
    The manifest's path.
  """
  path = manifest_path(shards_dir, manifest["split"])
  atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
  return path


def write_arrays(images: np.ndarray, ids: Sequence[str],
                 labels: Sequence[int], out_dir: str, split: str,
                 num_shards: int, source: dict | None = None,
                 block_size: int = features.BLOCK_SIZE) -> dict:
  """Shards in-memory arrays (tests and small data; in one process).

  Args:
    images: uint8 [n, 96, 96, 3].
    ids: n unique ids.
    labels: n labels.
    out_dir: the shards directory.
    split: split name.
    num_shards: number of shards.
    source: the manifest's "source" entry.
    block_size: images per record.

  Returns:
    The manifest, also written to `manifest_path(out_dir, split)`.
  """
  os.makedirs(out_dir, exist_ok=True)
  labels = np.asarray(labels, np.int64)
  entries = []
  for s, idx in enumerate(shard_members(ids, labels, num_shards)):
    entries.append(write_shard(
        os.path.join(out_dir, shard_name(split, s, num_shards)),
        images[idx], [ids[i] for i in idx], labels[idx], block_size))
  manifest = build_manifest(split, entries, source or {"layout": "arrays"},
                            block_size=block_size)
  write_manifest(out_dir, manifest)
  return manifest


@dataclasses.dataclass
class _ShardTask:
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


def _write_shard_task(task: _ShardTask,
                      on_progress: Callable[[int], None] | None = None
                      ) -> dict:
  """Decodes, screens and writes one shard, then its sidecar.

  Returns:
    {"index", "fingerprint", "entry" (None if not written), "excluded",
     "flagged", "invalid"}. Invalid images (unreadable, bad shape, pixels
    not hashing to a Kaggle id) are excluded with `skip_invalid`; otherwise
    the shard is not written and they are returned in "invalid".
  """
  bs = task.block_size
  block = np.empty((bs,) + features.IMAGE_SHAPE, np.uint8)
  paths: list[str] = []
  ids: list[str] = []
  labels: list[int] = []
  excluded: list[dict] = []
  flagged: list[dict] = []
  invalid: list[dict] = []
  counts: collections.Counter = collections.Counter()
  layouts = decode.TiffLayoutCache()

  def flush():
    n = len(ids)
    if not n:
      return
    flat = block[:n].reshape(n, -1)
    mx, mn = flat.max(axis=1), flat.min(axis=1)
    bad = (screening.is_dark(mx, task.dark_max) |
           screening.is_bright(mn, task.bright_min))
    images, keep_ids, keep_labels = block[:n], ids, labels
    if bad.any():
      for j in np.nonzero(bad)[0]:
        reason = screening.dark_bright_reason(mn[j], mx[j], task.dark_max,
                                              task.bright_min)
        (excluded if task.dark_bright == "exclude" else flagged).append(
            {"id": ids[j], "path": paths[j], "reason": reason})
      if task.dark_bright == "exclude":
        keep = np.nonzero(~bad)[0]
        images = block[:n][keep]
        keep_ids = [ids[j] for j in keep]
        keep_labels = [labels[j] for j in keep]
    if keep_ids:
      writer.write(encode_block_head(images.nbytes, keep_ids, keep_labels),
                   images)
      counts.update(keep_labels)
    if on_progress:
      on_progress(n)
    paths.clear()
    ids.clear()
    labels.clear()
    _maybe_die()

  # Any failure, and a shard refused for its invalid images, leaves no
  # partial file behind (_open_shard).
  with _open_shard(task.path) as writer, parallel.gc_paused():
    for path, rid, label in task.members:
      try:
        img = screening.read_image(path, layouts)
      except screening.Fault as e:
        invalid.append({"id": rid, "path": path, "reason": e.reason})
        continue
      # A Kaggle id is the SHA-1 of the pixels: a mismatch means the file
      # is not the image its name (and so its label) claims.
      mismatch = screening.check_sha1(rid, img)
      if mismatch:
        invalid.append({"id": rid, "path": path, "reason": mismatch})
        continue
      block[len(ids)] = img
      paths.append(path)
      ids.append(rid)
      labels.append(label)
      if len(ids) == bs:
        flush()
    flush()
    num_bytes, sha = writer.close()
    result = {"index": task.index, "fingerprint": task.fingerprint,
              "entry": None, "excluded": excluded, "flagged": flagged,
              "invalid": invalid}
    if invalid and not task.skip_invalid:
      return result
    result["excluded"] = excluded + invalid
    result["invalid"] = []
    result["entry"] = {
        "file": os.path.basename(task.path),
        "num_examples": sum(counts.values()),
        "num_records": writer.num_records,
        "label_counts": {str(k): v for k, v in sorted(counts.items())},
        "bytes": num_bytes,
        "sha256": sha,
        "fingerprint": task.fingerprint,
    }
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


def _pool_write_shard(task: _ShardTask) -> dict:
  return _write_shard_task(task, _add_progress)


def _run_tasks(tasks: list[_ShardTask], workers: int,
               pbar) -> Iterator[dict]:
  """Runs shard tasks in this process (workers <= 1) or a process pool."""
  global _main_pid
  _main_pid = os.getpid()
  if workers <= 1 or len(tasks) <= 1:
    for t in tasks:
      yield _write_shard_task(t, pbar.update)
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


@contextlib.contextmanager
def _split_lock(out_dir: str, split: str):
  """Holds an exclusive lock on a split's output (released even by kill -9)."""
  sdir = state_dir(out_dir, split)
  os.makedirs(sdir, exist_ok=True)
  path = os.path.join(sdir, "lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ShardError(f"{out_dir}: another make_shards run is writing split "
                       f"{split!r} (lock {path} is held); wait for it to "
                       f"finish") from None
    try:
      yield
    except BaseException:
      # A run refused before it wrote anything leaves no state directory
      # holding only its lock (we still hold it, so no other run uses it).
      if os.listdir(sdir) == ["lock"]:
        os.remove(path)
        os.rmdir(sdir)
      raise
  finally:
    os.close(fd)


def _remove_stale_tmp(out_dir: str, split: str) -> list[str]:
  """Deletes temporary files left by killed runs (we hold the split lock)."""
  prefix = f"{DATASET_NAME}-{split}."
  tmp_re = re.compile(r"\.tmp-\d+$")
  removed = []
  for d, match in ((out_dir, lambda n: n.startswith(prefix)),
                   (state_dir(out_dir, split), lambda n: True)):
    for name in os.listdir(d):
      if match(name) and tmp_re.search(name):
        os.remove(os.path.join(d, name))
        removed.append(name)
  return removed


def _read_json(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _fingerprint(obj, lines: Iterable[str] = ()) -> str:
  h = hashlib.sha256(json.dumps(obj, sort_keys=True).encode())
  for line in lines:
    h.update(line.encode("utf-8", "surrogateescape"))
  return h.hexdigest()


def _labels_csv_used(data_dir: str, split: str, layout: str,
                     labels_csv: str | None) -> str | None:
  if labels_csv:
    return os.path.abspath(labels_csv)
  if layout == sources.LAYOUT_KAGGLE and split == "train":
    return os.path.join(data_dir, sources.LABELS_CSV)
  return None


def _scan_exclusions(scan_dir: str) -> dict[str, str]:
  # Imported here: hcd.data.quality belongs to the scanner.
  from hcd.data import quality  # pylint: disable=g-import-not-at-top
  return quality.load_exclusions(scan_dir)


def _thresholds(scan_dir: str | None, dark_max: int | None,
                bright_min: int | None) -> tuple[int, int]:
  """The dark/bright thresholds in force: asked for, the scan's, or default.

  With a scan report the report decides what is dark or bright, so its
  thresholds are the ones in force (and recorded in the manifest); asking
  for others as well is refused rather than recorded but not applied.

  Raises:
    ShardError: a threshold asked for disagrees with the scan report's.
    hcd.data.quality.ScanError: unreadable scan summary.
  """
  asked = {"dark_max": dark_max, "bright_min": bright_min}
  if not scan_dir:
    return (screening.DARK_MAX if dark_max is None else int(dark_max),
            screening.BRIGHT_MIN if bright_min is None else int(bright_min))
  from hcd.data import quality  # pylint: disable=g-import-not-at-top
  scan = quality.load_thresholds(scan_dir)
  for name, value in asked.items():
    if value is not None and int(value) != scan[name]:
      raise ShardError(
          f"--{name}={value} disagrees with the scan report in {scan_dir} "
          f"({name}={scan[name]}), which decides what is excluded; rerun "
          f"tools/scan_quality with --{name}={value}, or drop --{name}")
  return scan["dark_max"], scan["bright_min"]


def make_split(data_dir: str, split: str, out_dir: str,
               workers: int | None = None, scan_dir: str | None = None,
               num_shards: int | None = None, labels_csv: str | None = None,
               skip_invalid: bool = False,
               dark_max: int | None = None,
               bright_min: int | None = None,
               dark_bright: str = "auto",
               overwrite: bool = False, progress: bool = True,
               block_size: int = features.BLOCK_SIZE) -> dict:
  """Converts one split of a data directory to verified-format shards.

  Idempotent and resumable: shards already written for the same inputs and
  options are kept; a rerun on finished output writes nothing.

  Args:
    data_dir: Kaggle layout (`<split>/<id>.tif` + `train_labels.csv`) or a
      class-folder layout (`<split>/<0|1>/*`).
    split: split name, e.g. "train" or "test".
    out_dir: the shards directory (created if missing).
    workers: writer processes (default: all CPUs; 1 = in this process).
    scan_dir: a tools/scan_quality output directory; the images its report
      flags are excluded, with the report's reason.
    num_shards: number of shards (default: `default_num_shards`).
    labels_csv: labels CSV for the Kaggle layout (default
      `<data_dir>/train_labels.csv` for train).
    skip_invalid: exclude invalid inputs (label-CSV problems, unreadable or
      wrong-shape images, pixels that do not hash to their Kaggle id) and
      list them in the manifest, instead of refusing.
    dark_max: an image whose max is below this is dark (None: the scan
      report's with scan_dir, else screening.DARK_MAX).
    bright_min: an image whose min is above this is bright (None: likewise,
      screening.BRIGHT_MIN).
    dark_bright: "exclude" dark/bright images, "keep" them (listed under
      "flagged" in the manifest), or "auto": exclude from labelled splits
      unless a scan report decides, keep in unlabelled ones (a submission
      needs every test id).
    overwrite: rewrite every shard even if up to date.
    progress: show a tqdm progress bar over images.
    block_size: images per record.

  Returns:
    {"status": "written" | "up_to_date", "manifest": dict, "manifest_path",
     "written": shards written now, "reused": shards kept, "removed_tmp":
     temporary files of interrupted runs deleted, "removed": shards of an
     earlier shard count deleted, "seconds": wall time, "images": images in
     the shards}.

  Raises:
    sources.DataError: missing data directory or bad labels (see sources).
    ShardError: invalid images without skip_invalid, a bad option, a scan
      report of other data or of other thresholds, or another run holding
      the split's lock.
    hcd.data.quality.ScanError: a missing or malformed scan report.
    OSError: an unwritable out_dir.
  """
  t0 = time.perf_counter()
  if not _SPLIT_RE.fullmatch(split or ""):
    raise ShardError(f"split name {split!r} must be letters, digits or _")
  if dark_bright not in DARK_BRIGHT_MODES:
    raise ShardError(f"dark_bright={dark_bright!r}; expected one of "
                     f"{list(DARK_BRIGHT_MODES)}")
  if block_size < 1:
    raise ShardError(f"block_size must be >= 1, got {block_size}")
  dark_max, bright_min = _thresholds(scan_dir, dark_max, bright_min)
  workers = workers or os.cpu_count() or 1
  data_dir = os.path.abspath(data_dir)
  out_dir = os.path.abspath(out_dir)
  if not os.path.isdir(data_dir):
    raise sources.DataError(f"{data_dir}: no such data directory")
  # A refused run leaves no empty out_dir behind (fileio.made_dirs).
  with fileio.made_dirs(out_dir), _split_lock(out_dir, split), \
      parallel.gc_paused():
    removed_tmp = _remove_stale_tmp(out_dir, split)
    records, problems, layout = sources.list_records(
        data_dir, split, labels_csv, skip_invalid)
    pre_excluded = [{"id": p.id, "path": p.path,
                     "reason": f"{p.kind}: {p.reason}"} for p in problems]
    if scan_dir:
      report = _scan_exclusions(scan_dir)
      known = {r.id for r in records} | {p.id for p in problems}
      foreign = sorted(i for i in report if i not in known)
      if foreign:
        raise ShardError(
            f"{scan_dir}: the scan report excludes {len(foreign)} id(s) that "
            f"are not in {os.path.join(data_dir, split)} (first: "
            f"{foreign[0]}); is it the report of another split or data set?")
      pre_excluded += [{"id": r.id, "path": r.path,
                        "reason": f"scan: {report[r.id]}"}
                       for r in records if r.id in report]
      records = [r for r in records if r.id not in report]
    if not records:
      raise ShardError(f"{os.path.join(data_dir, split)}: no images left to "
                       f"shard ({len(pre_excluded)} excluded)")
    ids = [r.id for r in records]
    labels = np.asarray([r.label for r in records], np.int64)
    labelled = bool(np.all(labels >= 0))
    counts = label_counts(labels)
    n_shards = num_shards or default_num_shards(
        len(records), counts if labelled else None)
    if n_shards > len(records):
      raise ShardError(f"num_shards={n_shards} is more than the "
                       f"{len(records)} images of split {split!r}")
    small = min((counts.get(k, 0), k) for k in ("0", "1"))
    if labelled and small[0] > 0 and n_shards > small[0]:
      raise ShardError(f"num_shards={n_shards} is more than the {small[0]} "
                       f"images of class {small[1]}: some shards would lack "
                       f"that class; use --num_shards={small[0]} or fewer")
    mode = dark_bright
    if mode == "auto":
      mode = "exclude" if labelled and not scan_dir else "keep"
    options = {"dark_max": int(dark_max), "bright_min": int(bright_min),
               "dark_bright": mode, "block_size": int(block_size),
               "sha1_check": screening.SHA1_CHECK}
    source = {"data_dir": data_dir, "split": split, "layout": layout,
              "labels_csv": _labels_csv_used(data_dir, split, layout,
                                             labels_csv),
              "scan_dir": os.path.abspath(scan_dir) if scan_dir else None}
    sdir = state_dir(out_dir, split)
    strip = len(os.path.join(data_dir, ""))
    tasks = []
    triples = [(r.path, r.id, r.label) for r in records]
    for s, idx in enumerate(shard_members(ids, labels, n_shards)):
      name = shard_name(split, s, n_shards)
      members = [triples[i] for i in idx.tolist()]
      fp = _fingerprint(
          {"format": features.RECORD_FORMAT, "file": name, "options": options,
           "data_dir": data_dir},
          (f"{p[strip:]}\t{i}\t{lab}\n" for p, i, lab in members))
      tasks.append(_ShardTask(s, os.path.join(out_dir, name),
                              os.path.join(sdir, name + ".json"), fp, members,
                              int(dark_max), int(bright_min), mode,
                              int(block_size), bool(skip_invalid)))
    plan_fp = _fingerprint({"shards": [t.fingerprint for t in tasks],
                            "excluded": pre_excluded, "source": source})
    mpath = manifest_path(out_dir, split)
    old = None if overwrite else _read_json(mpath)
    if (old and old.get("fingerprint") == plan_fp and
        old.get("schema_version") == features.SCHEMA_VERSION and
        all(file_size(os.path.join(out_dir, e["file"])) == e["bytes"]
            for e in old["shards"])):
      return {"status": "up_to_date", "manifest": old, "manifest_path": mpath,
              "written": 0, "reused": len(tasks),
              "removed_tmp": removed_tmp, "removed": [],
              "images": old["num_examples"],
              "seconds": time.perf_counter() - t0}

    results: dict[int, dict] = {}
    if not overwrite:
      for t in tasks:
        side = _read_json(t.sidecar)
        if (side and side.get("fingerprint") == t.fingerprint and
            side.get("entry") and
            file_size(t.path) == side["entry"].get("bytes")):
          results[t.index] = side
    todo = [t for t in tasks if t.index not in results]
    # Any manifest here now describes other shards, some about to be
    # replaced: no manifest is better than a wrong one while they are.
    with contextlib.suppress(FileNotFoundError):
      os.remove(mpath)
    with progress_lib.bar(total=sum(len(t.members) for t in todo),
                          unit="img", desc=f"make_shards {split}",
                          enabled=progress, smoothing=0.05) as pbar:
      for r in _run_tasks(todo, workers, pbar):
        results[r["index"]] = r
    invalid = [x for r in results.values() for x in r["invalid"]]
    if invalid:
      first = "; ".join(f"{text.shown(x['path'])}: {x['reason']}"
                        for x in invalid[:3])
      more = f" (+{len(invalid) - 3} more)" if len(invalid) > 3 else ""
      raise ShardError(
          f"{len(invalid)} invalid image(s) in "
          f"{os.path.join(data_dir, split)}: {first}{more}; rerun with "
          f"--skip_invalid to exclude them (listed in the manifest; finished "
          f"shards are kept)")
    ordered = [results[t.index] for t in tasks]
    excluded = sorted(
        pre_excluded + [x for r in ordered for x in r["excluded"]],
        key=lambda x: (x["id"], x["reason"]))
    flagged = sorted((x for r in ordered for x in r["flagged"]),
                     key=lambda x: x["id"])
    manifest = build_manifest(split, [r["entry"] for r in ordered], source,
                              excluded, block_size)
    manifest.update(flagged=flagged, options=options, fingerprint=plan_fp)
    write_manifest(out_dir, manifest)
    removed = _remove_unplanned(out_dir, split, {t.path for t in tasks})
  written = len(todo)
  return {"status": "written", "manifest": manifest, "manifest_path": mpath,
          "written": written, "reused": len(tasks) - written,
          "removed_tmp": removed_tmp, "removed": removed,
          "images": manifest["num_examples"],
          "seconds": time.perf_counter() - t0}


def _remove_unplanned(out_dir: str, split: str, planned: set[str]) -> list[str]:
  """Deletes shards (and sidecars) of this split that the manifest dropped.

  They come from earlier runs with another shard count; left in place, a
  glob over `hcd-<split>.tfrecord-*` would read them too.
  """
  removed = []
  shard_re = re.compile(re.escape(f"{DATASET_NAME}-{split}.tfrecord-") +
                        r"\d{5}-of-\d{5}$")
  planned_names = {os.path.basename(p) for p in planned}
  for name in os.listdir(out_dir):
    if shard_re.match(name) and name not in planned_names:
      os.remove(os.path.join(out_dir, name))
      removed.append(name)
  sdir = state_dir(out_dir, split)
  for name in os.listdir(sdir):
    if name.endswith(".json") and name[:-5] not in planned_names:
      os.remove(os.path.join(sdir, name))
  return removed


