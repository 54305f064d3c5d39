"""Generated slides: tiled pyramidal TIFFs that OpenSlide reads.

For tests, benchmarks and the demo: what the one real slide in
../shared/data/wsi cannot show (several levels, a known tumour region, no
tissue, no resolution, 100k-pixel sides). tifffile writes every level as a
tiled page (level 0 first, then the reduced ones), with its resolution in
pixels per centimetre, which OpenSlide's generic-TIFF reader turns into
`openslide.mpp-x/-y`. A tile the content function leaves empty is written
with no data at all (a sparse file); OpenSlide reads it as transparent,
which hcd_slide treats as white background.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

TILE = 256
WHITE = 255


def write_tiled(path: str, width: int, height: int, mpp: float | None,
                downsamples: Sequence[int],
                content: Callable[[int, int, int, int, int], np.ndarray | None],
                compression: str | None = "jpeg", quality: int = 90) -> str:
  """Writes a pyramidal tiled TIFF, tile by tile (bounded memory).

  Args:
    path: the file.
    width: level-0 width in pixels.
    height: level-0 height in pixels.
    mpp: level-0 microns per pixel; None writes no resolution.
    downsamples: integer downsample of each level, first 1.
    content: (downsample, y0, x0, h, w) -> uint8 [h, w, 3] pixels of that
      level's region, or None for an empty (background) tile.
    compression: "jpeg", "zlib" or None (uncompressed).
    quality: JPEG quality.

  Returns:
    path.
  """
  import tifffile  # pylint: disable=g-import-not-at-top
  args = {}
  if compression == "jpeg":
    args["compressionargs"] = {"level": quality}
  with tifffile.TiffWriter(path, bigtiff=True) as tif:
    for k, d in enumerate(downsamples):
      w, h = -(-width // d), -(-height // d)
      res = {}
      if mpp is not None:
        res = {"resolution": (1e4 / (mpp * d),) * 2,
               "resolutionunit": "CENTIMETER"}
      tif.write(_tiles(w, h, d, content), shape=(h, w, 3), dtype=np.uint8,
                tile=(TILE, TILE), photometric="rgb",
                compression=compression, subfiletype=1 if k else 0,
                **res, **args)
  return path


def _tiles(w: int, h: int, d: int, content):
  """The tiles of one level in row-major order, None for empty ones."""
  first = True
  for y in range(0, h, TILE):
    for x in range(0, w, TILE):
      th, tw = min(TILE, h - y), min(TILE, w - x)
      tile = content(d, y, x, th, tw)
      if tile is None and first:
        # tifffile takes the iterator's type from its first item.
        tile = np.full((th, tw, 3), WHITE, np.uint8)
      if tile is not None and tile.shape[:2] != (TILE, TILE):
        full = np.full((TILE, TILE, 3), WHITE, np.uint8)
        full[:th, :tw] = tile
        tile = full
      first = False
      yield tile


def array_content(levels: Sequence[np.ndarray]):
  """A `write_tiled` content function serving given level arrays.

  Args:
    levels: uint8 [h, w, 3] per level, in `downsamples` order.
  """
  by_downsample = {}
  for arr in levels:
    d = round(levels[0].shape[1] / arr.shape[1])
    by_downsample[d] = arr

  def content(d, y, x, h, w):
    return by_downsample[d][y:y + h, x:x + w]

  return content


def patch_grid_levels(patches: np.ndarray, upsample: int = 2
                      ) -> list[np.ndarray]:
  """Levels of a slide made of patches laid out in a grid.

  Args:
    patches: uint8 [rows, cols, 96, 96, 3].
    upsample: level 0 has every patch pixel repeated upsample x upsample
      times; level 1 holds the patches exactly.

  Returns:
    [level 0, level 1] arrays.
  """
  rows, cols, ph, pw, _ = patches.shape
  mosaic = patches.transpose(0, 2, 1, 3, 4).reshape(rows * ph, cols * pw, 3)
  level0 = np.repeat(np.repeat(mosaic, upsample, 0), upsample, 1)
  return [level0, mosaic]


def mosaic_content(patches: np.ndarray, box: tuple[int, int, int, int],
                   pick: Callable[[np.ndarray, np.ndarray], np.ndarray],
                   patch_px: int = 96):
  """A content function: patches tiled over `box`, white elsewhere.

  Args:
    patches: uint8 [n, 96, 96, 3] to draw from.
    box: (x0, y0, x1, y1) of the tissue in level-0 pixels.
    pick: (patch row, patch col) int arrays -> patch index arrays (which
      patch goes where, e.g. tumour patches inside a region).
    patch_px: level-0 pixels per patch side (96 * level-0 px per patch
      pixel: 192 when level 0 is twice the patches' resolution).
  """
  n, ps = len(patches), patches.shape[1]
  x0, y0, x1, y1 = box

  def content(d, y, x, h, w):
    ys = (np.arange(h) + y) * d
    xs = (np.arange(w) + x) * d
    inside_y = (ys >= y0) & (ys < y1)
    inside_x = (xs >= x0) & (xs < x1)
    if not inside_y.any() or not inside_x.any():
      return None
    py, px = (ys - y0) // patch_px, (xs - x0) // patch_px
    idx = pick(py[:, None], px[None, :]) % n
    qy = ((ys - y0) % patch_px) * ps // patch_px
    qx = ((xs - x0) % patch_px) * ps // patch_px
    out = patches[idx, qy[:, None], qx[None, :]]
    out[~(inside_y[:, None] & inside_x[None, :])] = WHITE
    return out

  return content
