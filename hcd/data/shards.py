"""TFRecord shards: naming, assignment, parallel writing, manifest, verify.

Layout and manifest format are documented in WORKSPACE.md ("Shards").
Names follow TFDS: `hcd-<split>.tfrecord-00000-of-00032`, with the manifest
`hcd-<split>.manifest.json` beside them.

`make_split` converts one split of a data directory in a single decode pass
per image (read, decode, check shape, SHA-1 of the pixels against a Kaggle
id, min/max for dark/bright) and writes whole shards in worker processes.

Why the workers never import TensorFlow: `import tensorflow` costs 3.5-4 s of
CPU per process, as long as the whole conversion of 100k images on 2 cores.
The only parts of TensorFlow a writer needs are the tf.Example wire format
(three length-delimited protobuf fields, `encode_block_head`) and TFRecord
framing with masked CRC-32C (`RecordWriter`, CRC from google-crc32c at
~13 GB/s). The pixels are written straight from the decode buffer, never
copied into a protobuf, and the shard's sha256 is computed on the way out.
Without google-crc32c installed, `RecordWriter` falls back to TensorFlow's
writer. `verify` reads everything back with TensorFlow's own reader and
parser, so a writer bug cannot hide from it.

Resumability: each finished shard is renamed into place and then gets a
sidecar `<out_dir>/.hcd-<split>.state/<shard>.json` holding its manifest
entry, the exclusions found in it, and a fingerprint of exactly what went
into it (paths, ids, labels, options). A rerun skips a shard whose sidecar
fingerprint matches and whose file has the recorded size, so a run killed at
any point (kill -9 included) resumes where it stopped, and a rerun on
finished output writes nothing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import gc
import hashlib
import json
import math
import os
import re
import signal
import struct
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

import hcd
from hcd.data import decode
from hcd.data import features
from hcd.data import parallel
from hcd.data import sources
from hcd.fileio import atomic_write_text

try:
  import google_crc32c  # pylint: disable=g-import-not-at-top
  if google_crc32c.implementation != "c":  # Its pure-Python CRC is too slow.
    google_crc32c = None
except ImportError:  # Slower fallback: TensorFlow's writer (see RecordWriter).
  google_crc32c = None

DATASET_NAME = "hcd"
# Shards of at most this many bytes: 100-200 MB each once there are two or
# more, big enough for sequential reads and few enough files to interleave.
MAX_SHARD_BYTES = 200_000_000
# Bytes per image in a shard beyond its pixels (id, label, framing), used only
# to estimate shard sizes.
_PER_IMAGE_OVERHEAD = 48
DARK_BRIGHT_MODES = ("auto", "exclude", "keep")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
_SPLIT_RE = re.compile(r"[A-Za-z0-9_]+")
# Test hook: a writer process SIGKILLs itself (and the main process) after
# writing this many blocks, to test recovery from kill -9 deterministically.
KILL_AFTER_BLOCKS_ENV = "HCD_MAKE_SHARDS_KILL_AFTER_BLOCKS"


class ManifestError(ValueError):
  """A missing or invalid manifest; the message names the path."""


class ShardError(ValueError):
  """make_shards refuses, or a shard fails verification; names the file."""


def shard_name(split: str, index: int, num_shards: int) -> str:
  """Returns the TFDS-style file name of one shard."""
  return (f"{DATASET_NAME}-{split}.tfrecord-{index:05d}-of-"
          f"{num_shards:05d}")


def manifest_path(shards_dir: str, split: str) -> str:
  """Returns the manifest path of a split inside `shards_dir`."""
  return os.path.join(shards_dir, f"{DATASET_NAME}-{split}.manifest.json")


def state_dir(shards_dir: str, split: str) -> str:
  """Returns the hidden directory holding a split's lock and shard sidecars."""
  return os.path.join(shards_dir, f".{DATASET_NAME}-{split}.state")


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
  """Returns the hex sha256 of a file, read in 4 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      b = f.read(chunk)
      if not b:
        break
      h.update(b)
  return h.hexdigest()


def id_hash(ids: Sequence[str], seed: int = 0) -> np.ndarray:
  """Stable 64-bit hash per id (independent of Python's hash seed)."""
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


def label_counts(labels: Sequence[int]) -> dict[str, int]:
  """Counts labels as a JSON-friendly {"0": n0, "1": n1} dict."""
  vals, counts = np.unique(np.asarray(labels, np.int64), return_counts=True)
  return {str(int(v)): int(c) for v, c in zip(vals, counts)}


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


# --- tf.Example and TFRecord encoding without TensorFlow ----------------------
# Protobuf wire format: a tag byte (field << 3 | wire type 2 = length-
# delimited), a varint length, then the payload.
_F1, _F2, _F3 = 0x0A, 0x12, 0x1A


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _field(tag: int, length: int) -> bytes:
  return bytes((tag,)) + _varint(length)


def _int64_varint(v: int) -> bytes:
  # int64 varints encode negatives as their 64-bit two's complement.
  return _varint(int(v) & 0xFFFFFFFFFFFFFFFF)


def _map_entry_prefix(key: str, feature_len: int) -> bytes:
  """A Features map entry {key, value: Feature} up to the Feature's bytes."""
  k = key.encode()
  body = _field(_F1, len(k)) + k + _field(_F2, feature_len)
  return _field(_F1, len(body) + feature_len) + body


def encode_block_head(num_pixel_bytes: int, ids: Sequence[str],
                      labels: Sequence[int]) -> bytes:
  """Encodes a block's tf.Example up to its pixels (features.py's schema).

  `head + pixels` is a serialized tf.Example equal, field for field, to
  `features.serialize_block(images, ids, labels)`; the pixels follow the
  head directly so the writer need not copy them.

  Args:
    num_pixel_bytes: len(images.tobytes()), n * 96 * 96 * 3.
    ids: n ids.
    labels: n labels.

  Returns:
    The head bytes.

  Raises:
    ValueError: pixel bytes, ids and labels disagree on n.
  """
  n = len(ids)
  if num_pixel_bytes != n * features.IMAGE_BYTES or len(labels) != n:
    raise ValueError(f"block has {num_pixel_bytes} pixel bytes, {n} ids and "
                     f"{len(labels)} labels")
  id_list = b"".join(_field(_F1, len(b)) + b
                     for b in (i.encode("utf-8") for i in ids))
  ids_feature = _field(_F1, len(id_list)) + id_list
  packed = b"".join(_int64_varint(v) for v in labels)
  int_list = _field(_F1, len(packed)) + packed
  labels_feature = _field(_F3, len(int_list)) + int_list
  # images: Feature{bytes_list: BytesList{value: [pixels]}}.
  pixel_prefix = _field(_F1, num_pixel_bytes)
  images_prefix = _field(_F1, len(pixel_prefix) + num_pixel_bytes) + (
      pixel_prefix)
  body = (_map_entry_prefix(features.KEY_IDS, len(ids_feature)) +
          ids_feature +
          _map_entry_prefix(features.KEY_LABELS, len(labels_feature)) +
          labels_feature +
          _map_entry_prefix(features.KEY_IMAGES,
                            len(images_prefix) + num_pixel_bytes) +
          images_prefix)
  return _field(_F1, len(body) + num_pixel_bytes) + body


def _masked_crc(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class RecordWriter:
  """Writes a TFRecord file, computing its size and sha256 on the way out.

  A record is framed as TensorFlow's writer frames it: uint64 length,
  masked CRC-32C of the length, data, masked CRC-32C of the data.
  """

  def __init__(self, path: str):
    self.path = path
    self.num_records = 0
    self.num_bytes = 0
    self._sha = hashlib.sha256()
    self._tf_writer = None
    if google_crc32c is None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf_writer = tf.io.TFRecordWriter(path)
      self._f = None
    else:
      self._f = open(path, "wb")

  def write(self, *pieces) -> None:
    """Writes one record whose data is the concatenation of `pieces`.

    Args:
      *pieces: bytes or C-contiguous numpy arrays.
    """
    self.num_records += 1
    if self._tf_writer is not None:
      self._tf_writer.write(b"".join(bytes(memoryview(p)) for p in pieces))
      return
    length = struct.pack("<Q", sum(memoryview(p).nbytes for p in pieces))
    crc = 0
    for p in pieces:
      crc = google_crc32c.extend(crc, p)
    frame = (length, struct.pack("<I", _masked_crc(google_crc32c.value(
        length))), *pieces, struct.pack("<I", _masked_crc(crc)))
    for p in frame:
      self._f.write(p)
      self._sha.update(p)
      self.num_bytes += memoryview(p).nbytes

  def close(self) -> tuple[int, str]:
    """Closes the file.

    Returns:
      (size in bytes, hex sha256).
    """
    if self._tf_writer is not None:
      self._tf_writer.close()
      return os.path.getsize(self.path), sha256_file(self.path)
    self._f.close()
    return self.num_bytes, self._sha.hexdigest()

  def abort(self) -> None:
    """Closes and deletes the partial file."""
    with contextlib.suppress(Exception):
      if self._tf_writer is not None:
        self._tf_writer.close()
      else:
        self._f.close()
    with contextlib.suppress(OSError):
      os.remove(self.path)


# --- Writing shards -----------------------------------------------------------


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
  writer = RecordWriter(f"{path}.tmp-{os.getpid()}")
  try:
    for s in range(0, n, block_size):
      block = images[s:s + block_size]
      writer.write(encode_block_head(block.nbytes, ids[s:s + block_size],
                                     labels[s:s + block_size]), block)
    num_bytes, sha = writer.close()
  except BaseException:
    writer.abort()
    raise
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
  """Assembles a manifest dict (see WORKSPACE.md) from shard entries."""
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
  """Writes a split's manifest atomically; returns its path."""
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


@contextlib.contextmanager
def _gc_paused():
  """Pauses the cyclic garbage collector (the code inside makes no cycles).

  With hundreds of thousands of live records, ids and tuples, every
  collection re-walks all of them (and, after `import tensorflow`, all of
  TensorFlow's objects): 10-20% of the time in the loops here.
  """
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was_enabled:
      gc.enable()


def _read_and_decode(path: str,
                     cache: decode.TiffLayoutCache) -> np.ndarray:
  """decode.read_image, with the fault classed as the scan report does.

  A TIFF laid out like one this shard already decoded is not decoded again:
  its pixels are its strip's bytes (see decode.TiffLayoutCache), which
  skips the decoder for nearly every Kaggle file.

  Raises:
    decode.ImageError: with args (scan flag, message without the path).
  """
  try:
    data = _read_file(path)
  except OSError as e:
    raise decode.ImageError("unreadable", f"cannot read: {e.strerror}"
                            ) from None
  known = cache.lookup(data)
  if known is not None:
    return known
  try:
    raw = decode.decode_raw(data, path)
  except decode.ImageError as e:
    raise decode.ImageError("unreadable",
                            decode.strip_name(str(e), path)) from None
  try:
    img = decode.validate(raw, path)
  except decode.ImageError as e:
    raise decode.ImageError("bad_shape",
                            decode.strip_name(str(e), path)) from None
  cache.learn(data, img)
  return img


def _read_file(path: str, chunk: int = 1 << 16) -> bytes:
  # os.read skips the fstat/lseek/isatty calls of open(): per-file system
  # calls are a visible share of 100k+ reads of 28 KB files.
  fd = os.open(path, os.O_RDONLY)
  try:
    data = os.read(fd, chunk)
    if len(data) < chunk:
      return data
    parts = [data]
    while data:
      data = os.read(fd, chunk)
      parts.append(data)
    return b"".join(parts)
  finally:
    os.close(fd)


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
  writer = RecordWriter(f"{task.path}.tmp-{os.getpid()}")
  layouts = decode.TiffLayoutCache()

  def flush():
    n = len(ids)
    if not n:
      return
    flat = block[:n].reshape(n, -1)
    mx, mn = flat.max(axis=1), flat.min(axis=1)
    bad = (mx < task.dark_max) | (mn > task.bright_min)
    images, keep_ids, keep_labels = block[:n], ids, labels
    if bad.any():
      for j in np.nonzero(bad)[0]:
        reason = (f"dark: max {mx[j]} < {task.dark_max}"
                  if mx[j] < task.dark_max else
                  f"bright: min {mn[j]} > {task.bright_min}")
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

  try:
    with _gc_paused():
      for path, rid, label in task.members:
        try:
          img = _read_and_decode(path, layouts)
        except decode.ImageError as e:
          invalid.append({"id": rid, "path": path,
                          "reason": f"{e.args[0]}: {e.args[1]}"})
          continue
        # A Kaggle id is the SHA-1 of the pixels: a mismatch means the file
        # is not the image its name (and so its label) claims.
        if _SHA1_RE.fullmatch(rid):
          digest = hashlib.sha1(img).hexdigest()
          if digest != rid:
            invalid.append({"id": rid, "path": path, "reason":
                            f"sha1_mismatch: pixels hash to {digest}"})
            continue
        block[len(ids)] = img
        paths.append(path)
        ids.append(rid)
        labels.append(label)
        if len(ids) == bs:
          flush()
      flush()
    num_bytes, sha = writer.close()
  except BaseException:
    writer.abort()
    raise
  result = {"index": task.index, "fingerprint": task.fingerprint,
            "entry": None, "excluded": excluded, "flagged": flagged,
            "invalid": invalid}
  if invalid and not task.skip_invalid:
    writer.abort()
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
    yield
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


def _size(path: str) -> int:
  try:
    return os.path.getsize(path)
  except OSError:
    return -1


def _fingerprint(obj, lines: Iterable[str] = ()) -> str:
  h = hashlib.sha256(json.dumps(obj, sort_keys=True).encode())
  for line in lines:
    h.update(line.encode("utf-8", "surrogateescape"))
  return h.hexdigest()


def one_line(msg) -> str:
  """Joins a possibly multi-line message into one line (for CLI errors)."""
  parts = [p.strip() for p in str(msg).splitlines() if p.strip()]
  return " ".join(parts[:1] + ["; ".join(parts[1:])]) if parts else ""


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


def make_split(data_dir: str, split: str, out_dir: str,
               workers: int | None = None, scan_dir: str | None = None,
               num_shards: int | None = None, labels_csv: str | None = None,
               skip_invalid: bool = False, dark_max: int = 10,
               bright_min: int = 245, dark_bright: str = "auto",
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
    dark_max: an image whose max is below this is dark.
    bright_min: an image whose min is above this is bright.
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
      report of other data, or another run holding the split's lock.
    hcd.data.quality.ScanError: a missing or malformed scan report.
    OSError: an unwritable out_dir.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  if not _SPLIT_RE.fullmatch(split or ""):
    raise ShardError(f"split name {split!r} must be letters, digits or _")
  if dark_bright not in DARK_BRIGHT_MODES:
    raise ShardError(f"dark_bright={dark_bright!r}; expected one of "
                     f"{list(DARK_BRIGHT_MODES)}")
  if block_size < 1:
    raise ShardError(f"block_size must be >= 1, got {block_size}")
  workers = workers or os.cpu_count() or 1
  data_dir = os.path.abspath(data_dir)
  out_dir = os.path.abspath(out_dir)
  if not os.path.isdir(data_dir):
    raise sources.DataError(f"{data_dir}: no such data directory")
  os.makedirs(out_dir, exist_ok=True)
  with _split_lock(out_dir, split), _gc_paused():
    removed_tmp = _remove_stale_tmp(out_dir, split)
    records, problems, layout = sources.list_records(
        data_dir, split, labels_csv, skip_invalid)
    pre_excluded = [{"id": p.id, "path": p.path, "reason": f"label: {p.reason}"}
                    for p in problems]
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
               "sha1_check": "ids of 40 hex digits"}
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
        all(_size(os.path.join(out_dir, e["file"])) == e["bytes"]
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
            _size(t.path) == side["entry"].get("bytes")):
          results[t.index] = side
    todo = [t for t in tasks if t.index not in results]
    # Any manifest here now describes other shards, some about to be
    # replaced: no manifest is better than a wrong one while they are.
    with contextlib.suppress(FileNotFoundError):
      os.remove(mpath)
    with tqdm(total=sum(len(t.members) for t in todo), unit="img",
              desc=f"make_shards {split}", disable=not progress,
              smoothing=0.05, mininterval=0.5) as pbar:
      for r in _run_tasks(todo, workers, pbar):
        results[r["index"]] = r
    invalid = [x for r in results.values() for x in r["invalid"]]
    if invalid:
      first = "; ".join(f"{x['path']}: {x['reason']}" for x in invalid[:3])
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


def load_manifest(shards_dir: str, split: str) -> dict:
  """Loads and sanity-checks a split's manifest.

  Args:
    shards_dir: the shards directory.
    split: split name.

  Returns:
    The manifest dict.

  Raises:
    ManifestError: missing, unparsable or of an unknown schema version,
      naming the path.
  """
  path = manifest_path(shards_dir, split)
  if not os.path.exists(path):
    found = sorted(f for f in os.listdir(shards_dir)
                   if f.endswith(".manifest.json")) if os.path.isdir(
                       shards_dir) else []
    hint = f"; manifests there: {found}" if found else (
        "; run tools/make_shards first")
    raise ManifestError(f"{path}: no shard manifest for split {split!r}{hint}")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ManifestError(f"{path}: cannot read manifest: {e}") from None
  if not isinstance(manifest, dict):
    raise ManifestError(f"{path}: not a manifest (a JSON object expected)")
  if manifest.get("schema_version") != features.SCHEMA_VERSION:
    raise ManifestError(
        f"{path}: schema_version {manifest.get('schema_version')!r}, this hcd "
        f"reads version {features.SCHEMA_VERSION}; re-run tools/make_shards")
  return manifest


def shard_paths(shards_dir: str, manifest: dict) -> list[str]:
  """Returns the full paths of a manifest's shards, in order."""
  return [os.path.join(shards_dir, e["file"]) for e in manifest["shards"]]


def manifest_splits(shards_dir: str) -> list[str]:
  """Lists the splits that have a manifest in `shards_dir`."""
  pre, suf = f"{DATASET_NAME}-", ".manifest.json"
  if not os.path.isdir(shards_dir):
    return []
  return sorted(n[len(pre):-len(suf)] for n in os.listdir(shards_dir)
                if n.startswith(pre) and n.endswith(suf))


# --- Verification -------------------------------------------------------------


def _check_manifest_shape(manifest: dict, where: str) -> None:
  keys = ("file", "num_examples", "num_records", "label_counts", "bytes",
          "sha256")
  shards = manifest.get("shards")
  if not isinstance(shards, list) or not shards:
    raise ManifestError(f"{where}: 'shards' must be a non-empty list")
  for k, e in enumerate(shards):
    missing = [x for x in keys if x not in e]
    if missing:
      raise ManifestError(f"{where}: shard entry {k} lacks {missing}")
  total = sum(e["num_examples"] for e in shards)
  if total != manifest.get("num_examples"):
    raise ManifestError(f"{where}: num_examples is "
                        f"{manifest.get('num_examples')} but the shard entries "
                        f"add up to {total}")
  totals: collections.Counter = collections.Counter()
  for e in shards:
    totals.update(e["label_counts"])
  if dict(totals) != {k: v for k, v in manifest.get("label_counts", {}).items()
                      if v}:
    raise ManifestError(f"{where}: label_counts {manifest.get('label_counts')} "
                        f"but the shard entries add up to {dict(totals)}")


def _block_summary(serialized):
  block = features.parse_block(serialized)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.shape(block["image"]), block["id"], block["label"]


def verify_split(shards_dir: str, split: str, workers: int | None = None,
                 progress: bool = True) -> dict:
  """Rereads a split's shards and checks them against the manifest.

  Checks each shard's size and sha256, that every record reads with
  TensorFlow's TFRecord reader (CRCs) and parses with features.parse_block
  into uint8 [n, 96, 96, 3] images with n ids and n labels, the per-shard and
  total counts of records, images and labels, that ids are unique across the
  split and that no excluded id made it into a shard.

  Args:
    shards_dir: the shards directory.
    split: split name.
    workers: threads hashing shards while others are parsed.
    progress: show a tqdm progress bar over shards.

  Returns:
    {"split", "manifest_path", "num_shards", "num_examples", "label_counts",
     "bytes", "seconds"}.

  Raises:
    ManifestError: missing or inconsistent manifest, naming it.
    ShardError: the first shard at fault, naming it and what is wrong.
  """
  t0 = time.perf_counter()
  manifest = load_manifest(shards_dir, split)
  where = manifest_path(shards_dir, split)
  _check_manifest_shape(manifest, where)
  paths = shard_paths(shards_dir, manifest)
  for e, p in zip(manifest["shards"], paths):
    size = _size(p)
    if size < 0:
      raise ShardError(f"{p}: missing (listed in {where}); rerun make_shards")
    if size != e["bytes"]:
      raise ShardError(f"{p}: {size} bytes, the manifest says {e['bytes']}; "
                       f"the shard is truncated or was replaced")
  excluded = {x["id"] for x in manifest.get("excluded", [])}
  workers = workers or os.cpu_count() or 1
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  seen: dict[bytes, str] = {}
  with _gc_paused(), concurrent.futures.ThreadPoolExecutor(
      max(1, workers)) as pool:
    # hashlib releases the GIL on big buffers: hashing runs beside parsing.
    digests = [pool.submit(sha256_file, p) for p in paths]
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    for e, p, fut in tqdm(list(zip(manifest["shards"], paths, digests)),
                          desc=f"verify {split}", unit="shard",
                          disable=not progress):
      digest = fut.result()
      if digest != e["sha256"]:
        raise ShardError(f"{p}: sha256 {digest} does not match the manifest's "
                         f"{e['sha256']}; the shard is corrupt: delete it "
                         f"and rerun make_shards")
      n_records, counts = 0, collections.Counter()
      name = os.path.basename(p)
      # The training pipeline's own parser (features.parse_block), run in
      # TensorFlow; only shapes, ids and labels come back to Python.
      ds = tf.data.TFRecordDataset(p, buffer_size=1 << 23).map(
          _block_summary, num_parallel_calls=2).prefetch(4)
      try:
        for shape, ids, labels in ds.as_numpy_iterator():
          if tuple(shape[1:]) != features.IMAGE_SHAPE or not (
              shape[0] == len(ids) == len(labels)):
            raise ShardError(f"{p}: record {n_records} holds images "
                             f"{tuple(shape)}, {len(ids)} ids, {len(labels)} "
                             f"labels")
          for i in ids:
            if i in seen:
              raise ShardError(f"{p}: id {i.decode()} is also in {seen[i]}; "
                               f"ids must be unique")
            seen[i] = name
          counts.update(labels.tolist())
          n_records += 1
      except tf.errors.OpError as err:
        raise ShardError(f"{p}: unreadable TFRecord or unparsable block after "
                         f"record {n_records}: {type(err).__name__}: "
                         f"{one_line(err.message)}") from None
      counts = {str(k): v for k, v in counts.items()}
      got = {"num_records": n_records, "num_examples": sum(counts.values()),
             "label_counts": dict(counts)}
      want = {"num_records": e["num_records"],
              "num_examples": e["num_examples"],
              "label_counts": {k: v for k, v in e["label_counts"].items() if v}}
      if got != want:
        raise ShardError(f"{p}: holds {got}, the manifest says {want}")
  leaked = sorted(i.decode() for i in seen.keys() & {
      x.encode() for x in excluded})
  if leaked:
    raise ShardError(f"{where}: id {leaked[0]} is listed as excluded but is "
                     f"in shard {seen[leaked[0].encode()]}")
  return {"split": split, "manifest_path": where, "num_shards": len(paths),
          "num_examples": len(seen),
          "label_counts": manifest.get("label_counts"),
          "bytes": sum(e["bytes"] for e in manifest["shards"]),
          "seconds": time.perf_counter() - t0}


def verify(shards_dir: str, split: str | None = None,
           workers: int | None = None, progress: bool = True) -> list[dict]:
  """Verifies one split, or every split with a manifest in `shards_dir`.

  Returns:
    One `verify_split` summary per split.

  Raises:
    ManifestError: no manifest found, or see `verify_split`.
    ShardError: see `verify_split`.
  """
  splits = [split] if split else manifest_splits(shards_dir)
  if not splits:
    raise ManifestError(f"{shards_dir}: no {DATASET_NAME}-<split>.manifest.json"
                        f" here; run tools/make_shards first")
  return [verify_split(shards_dir, s, workers, progress) for s in splits]
