"""The input and output ends shared by every model in the table."""

from __future__ import annotations

import keras
from keras import layers

from hcd.data.features import IMAGE_SHAPE


def input_and_rescale(image_shape=IMAGE_SHAPE):
  """Returns (uint8 keras.Input, the same scaled to [0, 1] in compute dtype).

  The cast happens here, on the accelerator, so the input pipeline can ship
  uint8 (4x fewer bytes than float32).
  """
  inputs = keras.Input(shape=tuple(image_shape), dtype="uint8", name="image")
  x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
  return inputs, x


def probability_head(x, name: str = "probability"):
  """Returns Dense(1, sigmoid) forced to float32.

  Under a mixed precision policy the sigmoid and the loss must stay float32:
  bf16 probabilities have ~3 significant digits, too coarse for ROC-AUC ties
  and log loss.
  """
  return layers.Dense(1, activation="sigmoid", dtype="float32", name=name)(x)


def input_view(x, crop: int = 0, size: int = 0):
  """Optionally centre-crops and/or resizes the rescaled input (in-model).

  Both are standard Keras layers inside the model, so training, evaluation
  and every saved model see the same view.

  Args:
    x: the rescaled [B, 96, 96, 3] input.
    crop: keep the centre crop x crop px (0: all 96). The label concerns the
      centre 32x32 px; a crop trades outer context for compute.
    size: resize (bilinear) to size x size px after the crop (0: keep).
      Upsampling gives the stride-2 stem more pixels per tissue feature.

  Returns:
    The (cropped, resized) tensor.

  Raises:
    ValueError: crop or size out of range.
  """
  if crop:
    if not 0 < crop <= IMAGE_SHAPE[0]:
      raise ValueError(f"crop must be in 1..{IMAGE_SHAPE[0]}, got {crop}")
    x = layers.CenterCrop(crop, crop, name="centre_crop")(x)
  if size:
    if size < 8:
      raise ValueError(f"size must be >= 8, got {size}")
    x = layers.Resizing(size, size, interpolation="bilinear",
                        name="resize")(x)
  return x
