"""TFRecord shards: naming, shard assignment, writing, the manifest.

Layout and manifest format are documented in WORKSPACE.md ("Shards").
Names follow TFDS: `hcd-<split>.tfrecord-00000-of-00032`, with the manifest
`hcd-<split>.manifest.json` beside them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Sequence

import numpy as np

import hcd
from hcd.data import features

DATASET_NAME = "hcd"


class ManifestError(ValueError):
  """A missing or invalid manifest; the message names the path."""


def shard_name(split: str, index: int, num_shards: int) -> str:
  """Returns the TFDS-style file name of one shard."""
  return (f"{DATASET_NAME}-{split}.tfrecord-{index:05d}-of-"
          f"{num_shards:05d}")


def manifest_path(shards_dir: str, split: str) -> str:
  """Returns the manifest path of a split inside `shards_dir`."""
  return os.path.join(shards_dir, f"{DATASET_NAME}-{split}.manifest.json")


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


def atomic_write_text(path: str, text: str) -> None:
  """Writes text under a temporary name, then renames it into place."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def id_hash(ids: Sequence[str], seed: int = 0) -> np.ndarray:
  """Stable 64-bit hash per id (independent of Python's hash seed)."""
  out = np.empty(len(ids), np.uint64)
  salt = str(seed).encode()
  for k, i in enumerate(ids):
    out[k] = int.from_bytes(
        hashlib.blake2b(i.encode(), digest_size=8, key=salt).digest(), "little")
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
  labels = np.asarray(labels)
  h = id_hash(ids)
  out = np.empty(len(ids), np.int64)
  offset = 0
  for lab in np.unique(labels):
    idx = np.nonzero(labels == lab)[0]
    idx = idx[np.argsort(h[idx], kind="stable")]
    # Offsetting each label's deal keeps shard sizes within one of each other.
    out[idx] = (np.arange(len(idx)) + offset) % num_shards
    offset += len(idx)
  return out


def label_counts(labels: Sequence[int]) -> dict[str, int]:
  """Counts labels as a JSON-friendly {"0": n0, "1": n1} dict."""
  vals, counts = np.unique(np.asarray(labels, np.int64), return_counts=True)
  return {str(int(v)): int(c) for v, c in zip(vals, counts)}


def write_shard(path: str, images: np.ndarray, ids: Sequence[str],
                labels: Sequence[int],
                block_size: int = features.BLOCK_SIZE) -> dict:
  """Writes one shard atomically and returns its manifest entry.

  Args:
    path: final shard path; written as `<path>.tmp-<pid>`, then renamed.
    images: uint8 [n, 96, 96, 3].
    ids: n ids.
    labels: n labels.
    block_size: images per record.

  Returns:
    The shard's manifest entry (file, counts, bytes, sha256).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tmp = f"{path}.tmp-{os.getpid()}"
  n = len(ids)
  num_records = 0
  with tf.io.TFRecordWriter(tmp) as w:
    for s in range(0, n, block_size):
      w.write(features.serialize_block(images[s:s + block_size],
                                       ids[s:s + block_size],
                                       labels[s:s + block_size]))
      num_records += 1
  entry = {
      "file": os.path.basename(path),
      "num_examples": n,
      "num_records": num_records,
      "label_counts": label_counts(labels),
      "bytes": os.path.getsize(tmp),
      "sha256": sha256_file(tmp),
  }
  os.replace(tmp, path)
  return entry


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
  assignment = assign_shards(ids, labels, num_shards)
  entries = []
  for s in range(num_shards):
    idx = np.nonzero(assignment == s)[0]
    entries.append(write_shard(
        os.path.join(out_dir, shard_name(split, s, num_shards)),
        images[idx], [ids[i] for i in idx], labels[idx], block_size))
  manifest = build_manifest(split, entries, source or {"layout": "arrays"},
                            block_size=block_size)
  write_manifest(out_dir, manifest)
  return manifest


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
  if manifest.get("schema_version") != features.SCHEMA_VERSION:
    raise ManifestError(
        f"{path}: schema_version {manifest.get('schema_version')!r}, this hcd "
        f"reads version {features.SCHEMA_VERSION}; re-run tools/make_shards")
  return manifest


def shard_paths(shards_dir: str, manifest: dict) -> list[str]:
  """Returns the full paths of a manifest's shards, in order."""
  return [os.path.join(shards_dir, e["file"]) for e in manifest["shards"]]
