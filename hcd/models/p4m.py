"""A rotation- and mirror-equivariant (P4M) variant of the compact ResNet.

Tissue has no orientation. The compact ResNet learns that from D4
augmentation; a P4M network has it built in (Cohen & Welling 2016; Veeling
et al. 2018 reached 0.963 PCam test AUC with a P4M-DenseNet). Every
convolution here is a *group convolution* over the dihedral group D4 (the
4 rotations by 90 degrees and their mirror images, 8 elements): one learned
kernel is applied in all 8 orientations, so each feature exists in 8
orientation channels and a rotated or mirrored input gives the same
features, rotated and with their orientation channels permuted. After the
last stage, features are averaged over space and over the 8 orientations,
which makes the network *exactly invariant*: p(D4 transform of x) == p(x)
for all 8 transforms (up to float rounding), so test-time augmentation adds
nothing to it.

Exactness needs every down-sampling step to be symmetric under flips of an
even-sized map: strided convolutions use 4x4 kernels (TensorFlow's "same"
padding is then 1 px on both sides) and projection shortcuts average-pool
2x2 before their 1x1 convolution (ResNet-D), never a strided 1x1.

Layout: a feature map with C features has 8*C channels, channel g*C + c
holding feature c in orientation g (g as in `augment.d4_transform`: 4t + 2r
+ c = transpose?, flip rows?, flip columns?). Orientation-major, so that
batch normalisation, which shares one mean, variance, scale and shift per
feature across its 8 orientations (keeping the equivariance), is a standard
BatchNormalization over the last axis of an [H, W, 8, C] view: a contiguous
reduction (the feature-major layout made it ~3x slower on CPU).

Compute and parameters: a group convolution from C_in to C_out features
costs what a plain convolution from 8*C_in to 8*C_out channels costs, with
8x fewer weights. `widths`/`stem_widths` count features per orientation, so
the defaults (4, 8 / 8, 16, 32) give the channel counts and nearly the
compute of the compact ResNet (32, 64 / 64, 128, 256) at ~1/8 of its
weights.

Saving: `P4MConv2D` is the one non-standard layer besides hcd's
`FusedBatchNorm` (hcd.models.batchnorm). `standard_model` (used
whenever hcd saves a .keras file) rebuilds the network with plain `Conv2D`
layers holding the 8 expanded orientations of each kernel, so a saved model
loads in Keras safe mode without hcd and computes the same function.
"""

from __future__ import annotations

import functools
from typing import Sequence

import keras
from keras import layers
import numpy as np

from hcd.models import common
from hcd.models.batchnorm import FusedBatchNorm

GROUP_ORDER = 8


def _spatial(x, g: int, xp=np):
  """Applies D4 element g to the first two (spatial) axes of an array."""
  if g & 4:
    perm = (1, 0) + tuple(range(2, len(x.shape)))
    x = xp.transpose(x, perm)
  if g & 2:
    x = xp.flip(x, axis=0)
  if g & 1:
    x = xp.flip(x, axis=1)
  return x


@functools.lru_cache(maxsize=1)
def cayley_table() -> tuple[np.ndarray, np.ndarray]:
  """D4's multiplication table and inverses, in `_spatial`'s numbering.

  Returns:
    (mult [8, 8] with _spatial(a, _spatial(b, x)) == _spatial(mult[a, b], x),
     inverse [8] with mult[g, inverse[g]] == identity).
  """
  probe = np.arange(9).reshape(3, 3)  # No symmetry: identifies an element.
  images = [_spatial(probe, g) for g in range(GROUP_ORDER)]
  mult = np.zeros((GROUP_ORDER, GROUP_ORDER), np.int64)
  for a in range(GROUP_ORDER):
    for b in range(GROUP_ORDER):
      composed = _spatial(_spatial(probe, b), a)
      mult[a, b] = next(g for g in range(GROUP_ORDER)
                        if np.array_equal(images[g], composed))
  inverse = np.array([int(np.nonzero(mult[g] == 0)[0][0])
                      for g in range(GROUP_ORDER)])
  return mult, inverse


def expand_kernel(kernel, lifting: bool, xp=np):
  """The 8 orientations of a group-convolution kernel, as one plain kernel.

  Args:
    kernel: [k, k, C_in, F] (lifting: the input is an ordinary image) or
      [k, k, 8, C_in, F] (the input is a P4M feature map, channel h*C_in +
      c).
    lifting: which of the two.
    xp: numpy or keras.ops (the layer calls it with keras.ops).

  Returns:
    [k, k, (8*) C_in, 8*F] with output channel g*F + f the kernel in
    orientation g: spatially transformed by g and, for a group input, with
    its orientation axis permuted by g^-1 (psi_g(h, x) = psi(g^-1 h,
    g^-1 x)).
  """
  mult, inverse = cayley_table()
  shape = kernel.shape
  views = []
  for g in range(GROUP_ORDER):
    k = _spatial(kernel, g, xp)
    if not lifting:
      k = xp.take(k, mult[inverse[g]], axis=2)
      k = xp.reshape(k, (shape[0], shape[1], GROUP_ORDER * shape[3],
                         shape[4]))
    views.append(k)
  stacked = xp.stack(views, axis=-2)  # [k, k, C_in', 8, F]
  s = stacked.shape
  return xp.reshape(stacked, (s[0], s[1], s[2], GROUP_ORDER * s[4]))


@keras.saving.register_keras_serializable(package="hcd")
class P4MConv2D(keras.layers.Layer):
  """Group convolution over D4 (no bias: BatchNormalization follows).

  Input: an image [B, H, W, C] (lifting=True) or a P4M map [B, H, W, C*8].
  Output: a P4M map [B, H', W', filters*8].
  """

  def __init__(self, filters: int, kernel_size: int, strides: int = 1,
               lifting: bool = False, padding: str = "same",
               kernel_initializer="he_normal", **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.kernel_size = int(kernel_size)
    self.strides = int(strides)
    self.lifting = bool(lifting)
    self.padding = padding
    self.kernel_initializer = keras.initializers.get(kernel_initializer)

  def build(self, input_shape):
    channels = int(input_shape[-1])
    k = self.kernel_size
    if self.lifting:
      shape = (k, k, channels, self.filters)
    else:
      if channels % GROUP_ORDER:
        raise ValueError(f"{self.name}: a P4M input has channels = features "
                         f"* 8, got {channels}")
      shape = (k, k, GROUP_ORDER, channels // GROUP_ORDER, self.filters)
    # Keras' fan-in of this shape, k*k*channels, is that of the plain
    # convolution the expanded kernel is, so he_normal scales as for it.
    self.kernel = self.add_weight(name="kernel", shape=shape,
                                  initializer=self.kernel_initializer,
                                  trainable=True)

  def expanded_kernel(self):
    """The plain Conv2D kernel this layer applies ([k, k, C_in', F*8])."""
    return expand_kernel(self.kernel, self.lifting, keras.ops)

  def call(self, inputs):
    kernel = keras.ops.cast(self.expanded_kernel(), inputs.dtype)
    return keras.ops.conv(inputs, kernel, strides=self.strides,
                          padding=self.padding)

  def compute_output_shape(self, input_shape):
    h, w = input_shape[1], input_shape[2]
    if self.padding == "same":
      h = None if h is None else -(-h // self.strides)
      w = None if w is None else -(-w // self.strides)
    else:
      k = self.kernel_size
      h = None if h is None else (h - k) // self.strides + 1
      w = None if w is None else (w - k) // self.strides + 1
    return (input_shape[0], h, w, self.filters * GROUP_ORDER)

  def standard_equivalent(self):
    """(a plain Conv2D computing the same, its weights) for saving."""
    conv = layers.Conv2D(self.filters * GROUP_ORDER, self.kernel_size,
                         strides=self.strides, padding=self.padding,
                         use_bias=False, name=self.name, dtype=self.dtype_policy)
    return conv, [keras.ops.convert_to_numpy(self.expanded_kernel())]

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, kernel_size=self.kernel_size,
                  strides=self.strides, lifting=self.lifting,
                  padding=self.padding,
                  kernel_initializer=keras.initializers.serialize(
                      self.kernel_initializer))
    return config


def _group_bn(x, name: str, zero_gamma: bool = False):
  """BatchNormalization with one set of statistics per feature."""
  h, w, c = x.shape[1], x.shape[2], x.shape[3]
  x = layers.Reshape((h, w, GROUP_ORDER, c // GROUP_ORDER),
                     name=f"{name}_split")(x)
  x = FusedBatchNorm(
      axis=-1, gamma_initializer="zeros" if zero_gamma else "ones",
      name=name)(x)
  return layers.Reshape((h, w, c), name=f"{name}_join")(x)


def _conv_bn(x, filters: int, kernel: int, strides: int, name: str,
             lifting: bool = False, activation: bool = True,
             zero_gamma: bool = False):
  if strides != 1 and kernel % 2:
    kernel += 1  # Even kernels keep strided "same" convolutions symmetric.
  x = P4MConv2D(filters, kernel, strides=strides, lifting=lifting,
                name=f"{name}_conv")(x)
  x = _group_bn(x, f"{name}_bn", zero_gamma)
  if activation:
    x = layers.Activation("relu", name=f"{name}_relu")(x)
  return x


def _basic_block(x, filters: int, strides: int, name: str):
  shortcut = x
  if strides != 1:
    shortcut = layers.AveragePooling2D(strides, name=f"{name}_pool")(shortcut)
  if strides != 1 or x.shape[-1] != filters * GROUP_ORDER:
    shortcut = _conv_bn(shortcut, filters, 1, 1, f"{name}_proj",
                        activation=False)
  y = _conv_bn(x, filters, 3, strides, f"{name}_a")
  y = _conv_bn(y, filters, 3, 1, f"{name}_b", activation=False,
               zero_gamma=True)
  x = layers.Add(name=f"{name}_add")([shortcut, y])
  return layers.Activation("relu", name=f"{name}_out")(x)


def p4m_resnet(widths: Sequence[int] = (8, 16, 32),
               stem_widths: Sequence[int] = (4, 8), blocks_per_stage: int = 1,
               dropout: float = 0.3, crop: int = 0,
               size: int = 0) -> keras.Model:
  """Builds the P4M compact ResNet.

  Args:
    widths: features per orientation of the residual stages (channels are
      8x these); every stage after the first halves the resolution.
    stem_widths: features per orientation of the two stride-2 stem
      convolutions (the first lifts the image to P4M maps).
    blocks_per_stage: residual blocks per stage.
    dropout: dropout rate before the classifier.
    crop: centre crop in px before the stem (0: none; see
      common.input_view). A centre crop commutes with D4, so the network
      stays exactly invariant; keep crop (or size) a multiple of
      2**(1 + number of stages) so every down-sampling sees an even map.
    size: resize to this many px after the crop (0: none).

  Returns:
    keras.Model: uint8 [B, 96, 96, 3] -> float32 probability [B, 1],
    invariant to the 8 rotations/mirrors of its input.

  Raises:
    ValueError: empty widths, blocks_per_stage < 1, bad crop or size.
  """
  inputs, x = common.residual_trunk(
      "p4m_resnet", widths, stem_widths, blocks_per_stage, crop, size,
      stem=lambda x, w, i, name: _conv_bn(x, w, 3, 2, name, lifting=(i == 0)),
      block=_basic_block)
  x = layers.GlobalAveragePooling2D(name="pool")(x)
  # Average each feature over its 8 orientations: invariance.
  x = layers.Reshape((GROUP_ORDER, widths[-1]), name="orientations")(x)
  x = layers.GlobalAveragePooling1D(name="orientation_pool")(x)
  x = layers.Dropout(dropout, name="dropout")(x)
  return keras.Model(inputs, common.probability_head(x), name="p4m_resnet")
