"""Reading whole-slide images with OpenSlide at a chosen resolution.

A slide is read through `openslide-python` (the `openslide-bin` wheel brings
the C library, so nothing is needed from the system): Aperio .svs,
Hamamatsu .ndpi, MIRAX .mrxs, generic tiled TIFF and the other formats
OpenSlide knows.

Coordinates. hcd_slide works in *target pixels*: pixels at the model's
training resolution (`target_mpp`, PCam's ~0.972 um/px). `Geometry` maps
them to the pyramid level read (the level whose resolution is closest to the
target) and to level 0, the coordinates every output file uses. Regions are
read from that level and resampled the rest of the way with Pillow, whose
`resize(box=...)` takes a fractional source box, so a region keeps its
sub-pixel position when the scale is not an integer.

Transparent pixels (outside a MIRAX scan area, a missing tile of a sparse
TIFF) are made white, i.e. background, as the glass would look.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

# A level whose resolution is within this relative distance of the target
# is read as is: a generic TIFF stores its resolution as a rational, so
# 0.972 um/px comes back as 0.97199..., which must not trigger a resample
# (a 0.1% scale moves a 96-px tile by less than 0.1 px).
SAME_SCALE = 1e-3
# Largest region side (level pixels) read in one call: bounds memory per
# read whatever the slide's size.
MAX_READ_PX = 2048


class SlideError(ValueError):
  """A slide that cannot be used; the message names it and what to do."""


def open_slide(path: str):
  """Opens a slide with OpenSlide.

  Args:
    path: the slide file.

  Returns:
    An openslide.OpenSlide.

  Raises:
    SlideError: missing file, a format OpenSlide does not read, or a
      corrupt or truncated file; the message names the file and the remedy.
  """
  import openslide  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise SlideError(f"{path}: no such file; check the path or the --slides "
                     f"pattern")
  try:
    return openslide.OpenSlide(path)
  except openslide.OpenSlideUnsupportedFormatError:
    if _is_tiff(path):  # .svs, .ndpi, .tif, ... are TIFFs underneath.
      raise SlideError(
          f"{path}: a TIFF file OpenSlide cannot read: truncated or "
          f"corrupt, or not tiled (OpenSlide reads tiled TIFFs); copy it "
          f"again, or convert it to a tiled pyramidal TIFF") from None
    raise SlideError(
        f"{path}: not a slide format OpenSlide reads (.svs, .ndpi, .mrxs, "
        f"tiled TIFF, ...); convert it to a tiled pyramidal TIFF or leave "
        f"it out") from None
  except (openslide.OpenSlideError, OSError) as e:
    raise SlideError(f"{path}: unreadable slide ({e}); the file may be "
                     f"truncated or corrupt: copy it again") from None


def _is_tiff(path: str) -> bool:
  """Whether the file starts like a TIFF or BigTIFF."""
  try:
    with open(path, "rb") as f:
      head = f.read(4)
  except OSError:
    return False
  return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def slide_mpp(slide, path: str, mpp: float | None = None) -> float:
  """The slide's level-0 resolution in microns per pixel.

  Args:
    slide: an open OpenSlide.
    path: the slide's file, for messages.
    mpp: the resolution given by the user (--mpp); wins over the metadata.

  Returns:
    Microns per level-0 pixel (the mean of x and y).

  Raises:
    SlideError: no resolution in the metadata and none given, or a
      non-positive one.
  """
  if mpp is None:
    props = slide.properties
    try:
      mpp = (float(props["openslide.mpp-x"]) +
             float(props["openslide.mpp-y"])) / 2
    except (KeyError, ValueError):
      raise SlideError(
          f"{path}: no resolution (microns per pixel) in the slide's "
          f"metadata; pass --mpp=<microns per level-0 pixel> if you know "
          f"it (e.g. 0.25 for 40x, 0.5 for 20x)") from None
  if not (math.isfinite(mpp) and mpp > 0):
    raise SlideError(f"{path}: resolution {mpp} um/px is not a positive "
                     f"number; pass --mpp")
  return float(mpp)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How target pixels map to the level read and to level 0.

  Attributes:
    mpp0: microns per level-0 pixel.
    target_mpp: microns per target pixel (the model's resolution).
    level: the pyramid level regions are read from.
    level_downsample: level-0 pixels per pixel of that level.
    level_per_target: pixels of that level per target pixel (1.0: no
      resampling).
    width: the slide's width in target pixels.
    height: the slide's height in target pixels.
  """
  mpp0: float
  target_mpp: float
  level: int
  level_downsample: float
  level_per_target: float
  width: int
  height: int

  @property
  def level0_per_target(self) -> float:
    """Level-0 pixels per target pixel (the factor of every output)."""
    return self.level_per_target * self.level_downsample


def plan_geometry(slide, mpp0: float, target_mpp: float) -> Geometry:
  """Chooses the level closest to the target resolution.

  Closest in log scale: a level 1.9x finer and one 1.9x coarser are as far;
  at a tie (2x finer and 2x coarser, to 0.1%: resolutions stored as
  rationals are a little off) the finer one, which is downsampled rather
  than upsampled.

  Args:
    slide: an open OpenSlide.
    mpp0: microns per level-0 pixel (`slide_mpp`).
    target_mpp: microns per pixel of the tiles.

  Returns:
    The Geometry.
  """
  downs = [float(d) for d in slide.level_downsamples]
  level = min(range(len(downs)), key=lambda k: (
      round(abs(math.log(mpp0 * downs[k] / target_mpp)), 3), downs[k]))
  ratio = target_mpp / (mpp0 * downs[level])
  if abs(ratio - 1.0) < SAME_SCALE:
    ratio = 1.0
  w0, h0 = slide.dimensions
  f0 = ratio * downs[level]
  # A hundredth of a pixel of slack: 1536 px at a stored 0.48599904
  # um/px is 768 target px, not 767.998.
  return Geometry(mpp0, target_mpp, level, downs[level], ratio,
                  int(w0 / f0 + 0.01), int(h0 / f0 + 0.01))


def _rgb(region) -> np.ndarray:
  """An OpenSlide RGBA region as RGB, transparent pixels made white."""
  arr = np.asarray(region)
  # Opaque: the common, fast case (numpy's min is 4x faster than Pillow's
  # getextrema here, Pillow's convert 40x faster than a numpy channel copy).
  if arr[..., 3].min() == 255:
    return np.asarray(region.convert("RGB"))
  arr = arr.astype(np.uint16)
  alpha = arr[..., 3:]
  # OpenSlide returns un-premultiplied colour: blend onto white.
  rgb = (arr[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
  return rgb.astype(np.uint8)


def read_region(slide, level: int, level_downsample: float,
                level_per_out: float, box: tuple[float, float, float, float],
                out_size: tuple[int, int], resample=None) -> np.ndarray:
  """Reads a region given in output pixels, resampled to `out_size`.

  Args:
    slide: an open OpenSlide.
    level: the level to read.
    level_downsample: level-0 pixels per pixel of `level`.
    level_per_out: pixels of `level` per output-grid pixel.
    box: (x0, y0, x1, y1) of the region on the output grid (target pixels,
      or coarser ones for a low-resolution view).
    out_size: (width, height) of the returned image.
    resample: a Pillow filter (default bilinear, which Pillow widens to
      average every source pixel when reducing).

  Returns:
    uint8 [height, width, 3].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  lx0, ly0, lx1, ly1 = (v * level_per_out for v in box)
  ix0, iy0 = math.floor(lx0 + 1e-6), math.floor(ly0 + 1e-6)
  ix1, iy1 = math.ceil(lx1 - 1e-6), math.ceil(ly1 - 1e-6)
  location = (int(round(ix0 * level_downsample)),
              int(round(iy0 * level_downsample)))
  region = slide.read_region(location, level, (ix1 - ix0, iy1 - iy0))
  if (ix1 - ix0, iy1 - iy0) == tuple(out_size) and level_per_out == 1.0:
    return _rgb(region)
  region = region.resize(
      tuple(out_size),
      Image.Resampling.BILINEAR if resample is None else resample,
      box=(lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0))
  return _rgb(region)


def low_res_view(slide, geom: Geometry, cell: int) -> np.ndarray:
  """The whole slide at one pixel per `cell` x `cell` target pixels.

  Read piece by piece (at most MAX_READ_PX level pixels a side) from the
  coarsest level that is still at least as fine, and area-averaged, so
  memory stays bounded for any slide size (OpenSlide's own get_thumbnail
  reads the whole chosen level at once).

  Args:
    slide: an open OpenSlide.
    geom: the slide's Geometry.
    cell: target pixels per view pixel.

  Returns:
    uint8 [ceil(height / cell), ceil(width / cell), 3].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  want = geom.level0_per_target * cell  # Level-0 px per view pixel.
  downs = [float(d) for d in slide.level_downsamples]
  level = max((k for k in range(len(downs)) if downs[k] <= want * 1.001),
              key=lambda k: downs[k], default=0)
  per_out = want / downs[level]
  w, h = -(-geom.width // cell), -(-geom.height // cell)
  view = np.empty((h, w, 3), np.uint8)
  step = max(1, int(MAX_READ_PX / per_out))
  for y in range(0, h, step):
    for x in range(0, w, step):
      x1, y1 = min(w, x + step), min(h, y + step)
      view[y:y1, x:x1] = read_region(slide, level, downs[level], per_out,
                                     (x, y, x1, y1), (x1 - x, y1 - y),
                                     Image.Resampling.BOX)
  return view
