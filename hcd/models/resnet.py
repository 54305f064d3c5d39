"""A compact residual network designed for 96 px histology patches.

Two stride-2 stem convolutions bring 96 px to 24 px cheaply (the tumour
label concerns the central 32 px, so fine detail below ~4 px matters less
than context), then one basic residual block per stage at 64/128/256
channels (24 -> 12 -> 6 px), BatchNorm, global average pooling, dropout and
a float32 sigmoid. ~1.24M parameters. A reference run of this shape reached
0.911 valid AUC on real PCam in 15 CPU-minutes with D4 augmentation and a
warm-up + cosine learning rate.

The last BatchNorm of each residual branch starts with gamma = 0, so every
block starts as the identity (Goyal et al. 2017), which lets the net train
at lr 1e-3 from the first step.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

from hcd.models import common
from hcd.models.batchnorm import FusedBatchNorm


def _conv_bn(x, filters: int, kernel: int, strides: int, name: str,
             activation: bool = True, zero_gamma: bool = False):
  x = layers.Conv2D(filters, kernel, strides=strides, padding="same",
                    use_bias=False, kernel_initializer="he_normal",
                    name=f"{name}_conv")(x)
  x = FusedBatchNorm(
      gamma_initializer="zeros" if zero_gamma else "ones",
      name=f"{name}_bn")(x)
  if activation:
    x = layers.Activation("relu", name=f"{name}_relu")(x)
  return x


def _basic_block(x, filters: int, strides: int, name: str):
  """conv3x3-BN-relu-conv3x3-BN plus a (projected) shortcut, then relu."""
  shortcut = x
  if strides != 1 or x.shape[-1] != filters:
    shortcut = _conv_bn(x, filters, 1, strides, f"{name}_proj",
                        activation=False)
  y = _conv_bn(x, filters, 3, strides, f"{name}_a")
  y = _conv_bn(y, filters, 3, 1, f"{name}_b", activation=False,
               zero_gamma=True)
  x = layers.Add(name=f"{name}_add")([shortcut, y])
  return layers.Activation("relu", name=f"{name}_out")(x)


def resnet(widths: Sequence[int] = (64, 128, 256), stem_widths: Sequence[int]
           = (32, 64), blocks_per_stage: int = 1,
           dropout: float = 0.3, size: int = 0,
           stain_norm: str = "none") -> keras.Model:
  """Builds the compact ResNet.

  Args:
    widths: channels of the residual stages; every stage after the first
      halves the resolution.
    stem_widths: channels of the two stride-2 stem convolutions.
    blocks_per_stage: residual blocks per stage.
    dropout: dropout rate before the classifier.
    size: resize the input to this many px inside the model (0: keep 96;
      see common.input_view). pcam_cpu.flags trains at 64 px.
    stain_norm: "reinhard" or "macenko" maps every input to one reference
      stain inside the model (hcd.models.stain); "none" (default) does not.

  Returns:
    keras.Model: uint8 [B, 96, 96, 3] -> float32 probability [B, 1].

  Raises:
    ValueError: empty widths, blocks_per_stage < 1, bad size, an unknown
      stain_norm.
  """
  stem = lambda x, w, i, name: _conv_bn(x, w, 3, 2, name)
  inputs, x = common.residual_trunk(
      "resnet", widths, stem_widths, blocks_per_stage, size,
      stem=stem, block=_basic_block, stain_norm=stain_norm)
  x = layers.GlobalAveragePooling2D(name="pool")(x)
  x = layers.Dropout(dropout, name="dropout")(x)
  return keras.Model(inputs, common.probability_head(x), name="resnet")
