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


def centre_and_global_pool(x, name: str = "pool"):
  """Global average pooling, concatenated with pooling over the centre cells.

  Why: the label concerns only the centre 32x32 px of the 96 px patch, but
  global average pooling weighs every cell of the last feature map alike,
  so tumour in the context ring (label 0) and in the centre (label 1) pool
  to similar features. Pooling the cells over the centre third as well
  lets the classifier weigh them apart, for C more inputs to one Dense
  unit and no convolution.

  Args:
    x: the last stage's [B, H, W, C] feature map, H == W.
    name: prefix of the layers' names ("<name>" is the concatenation).

  Returns:
    [B, 2C]: the whole map's mean features, then the centre cells'.

  Raises:
    ValueError: a non-square map.
  """
  grid = x.shape[1]
  if grid is None or grid != x.shape[2]:
    raise ValueError(f"centre pooling needs a square feature map, got "
                     f"{tuple(x.shape[1:3])}")
  # The fewest cells that cover the centre third and stay centred (same
  # parity as the grid): 4 -> 2, 6 -> 2, 3 -> 1, 8 -> 4.
  cells = -(-grid // 3)
  if (grid - cells) % 2:
    cells += 1
  margin = (grid - cells) // 2
  centre = layers.Cropping2D(margin, name=f"{name}_centre_crop")(x)
  pooled = [layers.GlobalAveragePooling2D(name=f"{name}_global")(x),
            layers.GlobalAveragePooling2D(name=f"{name}_centre")(centre)]
  return layers.Concatenate(name=name)(pooled)


def residual_trunk(name: str, widths, stem_widths, blocks_per_stage: int,
                   crop: int, size: int, stem, block, stain_norm: str = "none"):
  """The shared layout of hcd's ResNets: input, stem convs, residual stages.

  Args:
    name: the model's name, for error messages.
    widths, stem_widths, blocks_per_stage, stem, block: see
      `residual_stages`.
    crop, size: see `input_view`.
    stain_norm: see `input_and_rescale`.

  Returns:
    (the uint8 keras.Input, the last stage's feature map).

  Raises:
    ValueError: empty widths or stem_widths, blocks_per_stage < 1, bad crop
      or size, an unknown stain_norm.
  """
  check_stages(name, widths, stem_widths, blocks_per_stage)
  inputs, x = input_and_rescale(stain_norm=stain_norm)
  x = input_view(x, crop, size)
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
                    block, prefix: str = ""):
  """Stem convolutions, then residual stages, on the tensor `x`.

  Args:
    x: the (rescaled) image tensor.
    widths: width of each residual stage; every stage after the first
      halves the resolution (its first block has stride 2).
    stem_widths: width of each stride-2 stem convolution.
    blocks_per_stage: residual blocks per stage.
    stem: callable(x, width, index, name) -> x, one stem convolution.
    block: callable(x, width, strides, name) -> x, one residual block.
    prefix: prepended to every layer name, so that one model can hold
      several trunks (the foveated ResNet's two streams).

  Returns:
    The last stage's feature map.
  """
  for i, w in enumerate(stem_widths):
    x = stem(x, w, i, f"{prefix}stem{i}")
  for s, w in enumerate(widths):
    for b in range(blocks_per_stage):
      x = block(x, w, 2 if (s > 0 and b == 0) else 1,
                f"{prefix}stage{s}_block{b}")
  return x
