"""Reading shard files in tf.data, and naming the shard at fault.

Shard files are opened in tf.data in one place, `read_blocks`: training,
validation, the id scan of planning (`scan_ids`), and evaluation and
prediction all read through it. Before reading, `check_shard_files` stats
every shard against its manifest (missing, truncated); a record that fails
its CRC while reading (a DataLossError, which names no file) is traced to
its shard by `naming_bad_shard`. Either way the error names the shard and
the remedy (`tools/make_shards --verify`).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from hcd.data import features


class PipelineError(ValueError):
  """Bad pipeline input (group CSV, unlabelled training data, empty split)."""


class ShardFileError(PipelineError):
  """A shard that is missing, of the wrong size or unreadable.

  The message names the shard file and the remedy.
  """


def read_blocks(files: Sequence[str], *, shuffle: bool = False, seed: int = 0,
                repeat: bool = False, cycle_length: int = 4):
  """Serialized blocks from shard files: the one place shards are opened.

  Every reader of shards in tf.data goes through here (training,
  validation, planning's id scan, evaluation and prediction), so buffering,
  interleaving and the CRC checks of TFRecordDataset are the same for all.

  Args:
    files: shard paths.
    shuffle: shuffle the file order (again on every pass).
    seed: shuffle seed.
    repeat: repeat forever.
    cycle_length: files read concurrently (records interleave one by one
      across them, in a deterministic order).

  Returns:
    tf.data.Dataset of scalar tf.string records.
  """
  ds = tf.data.Dataset.from_tensor_slices(list(files))
  if shuffle:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  return ds.interleave(
      lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
      cycle_length=max(1, min(cycle_length, len(files))),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _verify_hint(path: str) -> str:
  return (f"check the shards with tools/make_shards --verify "
          f"--out_dir={os.path.dirname(path) or '.'} and rewrite the bad ones "
          f"with tools/make_shards")


def check_shard_files(files: Sequence[str], manifest: dict,
                      where: str) -> None:
  """Checks that every shard of a manifest exists with its recorded size.

  A stat per file, no reading: cheap enough to run before every read, and
  it catches missing and truncated shards before tf.data fails on them.

  Args:
    files: the manifest's shard paths, in manifest order.
    manifest: the manifest (its "shards" entries give the sizes).
    where: the manifest's path, for messages.

  Raises:
    ShardFileError: the first missing or wrongly sized shard, named with
      the remedy.
  """
  for path, entry in zip(files, manifest.get("shards", [])):
    try:
      size = os.stat(path).st_size
    except OSError as e:
      raise ShardFileError(f"{path}: {e.strerror.lower()} (listed in "
                           f"{where}); {_verify_hint(path)}") from None
    want = entry.get("bytes")
    if want is not None and size != want:
      raise ShardFileError(f"{path}: {size} bytes, {where} says {want} "
                           f"(truncated or replaced); {_verify_hint(path)}")


def op_message(e) -> str:
  """A TensorFlow error's own words, in one line.

  Drops what TensorFlow wraps them in: the "Graph execution error:" header,
  the Python stack of the node, `{{function_node ...}}` and `[Op:...]`.
  """
  in_stack = False
  for line in str(e.message).splitlines():
    text = line.strip()
    if text.startswith("Detected at node"):
      in_stack = True
      continue
    if (not text or text == "Graph execution error:" or
        in_stack and line[:1].isspace()):
      continue
    in_stack = False
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text).split(" [Op:", 1)[0].strip()
    if text:
      return text
  return type(e).__name__


def unreadable_shard(files: Sequence[str]) -> ShardFileError | None:
  """Rereads shards one at a time and returns the first that fails.

  TFRecordDataset checks every record's CRCs, but its error ("corrupted
  record at N") names no file; reading each shard alone does.

  Args:
    files: shard paths.

  Returns:
    A ShardFileError naming the first unreadable shard, or None when all
    read.
  """
  for path in files:
    try:
      read_blocks([path]).reduce(np.int64(0), lambda n, _: n + 1)
    except tf.errors.OpError as e:
      return ShardFileError(f"{path}: {op_message(e)}; {_verify_hint(path)}")
  return None


@contextlib.contextmanager
def naming_bad_shard(files: Sequence[str],
                     errors: tuple = (tf.errors.DataLossError,)
                     ) -> Iterator[None]:
  """Turns a read failure inside the block into an error naming the shard.

  Args:
    files: the shards the block reads.
    errors: the exception types that may come from a bad shard.

  Raises:
    ShardFileError: when one of `files` does not read back; otherwise the
      original error.
  """
  try:
    yield
  except errors:
    bad = unreadable_shard(files)
    if bad is None:
      raise
    raise bad from None


def scan_ids(files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Reads every id and label of some shards without copying pixels.

  Args:
    files: shard paths.

  Returns:
    (ids as an object array of bytes, labels int64), in read order.

  Raises:
    ShardFileError: a shard with a corrupt record (named).
  """
  spec = {features.KEY_IDS: tf.io.RaggedFeature(tf.string),
          features.KEY_LABELS: tf.io.RaggedFeature(tf.int64)}

  def parse(serialized):
    parsed = tf.io.parse_example(serialized, spec)
    return (parsed[features.KEY_IDS].flat_values,
            parsed[features.KEY_LABELS].flat_values)

  ds = read_blocks(files).batch(64).map(parse,
                                        num_parallel_calls=tf.data.AUTOTUNE)
  ids, labels = [], []
  with naming_bad_shard(files):
    for i, l in ds.prefetch(2).as_numpy_iterator():
      ids.append(i)
      labels.append(l)
  if not ids:
    return np.zeros(0, object), np.zeros(0, np.int64)
  return np.concatenate(ids), np.concatenate(labels)
