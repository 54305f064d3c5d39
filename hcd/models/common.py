"""The input and output ends shared by every model in the table."""

from __future__ import annotations

import keras
from keras import layers

from hcd.data.features import IMAGE_SHAPE
from hcd.models import stain


def input_and_rescale(image_shape=IMAGE_SHAPE, stain_norm: str = "none"):
  """Returns (uint8 keras.Input, the same scaled to [0, 1] in compute dtype).

  The cast happens here, on the accelerator, so the input pipeline can ship
  uint8 (4x fewer bytes than float32).

  Args:
    image_shape: the input's [H, W, C].
    stain_norm: "none", or a method of `stain.STAIN_NORMS` that maps every
      input to one reference stain inside the model.

  Raises:
    ValueError: an unknown stain_norm.
  """
  stain.check_stain_norm(stain_norm)
  inputs = keras.Input(shape=tuple(image_shape), dtype="uint8", name="image")
  x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
  if stain_norm != "none":
    x = stain.StainNormalization(stain_norm, name="stain_norm")(x)
  return inputs, x


def probability_head(x, name: str = "probability"):
  """Returns Dense(1, sigmoid) forced to float32.

  Under a mixed precision policy the sigmoid and the loss must stay float32:
  bf16 probabilities have ~3 significant digits, too coarse for ROC-AUC ties
  and log loss.
  """
  return layers.Dense(1, activation="sigmoid", dtype="float32", name=name)(x)


def input_view(x, size: int = 0):
  """Optionally resizes the rescaled input (in-model).

  A standard Keras layer inside the model, so training, evaluation and every
  saved model see the same view.

  Args:
    x: the rescaled [B, 96, 96, 3] input.
    size: resize (bilinear) to size x size px (0: keep). The whole patch is
      kept, context ring included, at fewer pixels: cheaper per image.

  Returns:
    The (resized) tensor.

  Raises:
    ValueError: size out of range.
  """
  if size:
    if size < 8:
      raise ValueError(f"size must be >= 8, got {size}")
    x = layers.Resizing(size, size, interpolation="bilinear",
                        name="resize")(x)
  return x


def residual_trunk(name: str, widths, stem_widths, blocks_per_stage: int,
                   size: int, stem, block, stain_norm: str = "none"):
  """The shared layout of hcd's ResNets: input, stem convs, residual stages.

  Args:
    name: the model's name, for error messages.
    widths, stem_widths, blocks_per_stage, stem, block: see
      `residual_stages`.
    size: see `input_view`.
    stain_norm: see `input_and_rescale`.

  Returns:
    (the uint8 keras.Input, the last stage's feature map).

  Raises:
    ValueError: empty widths or stem_widths, blocks_per_stage < 1, bad
      size, an unknown stain_norm.
  """
  check_stages(name, widths, stem_widths, blocks_per_stage)
  inputs, x = input_and_rescale(stain_norm=stain_norm)
  x = input_view(x, size)
  return inputs, residual_stages(x, widths, stem_widths, blocks_per_stage,
                                 stem, block)


def check_stages(name: str, widths, stem_widths, blocks_per_stage: int):
  """Raises ValueError unless there is a stage, a stem conv and a block."""
  if not widths or not stem_widths or blocks_per_stage < 1:
    raise ValueError(f"{name} needs at least one stage, one stem conv and "
                     f"one block per stage; got widths={widths}, "
                     f"stem_widths={stem_widths}, "
                     f"blocks_per_stage={blocks_per_stage}")


def residual_stages(x, widths, stem_widths, blocks_per_stage: int, stem,
                    block):
  """Stem convolutions, then residual stages, on the tensor `x`.

  Args:
    x: the (rescaled) image tensor.
    widths: width of each residual stage; every stage after the first
      halves the resolution (its first block has stride 2).
    stem_widths: width of each stride-2 stem convolution.
    blocks_per_stage: residual blocks per stage.
    stem: callable(x, width, index, name) -> x, one stem convolution.
    block: callable(x, width, strides, name) -> x, one residual block.

  Returns:
    The last stage's feature map.
  """
  for i, w in enumerate(stem_widths):
    x = stem(x, w, i, f"stem{i}")
  for s, w in enumerate(widths):
    for b in range(blocks_per_stage):
      x = block(x, w, 2 if (s > 0 and b == 0) else 1,
                f"stage{s}_block{b}")
  return x
