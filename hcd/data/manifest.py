"""Read-only access to shard manifests: names, paths, loading, shape check.

Everything a reader of shards (the training pipeline, evaluation, EDA,
verification) needs to find a split's shards and trust its manifest, and
nothing of the writer. The layout and manifest format are in WORKSPACE.md
("Shards"): `hcd-<split>.tfrecord-00000-of-00032` (TFDS names) beside
`hcd-<split>.manifest.json`.

TensorFlow-free and cheap to import, so a command-line tool can name its
errors (`ManifestError`) without paying for TensorFlow's start-up.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Sequence

import numpy as np

from hcd.data import features

DATASET_NAME = "hcd"
_MANIFEST_SUFFIX = ".manifest.json"
# The keys every shard entry of a manifest must hold.
_SHARD_KEYS = ("file", "num_examples", "num_records", "label_counts", "bytes",
               "sha256")


class ManifestError(ValueError):
  """A missing or invalid manifest; the message names the path."""


class ShardError(ValueError):
  """make_shards refuses, or a shard fails verification; names the file."""


def shard_name(split: str, index: int, num_shards: int) -> str:
  """Returns the TFDS-style file name of one shard.

  Args:
    split: split name.
    index: the shard's index, 0-based.
    num_shards: the split's number of shards.

  Returns:
    e.g. "hcd-train.tfrecord-00003-of-00032".
  """
  return (f"{DATASET_NAME}-{split}.tfrecord-{index:05d}-of-"
          f"{num_shards:05d}")


def manifest_path(shards_dir: str, split: str) -> str:
  """Returns the manifest path of a split inside `shards_dir`.

  Args:
    shards_dir: the shards directory.
    split: split name.

  Returns:
    `<shards_dir>/hcd-<split>.manifest.json`.
  """
  return os.path.join(shards_dir,
                      f"{DATASET_NAME}-{split}{_MANIFEST_SUFFIX}")


def state_dir(shards_dir: str, split: str) -> str:
  """Returns the hidden directory holding a split's lock and shard sidecars.

  Args:
    shards_dir: the shards directory.
    split: split name.

  Returns:
    `<shards_dir>/.hcd-<split>.state`.
  """
  return os.path.join(shards_dir, f".{DATASET_NAME}-{split}.state")


def label_counts(labels: Sequence[int]) -> dict[str, int]:
  """Counts labels as the manifest writes them: a {"0": n0, "1": n1} dict.

  Args:
    labels: integer labels (-1 for unlabelled).

  Returns:
    {label as a string: count}, in label order, without zero counts.
  """
  vals, counts = np.unique(np.asarray(labels, np.int64), return_counts=True)
  return {str(int(v)): int(c) for v, c in zip(vals, counts)}


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
                   if f.endswith(_MANIFEST_SUFFIX)) if os.path.isdir(
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
  """Returns the full paths of a manifest's shards, in order.

  Args:
    shards_dir: the shards directory.
    manifest: a loaded manifest (`load_manifest`).

  Returns:
    One path per shard entry.
  """
  return [os.path.join(shards_dir, e["file"]) for e in manifest["shards"]]


def manifest_splits(shards_dir: str) -> list[str]:
  """Lists the splits that have a manifest in `shards_dir`.

  Args:
    shards_dir: the shards directory (missing: no splits).

  Returns:
    Split names, sorted.
  """
  pre = f"{DATASET_NAME}-"
  if not os.path.isdir(shards_dir):
    return []
  return sorted(n[len(pre):-len(_MANIFEST_SUFFIX)]
                for n in os.listdir(shards_dir)
                if n.startswith(pre) and n.endswith(_MANIFEST_SUFFIX))


def check_manifest_shape(manifest: dict, where: str) -> None:
  """Checks that a manifest's shard entries are complete and add up.

  Args:
    manifest: a loaded manifest.
    where: its path, for messages.

  Raises:
    ManifestError: no shards, an entry missing a key, or totals of
      examples or labels that differ from the sum of the entries.
  """
  shards = manifest.get("shards")
  if not isinstance(shards, list) or not shards:
    raise ManifestError(f"{where}: 'shards' must be a non-empty list")
  for k, e in enumerate(shards):
    missing = [x for x in _SHARD_KEYS if x not in e]
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
