"""Tests for the P4M (D4-equivariant) compact ResNet, hcd.models.p4m."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import hcd.models as models
from hcd.models import augment
from hcd.models import p4m

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n=4, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3),
                                              dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
  keras.utils.set_random_seed(3)
  return models.build_model("p4m_resnet")


def test_cayley_table_is_the_group_of_d4_transform():
  mult, inverse = p4m.cayley_table()
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
  for a in range(8):
    assert mult[a, inverse[a]] == 0 and mult[inverse[a], a] == 0
    for b in range(8):
      # Composition in the table is composition of the image transforms
      # that augmentation and TTA use.
      twice = augment.d4_transform(augment.d4_transform(image, b), a)
      np.testing.assert_array_equal(
          twice.numpy(), augment.d4_transform(image, int(mult[a, b])).numpy())
  assert sorted(mult[3]) == list(range(8))  # A Latin square row.


@pytest.mark.parametrize("lifting", [True, False])
def test_group_conv_is_equivariant(lifting):
  """Rotating the input rotates the maps and permutes their orientations."""
  keras.utils.set_random_seed(0)
  c_in = 3 if lifting else 2 * 8
  layer = p4m.P4MConv2D(4, 3, lifting=lifting)
  x = np.random.default_rng(1).normal(size=(2, 9, 9, c_in)).astype("f4")
  y = layer(x).numpy().reshape(2, 9, 9, 8, 4)
  mult, inverse = p4m.cayley_table()
  for g0 in range(8):
    xg = augment.d4_transform(x, g0).numpy()
    if not lifting:  # A group input's orientations permute too.
      xg = xg.reshape(2, 9, 9, 8, 2)[:, :, :, [mult[inverse[g0], h]
                                               for h in range(8)]]
      xg = xg.reshape(2, 9, 9, 16)
    yg = layer(xg).numpy().reshape(2, 9, 9, 8, 4)
    expected = augment.d4_transform(
        y[:, :, :, [mult[inverse[g0], g] for g in range(8)]].reshape(
            2, 9, 9, 32), g0).numpy().reshape(2, 9, 9, 8, 4)
    np.testing.assert_allclose(yg, expected, rtol=1e-4, atol=1e-4)


def test_parameter_count_and_compute_match_the_resnet(model):
  assert model.count_params() == 193_425
  plain = models.build_model("resnet")
  # Same channel counts stage by stage: the P4M net has the resnet's
  # activations (and ~its compute) at ~1/8 of its weights.
  assert model.get_layer("pool").output.shape[-1] == plain.get_layer(
      "pool").output.shape[-1] == 256
  assert model.count_params() < plain.count_params() / 6


def test_exactly_invariant_to_the_eight_transforms(model):
  x = _images()
  p = model.predict_on_batch(x)[:, 0]
  assert np.ptp(p) > 0  # Not trivially constant.
  for k in range(8):
    pk = model.predict_on_batch(augment.d4_transform(x, k).numpy())[:, 0]
    np.testing.assert_allclose(pk, p, rtol=0, atol=1e-6)


def test_centre_crop_keeps_the_invariance():
  keras.utils.set_random_seed(4)
  m = models.build_model("p4m_resnet", crop=64, widths=(2, 4, 4),
                         stem_widths=(2, 2))
  assert m.get_layer("centre_crop").output.shape[1:3] == (64, 64)
  x = _images(3, seed=2)
  p = m.predict_on_batch(x)[:, 0]
  for k in (3, 6):
    np.testing.assert_allclose(
        m.predict_on_batch(augment.d4_transform(x, k).numpy())[:, 0], p,
        rtol=0, atol=1e-6)


def test_a_plain_cnn_is_not_invariant():
  """The invariance test above can fail: the compact ResNet is not."""
  keras.utils.set_random_seed(3)
  plain = models.build_model("resnet")
  # Untrained BN-identity blocks give near-equal outputs; spread them out.
  x = _images()
  p = plain.predict_on_batch(x)[:, 0]
  pk = plain.predict_on_batch(augment.d4_transform(x, 5).numpy())[:, 0]
  assert np.abs(pk - p).max() > 1e-6


def test_saved_model_is_standard_layers_and_same_function(model, tmp_path):
  from hcd.train import artifacts  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "p4m.keras")
  artifacts.save_keras_model(model, path)
  x = _images(3, seed=5)
  np.save(tmp_path / "x.npy", x)
  np.save(tmp_path / "p.npy", model.predict_on_batch(x))
  # A fresh interpreter without hcd on the path: safe mode, standard layers.
  script = textwrap.dedent(f"""
      import numpy as np, keras
      m = keras.saving.load_model({path!r}, safe_mode=True)
      kinds = {{type(l).__name__ for l in m.layers}}
      assert "P4MConv2D" not in kinds and "Conv2D" in kinds, kinds
      x = np.load({str(tmp_path / 'x.npy')!r})
      np.testing.assert_allclose(m.predict_on_batch(x),
                                 np.load({str(tmp_path / 'p.npy')!r}),
                                 rtol=1e-5, atol=1e-6)
      print("ok")
  """)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("PYTHONPATH", None)
  proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_trains_under_tf_function_and_mixed_precision():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    m = models.build_model("p4m_resnet", widths=(2, 4), stem_widths=(2, 2))
    opt = keras.optimizers.Adam(1e-2)
    x = tf.constant(_images(8))
    y = tf.constant((np.arange(8) % 2)[:, None], tf.float32)

    @tf.function
    def step():
      with tf.GradientTape() as tape:
        loss = keras.ops.mean(keras.ops.binary_crossentropy(
            y, m(x, training=True)))
      grads = tape.gradient(loss, m.trainable_variables)
      opt.apply_gradients(zip(grads, m.trainable_variables))
      return loss

    losses = [float(step()) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert m.predict_on_batch(_images(2)).dtype == np.float32
  finally:
    keras.mixed_precision.set_global_policy("float32")


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="at least one stage"):
    models.build_model("p4m_resnet", widths=())
  with pytest.raises(ValueError, match="features"):
    p4m.P4MConv2D(4, 3)(np.zeros((1, 8, 8, 5), "f4"))
