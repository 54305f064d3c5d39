"""Reading an image folder in tf.data, as blocks of decoded images.

The folder counterpart of shard_reader.read_blocks: files are read one by
one inside tf.data, then decoded a block at a time in the graph by
`hcd.data.decode.tf_decode_images`, so no sharding step is needed to
evaluate or predict, and the pixels are exactly those the shard writer
stores for the same files. hcd/data/pipeline.py (`folder_dataset`) batches
the blocks like every other source.

Which files are readable is decided before tf.data starts, by the caller
(hcd.eval.inputs checks every file with the decoder of record and passes
the plain-layout proofs it found as `layouts`).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from hcd.data import batches
from hcd.data import decode
from hcd.data import sources


def parallelism() -> int:
  """Files read (and blocks decoded) at once: every core, at least 2."""
  return max(2, os.cpu_count() or 2)


def folder_blocks(records: Sequence[sources.Record], block_size: int,
                  layouts: dict | None = None):
  """Blocks of images read and decoded inside tf.data, in record order.

  Args:
    records: the images (paths, ids, labels).
    block_size: images decoded together (the last block may be smaller).
    layouts: path -> `decode.TiffLayoutCache.layout` proof of a plain
      strip: files with a proof are sliced in the graph, the others (or
      all, when None) decoded by imagecodecs. Both give
      `decode.read_image`'s pixels.

  Returns:
    tf.data.Dataset of blocks in the hcd.data.batches structure, with ids
    (weight 1; label UNKNOWN_LABEL where the folder has none).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # The distinct proofs (Kaggle files share a few) go into the graph once;
  # each record carries the index of its own, or -1.
  index: dict = {}
  layout_of = [-1] * len(records)
  for k, r in enumerate(records):
    proof = (layouts or {}).get(r.path)
    if proof is not None:
      layout_of[k] = index.setdefault(proof, len(index))
  table = {
      "path": np.array([r.path for r in records], dtype=object),
      "id": np.array([r.id for r in records], dtype=object),
      "label": np.array([r.label for r in records], dtype=np.int64),
      "layout": np.array(layout_of, dtype=np.int32),
  }
  proofs = list(index)

  def read(row):
    return dict(row, contents=tf.io.read_file(row["path"]))

  def decode_block(block):
    images = decode.tf_decode_images(block["contents"], block["path"],
                                     block["layout"], proofs)
    return batches.make(images, block["label"], ids=block["id"])

  # Files are read one by one, but decoded a block at a time: a few
  # vectorised ops per block instead of a dozen per file.
  ds = tf.data.Dataset.from_tensor_slices(table)
  ds = ds.map(read, num_parallel_calls=parallelism())
  return ds.batch(block_size).map(decode_block, num_parallel_calls=2)
