"""Which image goes to which shard, and how many shards a split gets.

The assignment depends only on the ids and labels (a keyed hash of each
id), never on listing order or the number of writer processes, so a rerun
of tools/make_shards plans the same shards.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np

from hcd.data import features

# Shards of at most this many bytes: 100-200 MB each once there are two or
# more, big enough for sequential reads and few enough files to interleave.
MAX_SHARD_BYTES = 200_000_000
# Bytes per image in a shard beyond its pixels (id, label, framing), used only
# to estimate shard sizes.
_PER_IMAGE_OVERHEAD = 48

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
