"""Where to predict on a slide: the tissue mask, the tile grid, read blocks.

Tissue: Otsu's threshold on the saturation of a low-resolution view, as
PCam itself and CLAM/slideflow find tissue (glass and background are grey
or white, i.e. unsaturated; H&E tissue is pink and purple). A floor on the
threshold keeps a blank slide (nothing to separate) free of "tissue".

Grid: 96x96 target-pixel tiles whose top-left corners lie on a grid from
the slide's origin (0, 0) with the stride in target pixels; only tiles
wholly inside the slide. Cell (i, j) is the tile at (j * stride,
i * stride); with the default stride of 32 its centre 32x32 square, the
part a PCam label describes, tiles the slide without gaps or overlap.

Blocks: tiles are read in blocks of neighbouring grid cells, one region
read and one resample per block, then sliced into tiles, so overlapping
tiles (stride < 96) do not read their shared pixels several times. Blocks
without a kept tile are never read.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TILE = 96
# Target pixels per pixel of the tissue mask (and of the overlay's view).
MASK_CELL = 8
# Saturation (0-255) below which nothing is tissue, whatever Otsu says: a
# blank or all-background slide has no two classes to separate.
MIN_SATURATION = 20
# A block's side in target pixels is about this much (a bounded read).
BLOCK_TARGET_PX = 768


def tissue_mask(view: np.ndarray) -> np.ndarray:
  """Tissue pixels of a low-resolution RGB view.

  Args:
    view: uint8 [h, w, 3].

  Returns:
    bool [h, w]: saturation above max(Otsu's threshold, MIN_SATURATION).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from skimage.filters import threshold_otsu  # pylint: disable=g-import-not-at-top
  sat = np.asarray(Image.fromarray(view).convert("HSV"))[..., 1]
  # A constant view has one class: its value is the threshold, so nothing
  # is above it (and MIN_SATURATION keeps a blank slide blank anyway).
  return sat > max(float(threshold_otsu(sat)), MIN_SATURATION)


@dataclasses.dataclass
class Grid:
  """The tile grid of a slide and which tiles are kept.

  Attributes:
    rows: grid rows (tiles wholly inside the slide).
    cols: grid columns.
    stride: target pixels between neighbouring tiles.
    tissue: float32 [rows, cols] tissue fraction of each tile.
    keep: bool [rows, cols] tiles to predict.
  """
  rows: int
  cols: int
  stride: int
  tissue: np.ndarray
  keep: np.ndarray

  @property
  def kept(self) -> np.ndarray:
    """Flat (row-major) indices of the kept cells, ascending."""
    return np.flatnonzero(self.keep.ravel())


def _box_sums(integral: np.ndarray, r0, r1, c0, c1) -> np.ndarray:
  """Sums over [r0, r1) x [c0, c1) from a zero-padded integral image."""
  return (integral[r1, c1] - integral[r0, c1] - integral[r1, c0]
          + integral[r0, c0])


def make_grid(width: int, height: int, stride: int, mask: np.ndarray,
              min_tissue: float) -> Grid:
  """The grid of a slide of `width` x `height` target pixels.

  Args:
    width: slide width in target pixels.
    height: slide height in target pixels.
    stride: target pixels between tiles.
    mask: bool tissue mask, one pixel per MASK_CELL target pixels.
    min_tissue: smallest tissue fraction of a kept tile (0 keeps all).

  Returns:
    The Grid.
  """
  cols = max(0, (width - TILE) // stride + 1)
  rows = max(0, (height - TILE) // stride + 1)
  integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
  integral[1:, 1:] = np.cumsum(np.cumsum(mask, 0), 1)

  def span(n, limit):  # Mask pixels under each tile, at least one.
    start = np.arange(n) * stride
    lo = np.minimum(start // MASK_CELL, limit - 1)
    hi = np.clip(-(-(start + TILE) // MASK_CELL), lo + 1, limit)
    return lo, hi

  r0, r1 = span(rows, mask.shape[0])
  c0, c1 = span(cols, mask.shape[1])
  sums = _box_sums(integral, r0[:, None], r1[:, None], c0, c1)
  area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
  tissue = (sums / np.maximum(area, 1)).astype(np.float32)
  keep = tissue >= min_tissue if min_tissue > 0 else np.ones_like(
      tissue, bool)
  return Grid(rows, cols, stride, tissue, keep)


@dataclasses.dataclass
class Block:
  """Neighbouring grid cells read as one region.

  Attributes:
    box: (x0, y0, x1, y1) of the region in target pixels.
    cells: flat grid indices of the kept tiles in it, ascending.
    offsets: int [n, 2] (dy, dx) of each tile's corner inside the region.
  """
  box: tuple[int, int, int, int]
  cells: np.ndarray
  offsets: np.ndarray


def block_cells(stride: int, level_per_target: float) -> int:
  """Grid cells per block side: a region of about BLOCK_TARGET_PX target
  pixels, and at most 2048 pixels of the level read."""
  side = min(BLOCK_TARGET_PX, int(2048 / max(level_per_target, 1e-6)))
  return max(1, (side - TILE) // stride + 1)


def make_blocks(grid: Grid, per_side: int) -> list[Block]:
  """Groups the kept tiles into blocks of `per_side` x `per_side` cells.

  Args:
    grid: the Grid.
    per_side: cells per block side (`block_cells`).

  Returns:
    Blocks with at least one kept tile, in row-major block order; the
    concatenation of their cells (`plan_cells`) is every kept tile exactly
    once, in block order (not row-major order).
  """
  blocks = []
  s = grid.stride
  for br in range(0, grid.rows, per_side):
    for bc in range(0, grid.cols, per_side):
      sub = grid.keep[br:br + per_side, bc:bc + per_side]
      rr, cc = np.nonzero(sub)
      if not len(rr):
        continue
      nr, nc = sub.shape
      box = (bc * s, br * s, (bc + nc - 1) * s + TILE,
             (br + nr - 1) * s + TILE)
      cells = (rr + br) * grid.cols + (cc + bc)
      blocks.append(Block(box, cells, np.stack([rr * s, cc * s], 1)))
  return blocks


def plan_cells(blocks: list[Block]) -> np.ndarray:
  """The flat grid index of every tile the blocks yield, in their order."""
  if not blocks:
    return np.zeros(0, np.int64)
  return np.concatenate([b.cells for b in blocks])


def chunk_blocks(blocks: list[Block], chunk_tiles: int) -> list[list[int]]:
  """Splits blocks into chunks of about `chunk_tiles` tiles, in order.

  A chunk is the unit a killed run resumes from (hcd.eval.slide).

  Args:
    blocks: from `make_blocks`.
    chunk_tiles: tiles per chunk (a chunk holds whole blocks).

  Returns:
    Lists of block indices.
  """
  chunks, current, n = [], [], 0
  for k, b in enumerate(blocks):
    current.append(k)
    n += len(b.cells)
    if n >= chunk_tiles:
      chunks.append(current)
      current, n = [], 0
  if current:
    chunks.append(current)
  return chunks
