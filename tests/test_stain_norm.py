"""Tests of the in-model stain normalisation (hcd.models.stain)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from torchstain.numpy.utils.lab2rgb import lab2rgb as ts_lab2rgb
from torchstain.numpy.utils.rgb2lab import rgb2lab as ts_rgb2lab

from hcd import models
from hcd.models import stain


def _images(n=4, seed=0):
  rng = np.random.default_rng(seed)
  # H&E-like: pinks and purples on a light background, plus noise.
  base = rng.uniform([120, 40, 110], [240, 200, 230], size=(n, 1, 1, 3))
  noise = rng.normal(0, 25, size=(n, 96, 96, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_lab_matches_torchstain_both_ways():
  rgb = _images().astype(np.float32) / 255.0
  ours = stain.rgb_to_lab(rgb).numpy()
  # torchstain returns OpenCV's 8-bit scaling of L*a*b*.
  theirs = ts_rgb2lab(rgb.copy())
  theirs[..., 0] /= 2.55
  theirs[..., 1:] -= 128.0
  np.testing.assert_allclose(ours, theirs, atol=2e-3)
  back = stain.lab_to_rgb(ours).numpy()
  np.testing.assert_allclose(back, rgb, atol=2e-4)
  scaled = ours.astype(np.float64)
  scaled[..., 0] *= 2.55
  scaled[..., 1:] += 128.0
  np.testing.assert_allclose(back, np.clip(ts_lab2rgb(scaled), 0, 1),
                             atol=1e-3)


def test_reinhard_output_has_reference_statistics():
  out = stain.reinhard_normalize(_images().astype(np.float32) / 255.0)
  lab = stain.rgb_to_lab(out).numpy().reshape(4, -1, 3)
  # Clipping to the RGB gamut moves them a little.
  np.testing.assert_allclose(lab.mean(1), np.tile(stain.REFERENCE_MEAN,
                                                  (4, 1)), atol=1.0)
  np.testing.assert_allclose(lab.std(1), np.tile(stain.REFERENCE_STD, (4, 1)),
                             rtol=0.1)


def test_reinhard_undoes_a_per_channel_lab_shift():
  """A Reinhard-style re-staining (scale+shift per L*a*b* channel) cancels."""
  x = _images(seed=1).astype(np.float32) / 255.0
  lab = stain.rgb_to_lab(x)
  shifted = stain.lab_to_rgb(lab * [0.9, 1.2, 0.9] + [3.0, -6.0, 5.0])
  a = stain.reinhard_normalize(x).numpy()
  b = stain.reinhard_normalize(shifted).numpy()
  change = np.abs(x - shifted.numpy()).mean()
  # What is left is where the shifted colours fell outside the sRGB gamut.
  assert change > 0.03 and np.abs(a - b).mean() < 0.2 * change


def test_flat_image_stays_finite():
  flat = np.full((2, 96, 96, 3), 0.5, np.float32)
  out = stain.reinhard_normalize(flat).numpy()
  assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_compiles_with_xla():
  fn = tf.function(stain.reinhard_normalize, jit_compile=True)
  x = _images().astype(np.float32) / 255.0
  np.testing.assert_allclose(fn(x).numpy(), stain.reinhard_normalize(x),
                             atol=1e-5)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_model_option_saves_and_reloads(tmp_path, method):
  plain = models.build_model("tiny")
  model = models.build_model("tiny", stain_norm=method)
  assert model.get_layer("stain_norm").method == method
  # A layer with no weights: the parameter count is unchanged.
  assert models.count_params(model) == models.count_params(plain)
  x = _images()
  path = os.path.join(tmp_path, "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  np.testing.assert_allclose(loaded.predict(x, verbose=0),
                             model.predict(x, verbose=0), atol=1e-6)
  if method != "reinhard":
    return
  # Inside the model the input is normalised: a Reinhard shift of the input
  # barely moves the output, while the plain model moves.
  shifted = np.clip(np.round(stain.lab_to_rgb(
      stain.rgb_to_lab(x / 255.0) * [0.9, 1.2, 0.9] + [3.0, -6.0, 5.0]
  ).numpy() * 255), 0, 255).astype(np.uint8)
  feats = keras.Model(model.input, model.get_layer("stain_norm").output)
  d = np.abs(feats.predict(x, verbose=0) - feats.predict(shifted, verbose=0))
  assert d.mean() < 0.2 * np.abs(x / 255.0 - shifted / 255.0).mean()


def test_unknown_method_lists_known():
  with pytest.raises(ValueError, match="reinhard"):
    models.build_model("tiny", stain_norm="vahadane")
  with pytest.raises(ValueError, match="reinhard"):
    models.build_model("resnet", stain_norm="macenk0")


def test_train_config_stain_norm_reaches_the_saved_model(tmp_path):
  """--stain_norm: checked up front, built into the model, saved with it."""
  import test_pipeline  # pylint: disable=g-import-not-at-top
  from hcd import rundir  # pylint: disable=g-import-not-at-top
  from hcd.eval import predict  # pylint: disable=g-import-not-at-top
  from hcd.train import loop  # pylint: disable=g-import-not-at-top
  from hcd.train.config import ConfigError  # pylint: disable=g-import-not-at-top
  from hcd.train.config import TrainConfig  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="reinhard"):
    TrainConfig(model="tiny", stain_norm="vahadane").validate()
  plain = TrainConfig(model="tiny", model_overrides={"width": 4})
  assert plain.model_kwargs == {"width": 4}
  shards, _ = test_pipeline.write(tmp_path / "data", n=64, block_size=32)
  config = TrainConfig(model="tiny", model_overrides={"width": 4},
                       stain_norm="reinhard", shards_dir=shards,
                       workdir=str(tmp_path / "run"), batch_size=16,
                       epochs=1, steps_per_epoch=2, jit_compile="false",
                       tensorboard=False, seed=1)
  assert config.model_kwargs == {"width": 4, "stain_norm": "reinhard"}
  loop.train_and_evaluate(config,
                          strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
  model = predict.load_model(rundir.model_file(str(tmp_path / "run")))
  assert model.get_layer("stain_norm").method == "reinhard"


# Macenko: images made of exactly two stains, so the estimate is defined.
_HE_A = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
_HE_B = np.array([[0.45, 0.30], [0.75, 0.90], [0.48, 0.31]])


def _two_stain_images(he, scale=(1.0, 1.0), n=3, seed=0):
  """Float RGB images whose optical density is he @ concentrations.

  Every pixel is dark enough to count as tissue for both stain matrices,
  and each image holds nearly pure H and pure E pixels (defined extremes).
  """
  rng = np.random.default_rng(seed)
  c = rng.gamma(2.0, 0.3, size=(n, 96 * 96, 2)) + 1.0
  c[:, :300, 1] = 0.05
  c[:, 300:600, 0] = 0.05
  od = (c * scale) @ np.asarray(he).T
  rgb = (240.0 * np.exp(-od) - 1.0) / 255.0
  return rgb.reshape(n, 96, 96, 3).astype(np.float32)


def test_macenko_matches_torchstain_per_image():
  import torchstain  # pylint: disable=g-import-not-at-top
  images = np.round(_two_stain_images(_HE_A, n=2) * 255).astype(np.uint8)
  ours = stain.macenko_normalize(images / 255.0).numpy() * 255
  for img, mine in zip(images, ours):
    ref = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ref.HERef = np.array(stain.REFERENCE_HE) / np.linalg.norm(
        stain.REFERENCE_HE, axis=0)
    ref.maxCRef = np.array(stain.REFERENCE_MAX_C)
    theirs, _, _ = ref.normalize(img, Io=240, alpha=1, beta=0.15,
                                 stains=False)
    # torchstain truncates to uint8; ours stays float.
    d = mine - theirs.astype(np.float32)
    assert np.abs(img.astype(np.float32) - mine).mean() > 5
    assert d.min() >= -1e-2 and d.max() <= 1.0 + 1e-2


def test_macenko_undoes_a_change_of_stain_vectors():
  """Re-mixed with other stain vectors and concentrations: the same output."""
  a = _two_stain_images(_HE_A)
  b = _two_stain_images(_HE_B, scale=(1.3, 0.7))
  na = stain.macenko_normalize(a).numpy()
  nb = stain.macenko_normalize(b).numpy()
  assert np.abs(a - b).mean() > 0.02
  np.testing.assert_allclose(na, nb, atol=2e-3)
  # And the output is in the reference stain, unlike either input.
  assert np.abs(na - a).mean() > 0.01


def test_macenko_leaves_blank_images_and_compiles_with_xla():
  blank = np.full((1, 96, 96, 3), 0.97, np.float32)
  dark = np.zeros((1, 96, 96, 3), np.float32)
  x = np.concatenate([blank, dark, _two_stain_images(_HE_A, n=1)])
  eager = stain.macenko_normalize(x).numpy()
  np.testing.assert_array_equal(eager[:1], blank)
  assert np.isfinite(eager).all() and eager.min() >= 0 and eager.max() <= 1
  compiled = tf.function(stain.macenko_normalize, jit_compile=True)(x)
  np.testing.assert_allclose(compiled.numpy(), eager, atol=1e-4)
