"""Tests for hcd.models.augment: D4 geometry, stain/colour jitter, seeds."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from hcd.models import augment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3),
                                              dtype=np.uint8)


def _numpy_d4(image):
  """The 8 symmetries of a square, built independently with numpy."""
  out = []
  for flip in (False, True):
    base = np.fliplr(image) if flip else image
    out.extend(np.rot90(base, r) for r in range(4))
  return out


def _which_k(original, transformed):
  """The k in 0..7 with d4_transform(original, k) == transformed, or None."""
  for k in range(augment.d4_count):
    if np.array_equal(augment.d4_transform(original, k).numpy(),
                      transformed):
      return k
  return None


def _ks(originals, outputs):
  return [_which_k(o, t) for o, t in zip(originals, np.asarray(outputs))]


def test_d4_transform_enumerates_the_dihedral_group():
  image = _images(1)[0]
  ours = [augment.d4_transform(image, k).numpy() for k in range(8)]
  assert augment.d4_count == 8
  np.testing.assert_array_equal(ours[0], image)
  for a in range(8):
    for b in range(a):
      assert not np.array_equal(ours[a], ours[b]), (a, b)
  # Same 8 images as numpy's rotations and mirrors, in some order.
  reference = _numpy_d4(image)
  for k, img in enumerate(ours):
    assert any(np.array_equal(img, r) for r in reference), k


def test_d4_transform_batch_matches_per_image_and_validates_k():
  batch = _images(3)
  for k in range(8):
    out = augment.d4_transform(batch, k).numpy()
    for i in range(3):
      np.testing.assert_array_equal(
          out[i], augment.d4_transform(batch[i], k).numpy())
  for bad in (-1, 8, 1.0, True, "1"):
    with pytest.raises(ValueError, match="0..7"):
      augment.d4_transform(batch, bad)
  with pytest.raises(ValueError, match="square"):
    augment.d4_transform(np.zeros((2, 4, 6, 3), np.uint8), 4)


def _check_d4_batch(x, y):
  """Each output is an exact pixel permutation and one of the 8 transforms."""
  y = np.asarray(y)
  assert y.dtype == np.uint8 and y.shape == x.shape
  for i in range(len(x)):
    a = np.sort(x[i].reshape(-1, 3).view("V3"), axis=0)
    b = np.sort(y[i].reshape(-1, 3).view("V3"), axis=0)
    assert np.array_equal(a, b), f"image {i} is not a permutation"
  ks = _ks(x, y)
  assert None not in ks, ks
  return ks


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_random_d4_outputs_are_d4_transforms(jit):
  aug = augment.build_augmenter(seed=7)
  fn = (tf.function(lambda x: aug(x, training=True), jit_compile=True)
        if jit else (lambda x: aug(x, training=True)))
  x = _images(16)
  ks1 = _check_d4_batch(x, fn(x))
  ks2 = _check_d4_batch(x, fn(x))
  assert len(set(ks1)) >= 3, ks1          # varies across images
  assert ks1 != ks2                       # and across calls


def test_all_eight_elements_are_drawn():
  aug = augment.build_augmenter(seed=3)
  x = np.repeat(_images(1), 64, axis=0)
  ks = _check_d4_batch(x, aug(x, training=True))
  assert set(ks) == set(range(8))


def test_flips_only_and_rot90_only_subgroups():
  x = np.repeat(_images(1), 64, axis=0)
  image = x[0]
  mirror_flips = [image, image[::-1], image[:, ::-1], image[::-1, ::-1]]
  rotations = [np.rot90(image, r) for r in range(4)]
  for kwargs, allowed in ((dict(flips=True, rot90=False), mirror_flips),
                          (dict(flips=False, rot90=True), rotations)):
    y = np.asarray(augment.build_augmenter(seed=5, **kwargs)(x,
                                                             training=True))
    seen = set()
    for img in y:
      matches = [j for j, a in enumerate(allowed) if np.array_equal(img, a)]
      assert matches, kwargs
      seen.add(matches[0])
    assert seen == {0, 1, 2, 3}, kwargs


def test_identity_without_training_and_when_all_off():
  x = _images(4)
  aug = augment.build_augmenter(stain_jitter=0.1, color_jitter=0.2, seed=1)
  for training in (False, None):
    np.testing.assert_array_equal(np.asarray(aug(x, training=training)), x)
  off = augment.build_augmenter(flips=False, rot90=False)
  np.testing.assert_array_equal(np.asarray(off(x, training=True)), x)


def test_same_seed_reproduces_different_seed_differs():
  x = _images(16)
  a = augment.build_augmenter(seed=11, stain_jitter=0.05)
  b = augment.build_augmenter(seed=11, stain_jitter=0.05)
  c = augment.build_augmenter(seed=12, stain_jitter=0.05)
  ya, yb, yc = (np.asarray(m(x, training=True)) for m in (a, b, c))
  np.testing.assert_array_equal(ya, yb)
  assert not np.array_equal(ya, yc)


def test_colour_and_stain_jitter_off_by_default():
  aug = augment.build_augmenter()
  assert aug.color_jitter == 0 and aug.stain_jitter == 0
  x = _images(8)
  _check_d4_batch(x, aug(x, training=True))  # exact permutations: no colour


@pytest.mark.parametrize("kwargs", [dict(stain_jitter=0.05),
                                    dict(color_jitter=0.1),
                                    dict(stain_jitter=0.05, color_jitter=0.1)])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_colour_jitter_changes_pixels_mildly(kwargs, jit):
  aug = augment.build_augmenter(flips=False, rot90=False, seed=2, **kwargs)
  fn = (tf.function(lambda x: aug(x, training=True), jit_compile=True)
        if jit else (lambda x: aug(x, training=True)))
  x = _images(8)
  y = np.asarray(fn(x))
  assert y.dtype == np.uint8 and y.shape == x.shape
  diff = np.abs(y.astype(int) - x.astype(int)).mean(axis=(1, 2, 3))
  assert np.all(diff > 0.5), diff          # every image changed
  assert np.all(diff < 40), diff           # but mildly
  assert len(set(np.round(diff, 3))) > 1   # by a different amount each


def test_stain_jitter_zero_sigma_round_trips_exactly():
  x = _images(2)
  y = augment.random_stain_jitter(tf.cast(x, tf.float32) / 255.0,
                                  tf.constant([1, 2], tf.int64), 0.0)
  y = np.round(np.asarray(y) * 255.0)
  np.testing.assert_array_equal(y, x)


def test_stain_jitter_acts_in_stain_space():
  # Pixels that differ only in their amount of haematoxylin: an HED jitter
  # maps the H amount affinely (same scale and shift for every pixel of the
  # image) and gives every pixel the same eosin and DAB shift, which an
  # RGB-space jitter would not.
  rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11],
                           [0.27, 0.57, 0.78]])
  h = np.array([0.2, 0.5, 0.8])
  od = h[:, None] * rgb_from_hed[0]
  rgb = (np.exp(-od * np.log(256.0)) * 256.0 - 1.0) / 255.0
  x = tf.constant(rgb[None, None], tf.float32)  # [1, 1, 3, 3]
  y = np.asarray(augment.random_stain_jitter(
      x, tf.constant([3, 4], tf.int64), 0.3), np.float64)[0, 0]
  od_y = -np.log((y * 255.0 + 1.0) / 256.0) / np.log(256.0)
  stains = od_y @ np.linalg.inv(rgb_from_hed)
  assert not np.allclose(stains[:, 0], h, atol=1e-2)  # H amount changed
  slopes = np.diff(stains[:, 0]) / np.diff(h)
  assert abs(slopes[0] - slopes[1]) < 1e-3, slopes  # affine in H
  assert 0.7 - 1e-3 <= slopes[0] <= 1.3 + 1e-3
  np.testing.assert_allclose(stains[:, 1:], stains[:1, 1:].repeat(3, 0),
                             atol=1e-3)  # E, D: one shift for all pixels
  assert np.all(np.abs(stains[0, 1:]) <= 0.3 + 1e-3)


def test_colour_jitter_clips_instead_of_wrapping():
  white = np.full((32, 96, 96, 3), 255, np.uint8)
  black = np.zeros_like(white)
  aug = augment.build_augmenter(color_jitter=0.1, seed=0)
  w = np.asarray(aug(white, training=True))
  b = np.asarray(aug(black, training=True))
  assert w.min() >= 229 and w.max() == 255  # brightened copies clip at 255
  assert b.max() == 0


def test_bad_arguments_raise():
  for bad in (-0.1, 1.0, 2):
    with pytest.raises(ValueError, match="stain_jitter"):
      augment.build_augmenter(stain_jitter=bad)
    with pytest.raises(ValueError, match="color_jitter"):
      augment.build_augmenter(color_jitter=bad)
  aug = augment.build_augmenter(color_jitter=0.1)
  with pytest.raises(ValueError, match="uint8"):
    aug(np.zeros((1, 96, 96, 3), np.float32), training=True)


def test_mixed_precision_policy_keeps_uint8():
  old = keras.config.dtype_policy()
  keras.config.set_dtype_policy("mixed_bfloat16")
  try:
    aug = augment.build_augmenter(stain_jitter=0.05, seed=4)
    x = _images(4)
    y = aug(x, training=True)
    geo = augment.build_augmenter(seed=4)(x, training=True)
  finally:
    keras.config.set_dtype_policy(old)
  assert y.dtype == tf.uint8
  _check_d4_batch(x, geo)


def test_seed_state_is_a_checkpointable_variable(tmp_path):
  aug = augment.build_augmenter(seed=9)
  x = _images(8)
  aug(x, training=True)
  ckpt = tf.train.Checkpoint(augmenter=aug)
  path = ckpt.write(str(tmp_path / "ckpt"))
  expected = np.asarray(aug(x, training=True))
  restored = augment.build_augmenter(seed=9)
  tf.train.Checkpoint(augmenter=restored).read(path).assert_consumed()
  np.testing.assert_array_equal(np.asarray(restored(x, training=True)),
                                expected)


def test_works_inside_tf_data_map():
  aug = augment.build_augmenter(seed=6, stain_jitter=0.05)
  geo = augment.build_augmenter(seed=6)
  x = _images(8)
  ds = tf.data.Dataset.from_tensor_slices(x).batch(4)
  colour = [b.numpy() for b in ds.map(lambda b: aug(b, training=True))]
  shapes = [b.numpy() for b in ds.map(lambda b: geo(b, training=True))]
  assert [b.shape for b in colour] == [(4, 96, 96, 3)] * 2
  assert all(b.dtype == np.uint8 for b in colour)
  _check_d4_batch(x, np.concatenate(shapes))


def test_replicas_draw_different_transforms_under_mirrored_strategy():
  # Needs 2 logical CPUs, which must be configured before TF starts: run in
  # a fresh interpreter. The jit-compiled per-replica step is how hcd_train
  # calls the augmenter.
  script = textwrap.dedent("""
      import json
      import numpy as np, tensorflow as tf
      cpu = tf.config.list_physical_devices("CPU")[0]
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
      from hcd.models import augment
      strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
      with strategy.scope():
        aug = augment.build_augmenter(seed=3, stain_jitter=0.05)
        geo = augment.build_augmenter(seed=3)
      step = tf.function(lambda x: (geo(x, training=True),
                                    aug(x, training=True)), jit_compile=True)
      def replica_fn(x):
        with tf.device(x.device):
          return step(x)
      run = tf.function(lambda x: strategy.run(replica_fn, args=(x,)))
      image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), np.uint8)
      batch = np.stack([image] * 16)
      dist = next(iter(strategy.experimental_distribute_dataset(
          tf.data.Dataset.from_tensors(batch))))
      def ks(out):
        return [[next((k for k in range(8) if np.array_equal(
            augment.d4_transform(image, k).numpy(), img)), None)
                 for img in r.numpy()]
                for r in strategy.experimental_local_results(out)]
      calls = [run(dist) for _ in range(2)]
      print(json.dumps({
          "ks": [ks(g) for g, _ in calls],
          "colour_dtype": [r.dtype.name for r in
                           strategy.experimental_local_results(calls[0][1])],
      }))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  (call1_r0, call1_r1), (call2_r0, call2_r1) = out["ks"]
  for ks in (call1_r0, call1_r1, call2_r0, call2_r1):
    assert len(ks) == 8 and None not in ks, out
  assert call1_r0 != call1_r1  # replicas differ
  assert call1_r0 != call2_r0  # steps differ
  assert out["colour_dtype"] == ["uint8", "uint8"]


def test_stateless_call_is_a_pure_function_of_the_seed_state():
  # hcd_train passes step-derived seed states through Keras' stateless_call
  # inside its jit-compiled step.
  aug = augment.build_augmenter(seed=1, stain_jitter=0.05)
  aug.build((None, 96, 96, 3))
  before = [v.numpy().copy() for v in aug.non_trainable_variables]
  x = _images(8)
  fn = tf.function(
      lambda state, x: aug.stateless_call([], state, x, training=True),
      jit_compile=True)
  out1, new1 = fn([tf.constant([1, 5], tf.int64)], x)
  out2, _ = fn([tf.constant([1, 6], tf.int64)], x)
  out3, _ = fn([tf.constant([1, 5], tf.int64)], x)
  np.testing.assert_array_equal(out1, out3)
  assert not np.array_equal(out1, out2)
  assert not np.array_equal(np.asarray(new1[0]), [1, 5])  # state advanced
  for v, b in zip(aug.non_trainable_variables, before):
    np.testing.assert_array_equal(v.numpy(), b)  # the layer is untouched


# --- hue jitter and batch mixing (mixup) -------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_hue_jitter_rotates_hue_keeps_value(jit):
  x = _images(8, seed=3)
  fn = tf.function(lambda im, s: augment.augment_batch(
      im, s, flips=False, rot90=False, hue_jitter=0.2), jit_compile=jit)
  out = fn(x, tf.constant([1, 2], tf.int64)).numpy()
  assert out.dtype == np.uint8 and out.shape == x.shape
  hsv_in = tf.image.rgb_to_hsv(x / 255.0).numpy()
  hsv_out = tf.image.rgb_to_hsv(out / 255.0).numpy()
  # The value (max channel) survives up to rounding; hue moves per image.
  assert np.abs(hsv_out[..., 2] - hsv_in[..., 2]).max() <= 1.5 / 255
  shift = (hsv_out[..., 0] - hsv_in[..., 0]) % 1.0
  saturated = hsv_in[..., 1] > 0.5
  per_image = [np.median(np.minimum(s[m], 1 - s[m]))
               for s, m in zip(shift, saturated)]
  assert max(per_image) > 0.01 and max(per_image) <= 0.2 + 0.02


def test_hue_jitter_zero_is_off_and_range_checked():
  x = _images(2)
  same = augment.augment_batch(x, tf.constant([1, 2], tf.int64), flips=False,
                               rot90=False, hue_jitter=0.0)
  np.testing.assert_array_equal(same.numpy(), x)
  with pytest.raises(ValueError, match="hue_jitter"):
    augment.build_augmenter(hue_jitter=0.7)


@pytest.mark.parametrize("jit", [False, True])
def test_mixup_blends_images_and_labels_alike(jit):
  x = _images(6, seed=1)
  y = np.array([1, 0, 0, 1, 1, 0], np.float32)
  fn = tf.function(lambda im, lab, s: augment.mixup(im, lab, s, 0.4),
                   jit_compile=jit)
  out, target = (t.numpy() for t in fn(x, y, tf.constant([3, 4], tf.int64)))
  assert out.dtype == np.uint8 and out.shape == x.shape
  partner, partner_y = x[::-1].astype(float), y[::-1]
  # Recover each image's weight from its target, check the pixels follow.
  for i in range(6):
    if y[i] == partner_y[i]:
      assert target[i] == y[i]
      continue
    lam = (target[i] - partner_y[i]) / (y[i] - partner_y[i])
    assert 0.0 <= lam <= 1.0
    expected = lam * x[i] + (1 - lam) * partner[i]
    assert np.abs(out[i] - expected).max() <= 1.0
  again = fn(x, y, tf.constant([3, 4], tf.int64))[0].numpy()
  np.testing.assert_array_equal(out, again)  # Stateless: same seed, same mix.


def test_beta_draws_have_the_beta_moments():
  lam = augment._beta(tf.constant([5, 6], tf.int64), 20000, 0.4).numpy()  # pylint: disable=protected-access
  assert lam.min() >= 0.0 and lam.max() <= 1.0
  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
  assert abs(lam.mean() - 0.5) < 0.01
  assert abs(lam.var() - 1 / (4 * (2 * 0.4 + 1))) < 0.005
