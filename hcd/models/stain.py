"""Stain normalisation inside the model: every input mapped to one stain.

Slides from other labs differ mostly in their H&E stain. Augmentation
(`augment.random_stain_jitter`) teaches a model to tolerate that;
normalisation removes it before the model sees the image instead. Here it is
a Keras layer inside the model, so an exported `.keras` file carries it and
`hcd_evaluate`/`hcd_predict` need no preprocessing step of their own
(unlike hcd's other layers it has no standard Keras equivalent, so loading
such a `.keras` file outside hcd needs `import hcd.models.stain` first; the
SavedModel export needs nothing):

  model = hcd.models.build_model("resnet", stain_norm="reinhard")

"reinhard" (Reinhard et al. 2001, "Color transfer between images"): each
image is converted to CIE L*a*b*, each channel standardised with the
image's own mean and standard deviation, rescaled to a reference
mean/standard deviation and converted back to RGB. A change of stain that
acts on each L*a*b* channel as a scale and shift, which is what the
Reinhard re-staining of `hcd_evaluate --restain_to` applies, cancels out
(up to uint8 rounding and clipping).

The colour conversions are the sRGB/D65 formulas of scikit-image and
torchstain (`torchstain.numpy.utils.rgb2lab`), written with `tf.where`
instead of boolean-mask scatters so that they compile with XLA and keep
static shapes; tests compare them with torchstain's.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from hcd.models import STAIN_NORMS

# sRGB (linear) -> CIE XYZ, D65 white point: as skimage/torchstain.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE = np.array([0.95047, 1.0, 1.08883])
# The reference L*a*b* statistics: the mean over 2,000 PCam train patches
# (../shared/data/pcam96_jpeg/train, a seeded random sample) of each patch's
# own per-channel mean and standard deviation. Any fixed values would make
# the model stain-invariant; typical ones keep its input looking like H&E.
REFERENCE_MEAN = (61.77, 22.76, -14.06)
REFERENCE_STD = (19.12, 7.35, 5.15)
# A flat (one-colour) channel has std 0: keep it flat instead of dividing
# by zero.
_MIN_STD = 1e-3


def rgb_to_lab(rgb):
  """sRGB in [0, 1] -> CIE L*a*b* (L in [0, 100]); float32 [..., 3]."""
  rgb = tf.cast(rgb, tf.float32)
  linear = tf.where(rgb > 0.04045, tf.pow((rgb + 0.055) / 1.055, 2.4),
                    rgb / 12.92)
  xyz = tf.tensordot(linear, tf.constant(_XYZ_FROM_RGB.T / _WHITE, tf.float32),
                     axes=1)
  # cbrt of a negative would be NaN; those values take the linear branch.
  f = tf.where(xyz > 0.008856, tf.pow(tf.maximum(xyz, 0.008856), 1.0 / 3.0),
               7.787 * xyz + 16.0 / 116.0)
  fx, fy, fz = tf.unstack(f, axis=-1)
  return tf.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)],
                  axis=-1)


def lab_to_rgb(lab):
  """CIE L*a*b* -> sRGB, clipped to [0, 1]; float32 [..., 3]."""
  lab = tf.cast(lab, tf.float32)
  l, a, b = tf.unstack(lab, axis=-1)
  fy = (l + 16.0) / 116.0
  f = tf.stack([a / 500.0 + fy, fy, fy - b / 200.0], axis=-1)
  xyz = tf.where(f > 0.2068966, tf.pow(f, 3.0), (f - 16.0 / 116.0) / 7.787)
  linear = tf.tensordot(xyz, tf.constant((_RGB_FROM_XYZ * _WHITE).T,
                                         tf.float32), axes=1)
  linear = tf.clip_by_value(linear, 0.0, 1.0)
  rgb = tf.where(linear > 0.0031308,
                 1.055 * tf.pow(tf.maximum(linear, 0.0031308), 1.0 / 2.4)
                 - 0.055, linear * 12.92)
  return tf.clip_by_value(rgb, 0.0, 1.0)


def reinhard_normalize(rgb, mean=REFERENCE_MEAN, std=REFERENCE_STD):
  """Maps each image's L*a*b* mean/std to the reference (Reinhard).

  Args:
    rgb: float [B, H, W, 3] sRGB in [0, 1].
    mean, std: the reference L*a*b* statistics.

  Returns:
    float32 [B, H, W, 3] sRGB in [0, 1].
  """
  lab = rgb_to_lab(rgb)
  own_mean, own_var = tf.nn.moments(lab, axes=[1, 2], keepdims=True)
  own_std = tf.sqrt(own_var)
  scale = tf.where(own_std > _MIN_STD, tf.constant(std, tf.float32) /
                   tf.maximum(own_std, _MIN_STD), 1.0)
  lab = (lab - own_mean) * scale + tf.constant(mean, tf.float32)
  return lab_to_rgb(lab)


def check_stain_norm(method: str) -> str:
  """Returns `method` if known.

  Raises:
    ValueError: an unknown method, listing the known ones.
  """
  if method not in STAIN_NORMS:
    raise ValueError(f"unknown stain_norm {method!r}; known: "
                     f"{', '.join(STAIN_NORMS)}")
  return method


@keras.saving.register_keras_serializable(package="hcd")
class StainNormalization(keras.layers.Layer):
  """Float RGB in [0, 1] -> the same images in the reference stain.

  Always float32 inside (L*a*b* in bf16 would lose ~2 units of L); the next
  layer casts to its own compute dtype. Same in training and inference.
  """

  def __init__(self, method: str = "reinhard", **kwargs):
    kwargs.setdefault("dtype", "float32")
    super().__init__(**kwargs)
    self.method = check_stain_norm(method)

  def call(self, images):
    if self.method == "none":
      return images
    return reinhard_normalize(images)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(method=self.method)
    return config
