"""The tf.data pipeline that feeds a slide's tiles to the model.

Each element of the first stage is one block (hcd.eval.slide_grid.Block):
its region is read by OpenSlide and resampled by Pillow inside
`tf.numpy_function`, on `parallelism` threads at once. OpenSlide's reads
(ctypes calls) and Pillow's resize release the GIL, so the reads run in
parallel with each other and with the model, which tf.data's prefetch
keeps fed. The blocks' tiles are then sliced, unbatched and re-batched to
the model's batch size; `deterministic` order keeps tile k of the plan
tile k of the output, which is how probabilities find their cells.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Sequence

import numpy as np

from hcd.eval import slide_grid
from hcd.eval import slide_read

# Batches buffered ahead of the model.
PREFETCH = 2


class ReadGate:
  """Lets a slide be closed only when no read of it is in flight.

  When one read fails, tf.data stops, but the other reader threads may
  still be inside OpenSlide; closing the slide then makes OpenSlide abort
  the whole process (an assertion in its TIFF cache). Reads go through
  `reading()`; `close()` refuses new ones and waits for the rest.
  """

  def __init__(self):
    self._cv = threading.Condition()
    self._busy = 0
    self._closed = False

  @contextlib.contextmanager
  def reading(self):
    """Context of one read. Raises RuntimeError once closed."""
    with self._cv:
      if self._closed:
        raise RuntimeError("the slide was closed")
      self._busy += 1
    try:
      yield
    finally:
      with self._cv:
        self._busy -= 1
        self._cv.notify_all()

  def close(self, timeout_s: float = 120.0) -> None:
    """Refuses new reads; waits (GIL released) for those in flight."""
    with self._cv:
      self._closed = True
      self._cv.wait_for(lambda: self._busy == 0, timeout_s)


def block_tiles(slide, geom: slide_read.Geometry,
                block: slide_grid.Block) -> np.ndarray:
  """Reads one block and cuts its kept tiles.

  Args:
    slide: an open OpenSlide.
    geom: the slide's Geometry.
    block: the block.

  Returns:
    uint8 [len(block.cells), 96, 96, 3], in the block's cell order.
  """
  x0, y0, x1, y1 = block.box
  region = slide_read.read_region(slide, geom.level, geom.level_downsample,
                                  geom.level_per_target, block.box,
                                  (x1 - x0, y1 - y0))
  t = slide_grid.TILE
  # A view of every tile position, then one gather of the kept ones.
  windows = np.lib.stride_tricks.sliding_window_view(region, (t, t, 3))
  dy, dx = block.offsets[:, 0], block.offsets[:, 1]
  return np.ascontiguousarray(windows[dy, dx, 0])


def tile_dataset(slide, geom: slide_read.Geometry,
                 blocks: Sequence[slide_grid.Block], batch_size: int,
                 parallelism: int | None = None,
                 gate: ReadGate | None = None):
  """Batches of the blocks' tiles, in block order.

  Args:
    slide: an open OpenSlide (its reads are thread-safe).
    geom: the slide's Geometry.
    blocks: the blocks to read.
    batch_size: tiles per batch (the last may be smaller).
    parallelism: blocks read at once (default: the CPU count, at least 2).
    gate: the slide's ReadGate (close it before the slide).

  Returns:
    tf.data.Dataset of uint8 [B, 96, 96, 3].
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  blocks = list(blocks)
  parallelism = parallelism or max(2, os.cpu_count() or 2)

  gate = gate or ReadGate()

  def read(k):
    with gate.reading():
      return block_tiles(slide, geom, blocks[int(k)])

  def read_op(k):
    tiles = tf.numpy_function(read, [k], tf.uint8, stateful=False)
    return tf.ensure_shape(tiles, (None,) + (slide_grid.TILE,) * 2 + (3,))

  ds = tf.data.Dataset.range(len(blocks))
  ds = ds.map(read_op, num_parallel_calls=parallelism, deterministic=True)
  ds = ds.unbatch().batch(batch_size).prefetch(PREFETCH)
  options = tf.data.Options()
  # Fixed parallelism, as hcd.eval.inputs: the autotuner's thread was seen
  # to block a finished iterator's deletion for seconds.
  options.autotune.enabled = False
  return ds.with_options(options)
