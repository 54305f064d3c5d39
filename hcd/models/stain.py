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

"macenko" (Macenko et al. 2009, torchstain's `MacenkoNormalizer.normalize`
per image): each image's H&E stain vectors are estimated from its own
tissue pixels (the extreme angles, 1st and 99th percentile, in the plane of
the two main axes of their optical density), every pixel is unmixed into
H and E concentrations, these are scaled so that their 99th percentiles
match a reference, and mixed again with reference stain vectors. A change
of stain that is a linear map of optical density within the stain plane,
which is what the Macenko re-staining of `hcd_evaluate --restain_to`
applies, maps extreme angles to extreme angles and so cancels out too. An
image with too few stained pixels to estimate (near-white or near-black
background) passes unchanged.

Each method is blind to its own family of stain changes by construction,
so `hcd_evaluate --restain_to` scores a model on both families: the other
one is the real test.

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

# Macenko: light intensity, optical density threshold of tissue and the
# percentile of the extreme angles, as torchstain's defaults.
_IO = 240.0
_BETA = 0.15
_ALPHA = 1.0
# The reference stain: the median over 500 PCam train patches (the sample
# above) of each patch's own Macenko estimate, columns H and E (RGB rows),
# and of each stain's 99th percentile concentration.
REFERENCE_HE = ((0.5351, 0.3106), (0.6955, 0.8933), (0.5026, 0.3278))
REFERENCE_MAX_C = (1.9595, 2.3236)
# An image needs this share of its pixels to be stained tissue (optical
# density >= beta in every channel) for an estimate; else it passes as is.
_MIN_TISSUE = 0.01


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


def _masked_percentile_from_top(values, mask, share):
  """Per row, numpy's (linear) percentile 100 * (1 - share) of masked values.

  Only the top `share` of each row is needed, so `top_k` replaces a sort.

  Args:
    values: float32 [B, N].
    mask: bool [B, N], the values that count (at least 2 per row for a
      meaningful result; rows with fewer are the caller's to discard).
    share: in [0, 1).

  Returns:
    float32 [B].
  """
  n_all = values.shape[-1]
  k = min(n_all, int(share * (n_all - 1)) + 2)
  top = tf.math.top_k(tf.where(mask, values, -np.inf), k=k).values
  count = tf.reduce_sum(tf.cast(mask, tf.float32), axis=-1)
  # numpy: position p * (n - 1) from the bottom, i.e. r = share * (n - 1)
  # from the top, interpolated between the neighbours.
  r = share * tf.maximum(count - 1.0, 0.0)
  lo = tf.floor(r)
  hi = tf.minimum(tf.math.ceil(r), k - 1.0)
  t_lo = tf.gather(top, tf.cast(lo, tf.int32), batch_dims=1)
  t_hi = tf.gather(top, tf.cast(hi, tf.int32), batch_dims=1)
  return t_hi + (hi - r) * (t_lo - t_hi)


def _stain_vectors(od, mask):
  """Each image's H and E vectors (Macenko), and whether they are usable.

  Args:
    od: float32 [B, N, 3] optical density.
    mask: bool [B, N], the tissue pixels.

  Returns:
    (float32 [B, 3, 2] columns H and E, bool [B] estimate usable).
  """
  m = tf.cast(mask, tf.float32)[..., None]
  count = tf.reduce_sum(m, axis=1, keepdims=True)
  mean = tf.reduce_sum(od * m, axis=1, keepdims=True) / tf.maximum(count, 1.0)
  centred = (od - mean) * m
  cov = tf.einsum("bni,bnj->bij", centred, centred) / tf.maximum(
      count - 1.0, 1.0)
  _, vecs = tf.linalg.eigh(cov)
  plane = vecs[:, :, 1:3]
  # Eigenvector signs are arbitrary: point both axes along the tissue's
  # mean optical density so that the angles stay clear of atan2's cut at
  # +-pi (a flipped minor axis only mirrors the angles; same vectors).
  side = tf.einsum("bni,bij->bnj", mean, plane)
  plane = plane * tf.where(side >= 0.0, 1.0, -1.0)
  t = tf.einsum("bni,bij->bnj", od, plane)
  phi = tf.atan2(t[..., 1], t[..., 0])
  share = _ALPHA / 100.0
  phi_max = _masked_percentile_from_top(phi, mask, share)
  phi_min = -_masked_percentile_from_top(-phi, mask, share)

  def direction(angle):
    return tf.einsum("bij,bj->bi", plane,
                     tf.stack([tf.cos(angle), tf.sin(angle)], axis=-1))

  v_min, v_max = direction(phi_min), direction(phi_max)
  # torchstain's rule: haematoxylin is the vector with more red OD.
  h_first = (v_min[:, 0] > v_max[:, 0])[:, None, None]
  he = tf.where(h_first, tf.stack([v_min, v_max], -1),
                tf.stack([v_max, v_min], -1))
  usable = count[:, 0, 0] >= max(2.0, _MIN_TISSUE * od.shape[1])
  return he, usable


def macenko_normalize(rgb, he_ref=REFERENCE_HE, max_c_ref=REFERENCE_MAX_C):
  """Maps each image's H&E stain to the reference (Macenko, per image).

  Args:
    rgb: float [B, H, W, 3] sRGB in [0, 1], H and W static.
    he_ref: reference stain vectors, RGB rows by (H, E) columns.
    max_c_ref: reference 99th percentile concentrations of H and E.

  Returns:
    float32 [B, H, W, 3] in [0, 1]; images without enough tissue for an
    estimate unchanged.
  """
  rgb = tf.cast(rgb, tf.float32)
  shape = tf.shape(rgb)
  n = rgb.shape[1] * rgb.shape[2]
  od = tf.reshape(-tf.math.log((rgb * 255.0 + 1.0) / _IO), [shape[0], n, 3])
  he, usable = _stain_vectors(od, tf.reduce_all(od >= _BETA, axis=-1))
  # Least squares unmixing, C = (HE^T HE)^-1 HE^T OD, in closed form for a
  # 2x2 Gram matrix (a near-singular one marks the estimate unusable).
  gram = tf.einsum("bik,bil->bkl", he, he)
  det = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
  safe_det = tf.where(tf.abs(det) > 1e-6, det, 1.0)
  inv = tf.stack([tf.stack([gram[:, 1, 1], -gram[:, 0, 1]], -1),
                  tf.stack([-gram[:, 1, 0], gram[:, 0, 0]], -1)],
                 1) / safe_det[:, None, None]
  conc = tf.einsum("bkl,bil,bni->bnk", inv, he, od)
  every = tf.ones_like(conc[..., 0], tf.bool)
  max_c = tf.stack([_masked_percentile_from_top(conc[..., j], every, 0.01)
                    for j in range(2)], -1)
  usable &= (tf.abs(det) > 1e-6) & tf.reduce_all(max_c > 1e-3, -1)
  scale = tf.constant(max_c_ref, tf.float32) / tf.where(max_c > 1e-3, max_c,
                                                          1.0)
  he_ref = tf.constant(he_ref, tf.float32)
  he_ref /= tf.norm(he_ref, axis=0, keepdims=True)
  out_od = tf.einsum("bnk,ik->bni", conc * scale[:, None, :], he_ref)
  out = tf.minimum(_IO * tf.exp(-out_od), 255.0) / 255.0
  usable &= tf.reduce_all(tf.math.is_finite(out), axis=[1, 2])
  return tf.where(usable[:, None, None, None], tf.reshape(out, shape), rgb)


_NORMALIZERS = {"reinhard": reinhard_normalize, "macenko": macenko_normalize}


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
    return _NORMALIZERS[self.method](images)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(method=self.method)
    return config
