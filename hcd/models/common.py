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
