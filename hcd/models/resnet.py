"""A compact residual network designed for 96 px histology patches.

Two stride-2 stem convolutions bring 96 px to 24 px cheaply (the tumour
label concerns the central 32 px, so fine detail below ~4 px matters less
than context), then one basic residual block per stage at 64/128/256
channels (24 -> 12 -> 6 px), BatchNorm, global average pooling, dropout and
a float32 sigmoid. ~1.24M parameters. A reference run of this shape reached
0.911 valid AUC on real PCam in 15 CPU-minutes with D4 augmentation and a
warm-up + cosine learning rate.

`fovea=48` makes it two streams of 48 px: the centre at full resolution and
the whole patch at half, each with its own trunk (see `_foveated`).
`stem_strides=(3, 2)` or `(2, 3)` takes the full 96 px to the 16-px grid of
the 64-px input at that input's compute: a learned downsampling instead of a
resize. Measured on 2 CPU cores in 30 minutes, (2, 3) tied the resize and
(3, 2) lost to it (BENCHMARKS.md, eleventh session).

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
           dropout: float = 0.3, crop: int = 0,
           size: int = 0, fovea: int = 0,
           stem_strides: Sequence[int] = (),
           centre_pool: bool = False,
           stain_norm: str = "none") -> keras.Model:
  """Builds the compact ResNet.

  Args:
    widths: channels of the residual stages; every stage after the first
      halves the resolution.
    stem_widths: channels of the two stride-2 stem convolutions.
    blocks_per_stage: residual blocks per stage.
    dropout: dropout rate before the classifier.
    crop: centre crop in px before the stem (0: none; see
      common.input_view).
    size: resize to this many px after the crop (0: none).
    fovea: 0, or two streams of `fovea` px each instead of one: the centre
      fovea x fovea px at full resolution (the label concerns the centre
      32 px) and the whole patch resized to fovea x fovea px (its context
      at fovea/96 of the resolution), each through its own stem and stages,
      their pooled features concatenated. Excludes crop and size.
    stem_strides: the stride of each stem convolution (default 2 each).
      (3, 2) brings the full 96 px to the 16 px at which the 64-px input
      enters the stages, at that input's compute, with a learned
      downsampling (3x3 kernels at stride 3 see each pixel once) in place
      of the bilinear resize, which loses a third of the resolution.
    centre_pool: pool the centre cells of the last feature map (over the
      centre third of the patch, where the label is decided) beside the
      whole map (common.centre_and_global_pool).
    stain_norm: "reinhard" maps every input to one reference stain inside
      the model (hcd.models.stain); "none" (default) does not.

  Returns:
    keras.Model: uint8 [B, 96, 96, 3] -> float32 probability [B, 1].

  Raises:
    ValueError: empty widths, blocks_per_stage < 1, bad crop or size, a
      fovea outside 8..95 or combined with crop or size, stem_strides not
      one stride in 1..4 per stem convolution, centre_pool with fovea,
      an unknown stain_norm, or stain_norm with fovea.
  """
  strides = _stem_strides(stem_strides, stem_widths)
  stem = lambda x, w, i, name: _conv_bn(x, w, 3, strides[i], name)
  if fovea:
    if stain_norm != "none":
      raise ValueError(f"stain_norm={stain_norm!r} is not built for the "
                       f"two-stream fovea={fovea} model")
    if centre_pool:
      raise ValueError("centre_pool applies to the single stream, not to "
                       f"fovea={fovea}: the fovea stream is the centre")
    inputs, x = _foveated(fovea, crop, size, widths, stem_widths,
                          blocks_per_stage, stem)
  else:
    inputs, x = common.residual_trunk(
        "resnet", widths, stem_widths, blocks_per_stage, crop, size,
        stem=stem, block=_basic_block, stain_norm=stain_norm)
    x = (common.centre_and_global_pool(x) if centre_pool
         else layers.GlobalAveragePooling2D(name="pool")(x))
  x = layers.Dropout(dropout, name="dropout")(x)
  return keras.Model(inputs, common.probability_head(x), name="resnet")


def _stem_strides(stem_strides, stem_widths) -> tuple[int, ...]:
  """Returns one stride per stem convolution (2 each unless given)."""
  if not stem_strides:
    return (2,) * len(stem_widths)
  strides = tuple(stem_strides)
  if (len(strides) != len(stem_widths)
      or not all(isinstance(s, int) and 1 <= s <= 4 for s in strides)):
    raise ValueError(f"stem_strides must hold one stride in 1..4 for each of "
                     f"the {len(stem_widths)} stem convolutions "
                     f"(stem_widths={tuple(stem_widths)}); got {stem_strides}")
  return strides


def _foveated(fovea: int, crop: int, size: int, widths, stem_widths,
              blocks_per_stage: int, stem):
  """The two pooled streams of `resnet(fovea=...)`: (inputs, features).

  Why two streams: at a fixed compute budget on a CPU, a single stream must
  shrink the whole patch (64 px: the tumour cells of the centre lose a third
  of their resolution), while a centre crop alone loses the context ring
  (-0.025 valid AUC on PCam, BENCHMARKS.md). Two streams of 48 px cost
  2 x 48^2 = 1.1x the pixels of one 64 px stream and keep both. Measured
  on 2 CPU cores in 30 minutes, it lost to the one 64-px stream (0.910 vs
  0.916 valid AUC with TTA; BENCHMARKS.md, tenth session).
  """
  side = common.IMAGE_SHAPE[0]
  if not 8 <= fovea < side:
    raise ValueError(f"fovea must be in 8..{side - 1} px, got {fovea}")
  if crop or size:
    raise ValueError(f"fovea={fovea} excludes crop and size (got crop="
                     f"{crop}, size={size}): it sets both views itself")
  common.check_stages("resnet", widths, stem_widths, blocks_per_stage)
  inputs, x = common.input_and_rescale()
  views = {"fovea": common.input_view(x, crop=fovea),
           "context": common.input_view(x, size=fovea)}
  pooled = []
  for name, view in views.items():
    y = common.residual_stages(view, widths, stem_widths, blocks_per_stage,
                               stem, _basic_block, prefix=f"{name}_")
    pooled.append(layers.GlobalAveragePooling2D(name=f"{name}_pool")(y))
  return inputs, layers.Concatenate(name="pool")(pooled)
