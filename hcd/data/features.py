"""The tf.Example schema of hcd shards, defined once for writer and parser.

A record holds a *block* of up to `BLOCK_SIZE` images rather than one image.
One-image records cap a 2-core reader at ~35k records/s and parallel
interleave at ~15k/s (per-element overhead); a block amortises that cost over
hundreds of images, so the reader is bound by memory bandwidth instead.

Record layout (schema version 1):

  images  bytes   n*96*96*3 raw uint8 pixels, HWC, images back to back
  ids     bytes[] n ids (Kaggle: SHA-1 hex of the pixels; folders: "<label>/<stem>")
  labels  int64[] n labels in {0, 1}, or -1 where unknown (test split)

Pixels are stored raw (never re-encoded), so reading needs no image decode.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SCHEMA_VERSION = 1
RECORD_FORMAT = "hcd-image-block-v1"
IMAGE_SHAPE = (96, 96, 3)
IMAGE_BYTES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
BLOCK_SIZE = 256
UNKNOWN_LABEL = -1

KEY_IMAGES = "images"
KEY_IDS = "ids"
KEY_LABELS = "labels"


def feature_spec():
  """Returns the parsing spec for one serialized block (imports TensorFlow)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {
      KEY_IMAGES: tf.io.FixedLenFeature([], tf.string),
      KEY_IDS: tf.io.RaggedFeature(tf.string),
      KEY_LABELS: tf.io.RaggedFeature(tf.int64),
  }


def serialize_block(images: np.ndarray, ids: Sequence[str],
                    labels: Sequence[int]) -> bytes:
  """Serializes a block of images into one tf.Example.

  Args:
    images: uint8 array [n, 96, 96, 3].
    ids: n image ids.
    labels: n labels in {0, 1, UNKNOWN_LABEL}.

  Returns:
    The serialized tf.Example bytes.

  Raises:
    ValueError: on a shape, dtype or length mismatch.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  n = len(ids)
  if images.dtype != np.uint8 or images.shape != (n,) + IMAGE_SHAPE:
    raise ValueError(f"block images must be uint8 {(n,) + IMAGE_SHAPE}, got "
                     f"{images.dtype} {images.shape}")
  if len(labels) != n:
    raise ValueError(f"block has {n} ids but {len(labels)} labels")
  feature = {
      KEY_IMAGES: tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[images.tobytes()])),
      KEY_IDS: tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[i.encode("utf-8") for i in ids])),
      KEY_LABELS: tf.train.Feature(int64_list=tf.train.Int64List(
          value=[int(x) for x in labels])),
  }
  return tf.train.Example(
      features=tf.train.Features(feature=feature)).SerializeToString()


def parse_block(serialized):
  """Parses one serialized block (graph-safe; use inside tf.data).

  Args:
    serialized: scalar tf.string tensor.

  Returns:
    dict with "image" uint8 [n, 96, 96, 3], "id" string [n], "label" int64 [n].
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  parsed = tf.io.parse_single_example(serialized, feature_spec())
  images = tf.io.decode_raw(parsed[KEY_IMAGES], tf.uint8)
  images = tf.reshape(images, (-1,) + IMAGE_SHAPE)
  return {"image": images, "id": parsed[KEY_IDS], "label": parsed[KEY_LABELS]}


def parse_block_numpy(serialized: bytes):
  """Parses one block eagerly into numpy (for verification and tests).

  Returns:
    (images uint8 [n, 96, 96, 3], ids list[str], labels int64 [n]).

  Raises:
    ValueError: if the pixel payload does not match the number of ids.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ex = tf.train.Example.FromString(serialized)
  f = ex.features.feature
  ids = [b.decode("utf-8") for b in f[KEY_IDS].bytes_list.value]
  labels = np.asarray(f[KEY_LABELS].int64_list.value, dtype=np.int64)
  raw = f[KEY_IMAGES].bytes_list.value[0]
  if len(raw) != len(ids) * IMAGE_BYTES or len(labels) != len(ids):
    raise ValueError(f"block is inconsistent: {len(raw)} pixel bytes, "
                     f"{len(ids)} ids, {len(labels)} labels")
  images = np.frombuffer(raw, np.uint8).reshape((len(ids),) + IMAGE_SHAPE)
  return images, ids, labels
