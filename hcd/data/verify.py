"""Shard verification: reread shards with TensorFlow, check the manifest.

`verify_split` trusts nothing the writer (`hcd.data.writer`) computed: it
rereads every shard with TensorFlow's own TFRecord reader (both CRCs of each
record) and the training pipeline's own parser (`features.parse_block`), so a
bug in the TensorFlow-free encoder of `hcd.data.tfrecord` cannot hide, and
checks sizes, sha256, counts, unique ids and exclusions against the manifest
(`hcd.data.manifest`). What it checks is listed in WORKSPACE.md ("Shards").
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time

from hcd import progress as progress_lib
from hcd.data import features
from hcd.data import parallel
from hcd.data.manifest import check_manifest_shape
from hcd.data.manifest import DATASET_NAME
from hcd.data.manifest import load_manifest
from hcd.data.manifest import ManifestError
from hcd.data.manifest import manifest_path
from hcd.data.manifest import manifest_splits
from hcd.data.manifest import shard_paths
from hcd.data.tfrecord import sha256_file
from hcd.data.manifest import ShardError
from hcd.fileio import file_size
from hcd.text import one_line


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

  Over 60 lines only for documenting each argument.

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
  check_manifest_shape(manifest, where)
  paths = shard_paths(shards_dir, manifest)
  for e, p in zip(manifest["shards"], paths):
    size = file_size(p)
    if size < 0:
      raise ShardError(f"{p}: missing (listed in {where}); rerun make_shards")
    if size != e["bytes"]:
      raise ShardError(f"{p}: {size} bytes, the manifest says {e['bytes']}; "
                       f"the shard is truncated or was replaced")
  workers = workers or os.cpu_count() or 1
  seen: dict[bytes, str] = {}
  with parallel.gc_paused(), concurrent.futures.ThreadPoolExecutor(
      max(1, workers)) as pool:
    # hashlib releases the GIL on big buffers: hashing runs beside parsing.
    digests = [pool.submit(sha256_file, p) for p in paths]
    for e, p, fut in progress_lib.bar(
        list(zip(manifest["shards"], paths, digests)),
        desc=f"verify {split}", unit="shard", enabled=progress):
      digest = fut.result()
      if digest != e["sha256"]:
        raise ShardError(f"{p}: sha256 {digest} does not match the manifest's "
                         f"{e['sha256']}; the shard is corrupt: delete it "
                         f"and rerun make_shards")
      _check_records(p, e, seen)
  excluded = {x["id"].encode() for x in manifest.get("excluded", [])}
  leaked = sorted(i.decode() for i in seen.keys() & excluded)
  if leaked:
    raise ShardError(f"{where}: id {leaked[0]} is listed as excluded but is "
                     f"in shard {seen[leaked[0].encode()]}")
  return {"split": split, "manifest_path": where, "num_shards": len(paths),
          "num_examples": len(seen),
          "label_counts": manifest.get("label_counts"),
          "bytes": sum(e["bytes"] for e in manifest["shards"]),
          "seconds": time.perf_counter() - t0}


def _check_records(path: str, entry: dict, seen: dict[bytes, str]) -> None:
  """Parses every record of a shard and checks it against its entry.

  Args:
    path: the shard.
    entry: its manifest entry.
    seen: id -> shard name of the shards checked so far; this shard's ids
      are added.

  Raises:
    ShardError: an unreadable or malformed record, an id seen before, or
      counts other than the entry's.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n_records, counts = 0, collections.Counter()
  name = os.path.basename(path)
  # The training pipeline's own parser (features.parse_block), run in
  # TensorFlow; only shapes, ids and labels come back to Python.
  ds = tf.data.TFRecordDataset(path, buffer_size=1 << 23).map(
      _block_summary, num_parallel_calls=2).prefetch(4)
  try:
    for shape, ids, labels in ds.as_numpy_iterator():
      if tuple(shape[1:]) != features.IMAGE_SHAPE or not (
          shape[0] == len(ids) == len(labels)):
        raise ShardError(f"{path}: record {n_records} holds images "
                         f"{tuple(shape)}, {len(ids)} ids, {len(labels)} "
                         f"labels")
      for i in ids:
        if i in seen:
          raise ShardError(f"{path}: id {i.decode()} is also in {seen[i]}; "
                           f"ids must be unique")
        seen[i] = name
      counts.update(labels.tolist())
      n_records += 1
  except tf.errors.OpError as err:
    raise ShardError(f"{path}: unreadable TFRecord or unparsable block after "
                     f"record {n_records}: {type(err).__name__}: "
                     f"{one_line(err.message)}") from None
  counts = {str(k): v for k, v in counts.items()}
  got = {"num_records": n_records, "num_examples": sum(counts.values()),
         "label_counts": dict(counts)}
  want = {"num_records": entry["num_records"],
          "num_examples": entry["num_examples"],
          "label_counts": {k: v for k, v in entry["label_counts"].items()
                           if v}}
  if got != want:
    raise ShardError(f"{path}: holds {got}, the manifest says {want}")


def verify(shards_dir: str, split: str | None = None,
           workers: int | None = None, progress: bool = True) -> list[dict]:
  """Verifies one split, or every split with a manifest in `shards_dir`.

  Args:
    shards_dir: the shards directory.
    split: the split to verify; None verifies every split with a manifest.
    workers: see `verify_split`.
    progress: see `verify_split`.

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
