"""Shared helpers of the whole-slide tests: a colour model and small slides.

The colour model's probability rises with how much bluer than red a patch
is on average, so purple "tumour" tissue scores high and pink "normal"
tissue low: a generated slide with a tumour region then has a known answer
in level-0 coordinates. Slides are small tiled pyramidal TIFFs written by
hcd.eval.slide_synth.
"""

import numpy as np

from hcd.eval import slide_synth

import evalutil

PINK = (230, 150, 200)
PURPLE = (90, 40, 160)


def colour_model():
  """uint8 [B, 96, 96, 3] -> sigmoid(12 * (mean blue - mean red) / 255)."""
  import keras  # pylint: disable=g-import-not-at-top
  inputs = keras.Input((96, 96, 3), dtype="uint8")
  x = keras.layers.Rescaling(1 / 255)(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  dense = keras.layers.Dense(1, activation="sigmoid", dtype="float32")
  out = dense(x)
  dense.set_weights([np.array([[-12.0], [0.0], [12.0]], np.float32),
                     np.zeros(1, np.float32)])
  return keras.Model(inputs, out)


def colour_run(workdir):
  """A run directory holding the colour model."""
  return evalutil.make_run(str(workdir), colour_model(), name="colour")


def solid_patches(colour, n=4, seed=0):
  """n 96x96 patches of a colour with a little noise (tissue texture)."""
  rng = np.random.default_rng(seed)
  base = np.array(colour, np.int16)
  noise = rng.integers(-12, 13, (n, 96, 96, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def tumour_slide(path, mpp=0.25, size=(4000, 3600),
                 tissue=(400, 400, 3600, 3200),
                 tumour=(1600, 1000, 3000, 2000), downsamples=(1, 2, 4),
                 compression="jpeg"):
  """A slide: pink tissue in `tissue`, purple tumour in `tumour`, white.

  Boxes are (x0, y0, x1, y1) in level-0 pixels.
  """
  patches = np.concatenate([solid_patches(PINK), solid_patches(PURPLE)])
  tx0, ty0, tx1, ty1 = tumour
  x0, y0 = tissue[:2]
  px = 96  # Level-0 pixels per patch: the patches are repeated unscaled.

  def pick(py, pxx):
    # Patch cells are 96 level-0 px; a cell whose centre is in the tumour
    # box takes a purple patch (indices 4..7).
    cy = y0 + py * px + px // 2
    cx = x0 + pxx * px + px // 2
    inside = (cy >= ty0) & (cy < ty1) & (cx >= tx0) & (cx < tx1)
    return (py * 7 + pxx * 3) % 4 + 4 * inside

  content = slide_synth.mosaic_content(patches, tissue, pick, patch_px=px)
  return slide_synth.write_tiled(str(path), size[0], size[1], mpp,
                                 downsamples, content, compression)


def blank_slide(path, mpp=0.5, size=(1200, 1000)):
  """An all-white slide (no tissue)."""
  return slide_synth.write_tiled(str(path), size[0], size[1], mpp, (1, 2),
                                 lambda *a: None, "zlib")
