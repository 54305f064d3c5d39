"""Augmentation on the accelerator: D4 symmetries and H&E stain/colour jitter.

The augmenter runs inside the (XLA-compiled) training step on uint8 batches,
never in tf.data and never inside a saved model:

  augmenter = build_augmenter(stain_jitter=0.05, color_jitter=0.1, seed=1)
  images = augmenter(images, training=True)   # uint8 [B,96,96,3] -> uint8
  logits = model(images, training=True)

Geometry. Tissue has no orientation, so every image gets a random element of
the dihedral group D4 (4 rotations x optional mirror). Element k is
"transpose?, then flip rows?, then flip columns?" (`d4_transform`, also used
for test-time augmentation), so a per-image random choice is three selects
between whole-batch flipped/transposed copies. Flips, transposes and selects
have XLA kernels on every device (and fuse into one pass), whereas
arbitrary-angle `RandomRotation` has no XLA kernel on GPU.

Colour. Slides differ mostly in staining. `stain_jitter` perturbs each
image in haematoxylin-eosin-DAB (HED) optical-density space (Ruifrok &
Johnston colour deconvolution; Tellez et al. 2018, "H&E stain augmentation"):
every stain channel s becomes s * U(1-sigma, 1+sigma) + U(-sigma, sigma).
`color_jitter` adds mild brightness, contrast and saturation changes, each
a factor U(1-s, 1+s). Both compute in float32 and round, clip and cast back
to uint8, so the model sees the same dtype with or without them.

Randomness. Each call draws one seed from a keras `SeedGenerator` (a
variable, so it works in `tf.function(jit_compile=True)`, is checkpointed
with the layer, and advances every step) and derives all random numbers
from it with stateless ops. Under a tf.distribute strategy the seed is
folded with the replica id, so replicas augment differently.
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
import tensorflow as tf

d4_count = 8

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in RGB
# optical density, as in skimage.color.rgb_from_hed.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                          [0.07, 0.99, 0.11],
                          [0.27, 0.57, 0.78]], dtype=np.float64)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# Optical density is -log((p + 1) / 256) / log(256): 0 for white, 1 for
# black, and finite everywhere (the +1 avoids log(0) on black pixels).
_LOG256 = math.log(256.0)
# Rec. 601 luma weights, used for the saturation jitter's grey image.
_LUMA = (0.299, 0.587, 0.114)


def _d4_parts(k: int) -> tuple[bool, bool, bool]:
  """Returns (transpose, flip_rows, flip_cols) of D4 element k = 4t + 2r + c."""
  return bool(k & 4), bool(k & 2), bool(k & 1)


def d4_transform(images, k: int):
  """Applies the k-th element of the dihedral group D4 (deterministic).

  Element k = 4*t + 2*r + c means: transpose height and width if t, then
  reverse the rows (vertical flip) if r, then reverse the columns
  (horizontal flip) if c. k = 0 is the identity; the 8 values enumerate the
  4 rotations and 4 reflections of a square image, so averaging a model's
  predictions over k = 0..7 is 8x test-time augmentation.

  Args:
    images: an image [H, W, C] or a batch [B, H, W, C] with H == W (tensor
      or numpy array, any dtype).
    k: python int in 0..7.

  Returns:
    A tensor of the same shape and dtype.

  Raises:
    ValueError: k outside 0..7, rank not 3 or 4, or a transposing k on a
      non-square image.
  """
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
      0 <= k < d4_count):
    raise ValueError(f"D4 element k must be an int in 0..7, got {k!r}")
  images = tf.convert_to_tensor(images)
  rank = images.shape.rank
  if rank not in (3, 4):
    raise ValueError(f"d4_transform needs [H,W,C] or [B,H,W,C], got shape "
                     f"{images.shape}")
  h_axis, w_axis = rank - 3, rank - 2
  transpose, flip_rows, flip_cols = _d4_parts(int(k))
  if transpose:
    _check_square(images)
    perm = list(range(rank))
    perm[h_axis], perm[w_axis] = w_axis, h_axis
    images = tf.transpose(images, perm)
  if flip_rows:
    images = tf.reverse(images, [h_axis])
  if flip_cols:
    images = tf.reverse(images, [w_axis])
  return images


def _check_square(images) -> None:
  h, w = images.shape[-3], images.shape[-2]
  if h is not None and w is not None and h != w:
    raise ValueError(f"rotations by 90 degrees need square images, got "
                     f"{h}x{w}")


def _split_seed(seed, n: int):
  """Returns n independent stateless seeds [2] derived from `seed`."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def random_d4(images, seed, flips: bool = True, rot90: bool = True):
  """Applies a random D4 element to every image of a batch independently.

  Args:
    images: [B, H, W, C] batch (any dtype), H == W if rot90.
    seed: stateless seed, int tensor [2].
    flips: draw mirror images; alone (rot90=False) this gives the
      notebook's random horizontal and vertical flips.
    rot90: draw 90-degree rotations; alone (flips=False) this gives the 4
      rotations without mirroring.

  Returns:
    The batch with the same shape and dtype; every image is
    d4_transform(image, k) for a k drawn uniformly from the chosen subgroup.

  Raises:
    ValueError: not a rank-4 batch, or rot90 on non-square images.
  """
  if not flips and not rot90:
    return images
  images = tf.convert_to_tensor(images)
  if images.shape.rank != 4:
    raise ValueError(f"random_d4 needs a batch [B,H,W,C], got shape "
                     f"{images.shape}")
  if rot90:
    _check_square(images)
  batch = tf.shape(images)[0]
  bits = tf.random.stateless_uniform([3, batch], seed, minval=0, maxval=2,
                                     dtype=tf.int32)
  t, r, c = bits[0], bits[1], bits[2]
  if flips and not rot90:
    t = tf.zeros_like(t)  # {id, flip rows, flip cols, rot180}
  elif rot90 and not flips:
    # Rotations are exactly the elements with c == t xor r (rot90 =
    # transpose + flip rows, rot270 = transpose + flip cols, rot180 = both
    # flips); any other choice would be a mirror.
    c = tf.bitwise.bitwise_xor(t, r)

  def select(bit, transformed, x):
    # Select with a [B] condition picks whole images; it is 3-5x faster on
    # CPU than where() with a broadcast [B,1,1,1] condition, same under XLA.
    return tf.raw_ops.Select(condition=bit > 0, x=transformed, y=x)

  x = images
  if rot90:
    x = select(t, tf.transpose(x, [0, 2, 1, 3]), x)
  x = select(r, tf.reverse(x, [1]), x)
  x = select(c, tf.reverse(x, [2]), x)
  return x


def _uniform(seed, batch, low, high):
  return tf.random.stateless_uniform([batch, 1, 1, 1], seed, minval=low,
                                     maxval=high, dtype=tf.float32)


def random_stain_jitter(x, seed, sigma: float):
  """Perturbs the H, E and DAB stain amounts of each image (float in [0,1]).

  Args:
    x: float32 [B, H, W, 3] RGB in [0, 1].
    seed: stateless seed, int tensor [2].
    sigma: strength; per image and stain, scale ~ U(1-sigma, 1+sigma) and
      shift ~ U(-sigma, sigma) in optical-density units.

  Returns:
    float32 [B, H, W, 3] RGB, not yet clipped.
  """
  batch = tf.shape(x)[0]
  s_alpha, s_beta = _split_seed(seed, 2)
  alpha = tf.random.stateless_uniform([batch, 1, 3], s_alpha,
                                      minval=1.0 - sigma, maxval=1.0 + sigma)
  beta = tf.random.stateless_uniform([batch, 1, 3], s_beta, minval=-sigma,
                                     maxval=sigma)
  hed_from_rgb = tf.constant(_HED_FROM_RGB, tf.float32)
  rgb_from_hed = tf.constant(_RGB_FROM_HED, tf.float32)
  # OD' = ((OD @ hed_from_rgb) * alpha + beta) @ rgb_from_hed is one affine
  # map per image: fold it into a [B,3,3] matrix and a [B,1,3] bias so the
  # per-pixel work is a single batched matmul.
  matrix = tf.einsum("ij,bj,jk->bik", hed_from_rgb, alpha[:, 0],
                     rgb_from_hed)
  bias = tf.einsum("bij,jk->bik", beta, rgb_from_hed)
  shape = tf.shape(x)
  pixels = tf.reshape(x, [batch, -1, 3])
  od = -tf.math.log((pixels * 255.0 + 1.0) / 256.0) / _LOG256
  od = tf.matmul(od, matrix) + bias
  pixels = (tf.exp(-od * _LOG256) * 256.0 - 1.0) / 255.0
  return tf.reshape(pixels, shape)


def random_color_jitter(x, seed, strength: float):
  """Mild brightness, contrast and saturation jitter (float in [0,1]).

  Args:
    x: float32 [B, H, W, 3] RGB in [0, 1].
    seed: stateless seed, int tensor [2].
    strength: s; each of brightness (multiplicative), contrast (around the
      image mean) and saturation (around the grey image) gets a per-image
      factor U(1-s, 1+s).

  Returns:
    float32 [B, H, W, 3], not yet clipped.
  """
  batch = tf.shape(x)[0]
  s_b, s_c, s_s = _split_seed(seed, 3)
  lo, hi = 1.0 - strength, 1.0 + strength
  x = x * _uniform(s_b, batch, lo, hi)
  mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
  x = (x - mean) * _uniform(s_c, batch, lo, hi) + mean
  grey = tf.reduce_sum(x * tf.constant(_LUMA, tf.float32), axis=-1,
                       keepdims=True)
  return (x - grey) * _uniform(s_s, batch, lo, hi) + grey


def random_hue_jitter(x, seed, delta: float):
  """Rotates each image's hue by U(-delta, delta) of a turn (HSV space).

  Args:
    x: float32 [B, H, W, 3] RGB, clipped to [0, 1] here first (HSV needs it).
    seed: stateless seed, int tensor [2].
    delta: the largest shift, as a fraction of the hue circle.

  Returns:
    float32 [B, H, W, 3] RGB in [0, 1].
  """
  batch = tf.shape(x)[0]
  shift = _uniform(seed, batch, -delta, delta)[..., 0]
  hsv = tf.image.rgb_to_hsv(tf.clip_by_value(x, 0.0, 1.0))
  hue = tf.math.floormod(hsv[..., 0] + shift, 1.0)
  return tf.image.hsv_to_rgb(tf.stack([hue, hsv[..., 1], hsv[..., 2]], -1))


def augment_batch(images, seed, flips: bool = True, rot90: bool = True,
                  color_jitter: float = 0.0, stain_jitter: float = 0.0,
                  hue_jitter: float = 0.0):
  """Pure function behind the augmenter: same seed, same output.

  Args:
    images: uint8 [B, H, W, 3] (any dtype if no colour/stain jitter).
    seed: stateless seed, int tensor [2].
    flips, rot90: geometric augmentation, see random_d4.
    color_jitter: strength of random_color_jitter; 0 disables it.
    stain_jitter: sigma of random_stain_jitter; 0 disables it.
    hue_jitter: largest hue shift of random_hue_jitter; 0 disables it.

  Returns:
    Augmented images, same shape and dtype.

  Raises:
    ValueError: colour/stain jitter on non-uint8 images, or a bad rank.
  """
  images = tf.convert_to_tensor(images)
  s_geo, s_stain, s_color = _split_seed(seed, 3)
  x = random_d4(images, s_geo, flips=flips, rot90=rot90)
  if color_jitter > 0 or stain_jitter > 0 or hue_jitter > 0:
    if x.dtype != tf.uint8 or x.shape[-1] != 3:
      raise ValueError("colour and stain jitter need uint8 RGB images "
                       f"[B,H,W,3], got {x.dtype.name} {x.shape}")
    y = tf.cast(x, tf.float32) / 255.0
    if stain_jitter > 0:
      y = random_stain_jitter(y, s_stain, stain_jitter)
    if color_jitter > 0:
      y = random_color_jitter(y, s_color, color_jitter)
    if hue_jitter > 0:
      # Folded from the colour seed: older runs' streams stay the same.
      y = random_hue_jitter(
          y, tf.random.experimental.stateless_fold_in(s_color, 1), hue_jitter)
    x = tf.cast(tf.clip_by_value(tf.round(y * 255.0), 0.0, 255.0), tf.uint8)
  return x


_BETA_GRID = 4096


@functools.lru_cache(maxsize=8)
def _beta_quantiles(alpha: float) -> np.ndarray:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return stats.beta.ppf(np.linspace(0.0, 1.0, _BETA_GRID + 1), alpha,
                        alpha).astype(np.float32)


def _beta(seed, n, alpha: float):
  """n draws of Beta(alpha, alpha) by inverse-CDF interpolation.

  The gamma sampler has no XLA kernel, so the quantile function is
  tabulated once (scipy, 4097 points) and a stateless uniform is mapped
  through it: gathers and a lerp, which compile anywhere.
  """
  table = tf.constant(_beta_quantiles(float(alpha)))
  u = tf.random.stateless_uniform([n], seed, 0.0, float(_BETA_GRID))
  i = tf.minimum(tf.cast(tf.floor(u), tf.int32), _BETA_GRID - 1)
  frac = u - tf.cast(i, tf.float32)
  lo, hi = tf.gather(table, i), tf.gather(table, i + 1)
  return lo + (hi - lo) * frac


def mixup(images, labels, seed, alpha: float = 0.2):
  """Mixes every image with its partner in the reversed batch (mixup).

  image = lam * a + (1 - lam) * b (rounded back to uint8), target =
  lam * y_a + (1 - lam) * y_b, lam ~ Beta(alpha, alpha) per image.

  Args:
    images: uint8 [B, H, W, C].
    labels: float32 [B] in [0, 1].
    seed: stateless seed, int tensor [2].
    alpha: Beta parameter (small: mostly one image dominates).

  Returns:
    (images uint8 [B, H, W, C], targets float32 [B]).
  """
  images = tf.convert_to_tensor(images)
  labels = tf.cast(labels, tf.float32)
  other, other_labels = tf.reverse(images, [0]), tf.reverse(labels, [0])
  # The first of two split seeds (the second drew CutMix's box before
  # CutMix was removed), so a seed gives the same mixup draws as before.
  s_lam, _ = _split_seed(seed, 2)
  lam = _beta(s_lam, tf.shape(images)[0], alpha)
  w = lam[:, None, None, None]
  mixed = (tf.cast(images, tf.float32) * w +
           tf.cast(other, tf.float32) * (1.0 - w))
  out = tf.cast(tf.clip_by_value(tf.round(mixed), 0.0, 255.0), images.dtype)
  return out, lam * labels + (1.0 - lam) * other_labels


# The allowed range of each jitter strength, defined once: the Augmenter
# checks its arguments against it, and hcd.train.config.TrainConfig.validate
# checks the hcd_train flags of the same names (before any data is read).
# (low, high, whether high itself is allowed). Colour and stain factors are
# U(1-s, 1+s), so s >= 1 could zero or flip a channel; a hue shift of half a
# turn already reaches every hue.
JITTER_RANGES = {
    "color_jitter": (0.0, 1.0, False),
    "stain_jitter": (0.0, 1.0, False),
    "hue_jitter": (0.0, 0.5, True),
}


def check_augment_args(**strengths: float) -> None:
  """Checks jitter strengths against JITTER_RANGES.

  Pure Python (no TensorFlow op), so a config can be checked before a model
  or any data exists.

  Args:
    **strengths: name=value for any of color_jitter, stain_jitter,
      hue_jitter (the hcd_train flags of the same names).

  Raises:
    ValueError: an unknown name, or a value outside its range (NaN
      included); the message names the argument, the range and the value.
  """
  for name, value in strengths.items():
    if name not in JITTER_RANGES:
      raise ValueError(f"unknown augmentation argument {name!r}; known: "
                       f"{', '.join(JITTER_RANGES)}")
    low, high, closed = JITTER_RANGES[name]
    try:
      v = float(value)
    except (TypeError, ValueError):
      v = math.nan
    # Written so that NaN fails every comparison and is refused.
    ok = low <= v <= high if closed else low <= v < high
    if not ok:
      raise ValueError(f"{name} must be in [{low:g}, {high:g}"
                       f"{']' if closed else ')'}, got {value!r}")


@keras.saving.register_keras_serializable(package="hcd")
class Augmenter(keras.layers.Layer):
  """Random D4 + stain/colour jitter; identity unless training=True.

  Not part of any saved model (the trainer calls it before the model), but
  serializable so that a user may still put it in a Sequential.
  """

  def __init__(self, flips: bool = True, rot90: bool = True,
               color_jitter: float = 0.0, stain_jitter: float = 0.0,
               seed: int | None = None, hue_jitter: float = 0.0, **kwargs):
    # Integer images in, integer images out: never autocast to the
    # mixed-precision compute dtype.
    kwargs.setdefault("autocast", False)
    super().__init__(**kwargs)
    check_augment_args(color_jitter=color_jitter, stain_jitter=stain_jitter,
                       hue_jitter=hue_jitter)
    self.flips = bool(flips)
    self.rot90 = bool(rot90)
    self.color_jitter = float(color_jitter)
    self.stain_jitter = float(stain_jitter)
    self.hue_jitter = float(hue_jitter)
    self.seed = seed
    self.seed_generator = keras.random.SeedGenerator(seed)
    self.supports_masking = False

  def _trackable_children(self, save_type="checkpoint", **kwargs):
    # tf.train.Checkpoint does not look inside a SeedGenerator; listing its
    # state makes a resumed run continue the random stream, not restart it.
    children = super()._trackable_children(save_type, **kwargs)
    children["seed_state"] = self.seed_generator.state
    return children

  @property
  def is_identity(self) -> bool:
    return not (self.flips or self.rot90 or self.color_jitter > 0 or
                self.stain_jitter > 0 or self.hue_jitter > 0)

  def call(self, images, training=None):
    if not training or self.is_identity:
      return images
    seed = tf.cast(self.seed_generator.next(), tf.int64)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      # Replicas share the generator's state; without this every replica
      # would apply the same transforms to its slice of the batch.
      seed = tf.random.experimental.stateless_fold_in(
          seed, tf.cast(ctx.replica_id_in_sync_group, tf.int64))
    return augment_batch(images, seed, flips=self.flips, rot90=self.rot90,
                         color_jitter=self.color_jitter,
                         stain_jitter=self.stain_jitter,
                         hue_jitter=self.hue_jitter)

  def compute_output_shape(self, input_shape):
    return input_shape

  def compute_output_spec(self, inputs, training=None):
    return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

  def get_config(self):
    config = super().get_config()
    config.update(flips=self.flips, rot90=self.rot90,
                  color_jitter=self.color_jitter,
                  stain_jitter=self.stain_jitter, seed=self.seed,
                  hue_jitter=self.hue_jitter)
    return config


def build_augmenter(flips: bool = True, rot90: bool = True,
                    color_jitter: float = 0.0, stain_jitter: float = 0.0,
                    seed: int | None = None,
                    hue_jitter: float = 0.0) -> Augmenter:
  """Builds the training-time augmenter.

  Call it as `augmenter(images, training=True)` inside the training step
  (XLA-compilable; create it inside `strategy.scope()` like the model so its
  seed variable is mirrored). With training=False it returns its input.

  Args:
    flips: random horizontal and vertical flips.
    rot90: random 90-degree rotations (with flips: the full group D4).
    color_jitter: brightness/contrast/saturation strength in [0, 1); 0 is
      off, ~0.1 is mild.
    stain_jitter: H&E stain perturbation sigma in [0, 1); 0 is off, ~0.05
      is the "HED-light" setting.
    seed: int for reproducible augmentation, None for a random seed.
    hue_jitter: largest HSV hue shift in [0, 0.5] of a turn; 0 is off.

  Returns:
    A keras layer mapping uint8 [B, H, W, 3] to uint8 [B, H, W, 3].

  Raises:
    ValueError: a jitter strength outside its range.
  """
  return Augmenter(flips=flips, rot90=rot90, color_jitter=color_jitter,
                   stain_jitter=stain_jitter, seed=seed, hue_jitter=hue_jitter,
                   name="augmenter")
