"""Tests for the model table hcd.models: counts, ends, precision, saving."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import hcd.models as models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

# The notebook's printed model summaries.
NOTEBOOK_COUNTS = {"model1": 8_868_929, "model2": 2_212_925,
                   "model3": 2_212_925}
# Architectures without a reference count: a range that catches a missing
# or doubled stage but not a tweak of one layer.
COUNT_RANGES = {"resnet": (1_000_000, 1_500_000),
                "p4m_resnet": (150_000, 250_000),  # Exact: test_p4m.py.
                "efficientnet_v2_b0": (5_500_000, 6_500_000),
                "tiny": (500, 10_000)}


def _images(n=2, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3),
                                              dtype=np.uint8)


@pytest.fixture(scope="module")
def built():
  """Every model of the table, built once per module (model1 is 35 MB)."""
  keras.backend.clear_session()
  return {name: models.build_model(name) for name in models.model_names()}


def test_table_holds_the_required_names():
  names = models.model_names()
  for name in ("model1", "model2", "model3", "resnet", "tiny"):
    assert name in names
  assert set(names) == set(COUNT_RANGES) | set(NOTEBOOK_COUNTS)


@pytest.mark.parametrize("name", sorted(NOTEBOOK_COUNTS))
def test_notebook_parameter_counts_are_exact(built, name):
  assert built[name].count_params() == NOTEBOOK_COUNTS[name]


@pytest.mark.parametrize("name", sorted(COUNT_RANGES))
def test_other_parameter_counts_in_range(built, name):
  low, high = COUNT_RANGES[name]
  assert low <= built[name].count_params() <= high


def test_default_learning_rates():
  assert models.default_learning_rate("model1") == 1e-3
  assert models.default_learning_rate("model2") == 1e-3
  assert models.default_learning_rate("model3") == 1e-4
  for name in models.model_names():
    assert 0 < models.default_learning_rate(name) < 1


@pytest.mark.parametrize("call", [models.build_model,
                                  models.default_learning_rate,
                                  models.get_spec])
def test_unknown_name_lists_known_names(call):
  with pytest.raises(ValueError) as e:
    call("model9")
  msg = str(e.value)
  assert "model9" in msg
  for name in models.model_names():
    assert name in msg


def test_unknown_override_lists_accepted_ones():
  with pytest.raises(ValueError, match=r"widths.*dropout|dropout.*widths"):
    models.build_model("resnet", depth=50)
  m = models.build_model("tiny", width=4)
  assert m.count_params() < models.build_model("tiny").count_params()


def test_applications_weights_validated_before_download():
  with pytest.raises(ValueError, match="imagenet"):
    models.build_model("efficientnet_v2_b0", weights="/no/such/file.h5")


def test_import_does_not_import_tensorflow():
  code = ("import sys, hcd.models as m; m.model_names(); "
          "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV,
                       check=True, capture_output=True, text=True).stdout
  assert out.split() == ["False", "False"]


@pytest.mark.parametrize("name", models.model_names())
def test_uint8_in_float32_probability_out(built, name):
  model = built[name]
  assert model.inputs[0].dtype == "uint8"
  assert tuple(model.inputs[0].shape) == (None, 96, 96, 3)
  first = [l for l in model.layers
           if not isinstance(l, keras.layers.InputLayer)]
  assert isinstance(first[0], keras.layers.Rescaling)
  assert first[0].scale == pytest.approx(1 / 255)
  y = np.asarray(model(_images(3), training=False))
  assert y.shape == (3, 1)
  assert y.dtype == np.float32
  assert np.all((y >= 0) & (y <= 1)) and np.all(np.isfinite(y))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_float32_output(policy):
  old = keras.config.dtype_policy()
  keras.config.set_dtype_policy(policy)
  try:
    model = models.build_model("resnet")
    computes = {l.compute_dtype for l in model.layers
                if isinstance(l, keras.layers.Conv2D)}
    y = model(_images(), training=True)
  finally:
    keras.config.set_dtype_policy(old)
  assert computes == {policy.split("_")[1]}  # the policy really applied
  assert y.dtype == "float32"
  assert np.all(np.isfinite(np.asarray(y)))


def test_saved_models_load_in_safe_mode_without_hcd(built, tmp_path):
  # model1 uses no layer type that model2 lacks; skip its 35 MB file.
  names = ["model2", "resnet", "efficientnet_v2_b0", "tiny", "fovea"]
  built = {**built, "fovea": models.build_model(
      "resnet", widths=(8, 16), stem_widths=(4, 4), fovea=48)}
  x = _images(4, seed=1)
  np.save(tmp_path / "x.npy", x)
  expected = {}
  for name in names:
    # hcd saves every model through standard_model (hcd.train.artifacts).
    models.standard_model(built[name]).save(tmp_path / f"{name}.keras")
    expected[name] = np.asarray(built[name](x, training=False))
  # `sys.modules["hcd"] = None` makes any import of hcd fail, so loading
  # can only succeed if the files need nothing but standard Keras layers.
  script = textwrap.dedent(f"""
      import json, sys
      sys.modules["hcd"] = None
      import keras, numpy as np
      x = np.load("x.npy")
      out = {{}}
      for name in {names!r}:
        m = keras.saving.load_model(name + ".keras", safe_mode=True)
        np.save(name + ".out.npy", np.asarray(m(x, training=False)))
        out[name] = m.count_params()
      print(json.dumps(out))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=ENV,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  counts = json.loads(proc.stdout.strip().splitlines()[-1])
  for name in names:
    assert counts[name] == built[name].count_params()
    np.testing.assert_allclose(np.load(tmp_path / f"{name}.out.npy"),
                               expected[name], rtol=1e-5, atol=1e-6)


def test_python_m_hcd_models_prints_every_model(built):
  proc = subprocess.run([sys.executable, "-m", "hcd.models"], cwd=REPO,
                        env=ENV, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [l.split() for l in proc.stdout.splitlines() if l.strip()]
  assert len(rows) == len(models.model_names()), proc.stdout
  lines = {r[0]: r for r in rows}
  for name in models.model_names():
    assert name in lines, proc.stdout
    count, lr = lines[name][1], lines[name][2]
    assert count == f"{built[name].count_params():,}"
    assert float(lr) == models.default_learning_rate(name)
  assert lines["model1"][1] == "8,868,929"


def test_foveated_resnet_is_two_trunks_and_one_head():
  # Each stream holds a whole trunk; the head sees both pooled vectors, so
  # the count is 2 x (trunk) + (2 x 256 + 1) = 2 x (one-stream model) - 1.
  one = models.build_model("resnet").count_params()
  two = models.build_model("resnet", fovea=48)
  assert two.count_params() == 2 * one - 1
  y = np.asarray(two(_images(2), training=False))
  assert y.shape == (2, 1) and y.dtype == np.float32


def test_foveated_streams_see_the_centre_and_the_whole_patch():
  model = models.build_model("resnet", widths=(8, 16), stem_widths=(4, 4),
                             fovea=48)
  pools = keras.Model(model.input, [model.get_layer("fovea_pool").output,
                                     model.get_layer("context_pool").output])
  x = _images(2, seed=3)
  outside = x.copy()
  outside[:, :20] = 255 - outside[:, :20]  # rows 0-19: outside the centre 48
  centre = x.copy()
  centre[:, 40:56, 40:56] = 255 - centre[:, 40:56, 40:56]
  f0, c0 = (np.asarray(t) for t in pools(x, training=False))
  f1, c1 = (np.asarray(t) for t in pools(outside, training=False))
  f2, c2 = (np.asarray(t) for t in pools(centre, training=False))
  np.testing.assert_array_equal(f0, f1)  # the fovea never sees the ring
  assert not np.allclose(c0, c1)        # the context does
  assert not np.allclose(f0, f2) and not np.allclose(c0, c2)


@pytest.mark.parametrize("overrides,match", [
    (dict(fovea=48, size=64), "excludes crop and size"),
    (dict(fovea=48, crop=80), "excludes crop and size"),
    (dict(fovea=96), r"fovea must be in 8\.\.95"),
    (dict(fovea=4), r"fovea must be in 8\.\.95"),
])
def test_foveated_resnet_refuses_bad_settings(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.build_model("resnet", **overrides)


def test_stride3_stem_reaches_the_64px_grid_with_the_same_weights():
  # stem_strides=(3, 2) takes 96 px to 16 px, where the 64-px input enters
  # the stages, with the same convolutions (so the same parameter count).
  at64 = models.build_model("resnet", size=64)
  s3 = models.build_model("resnet", stem_strides=(3, 2))
  assert s3.count_params() == at64.count_params()
  for model in (at64, s3):
    assert model.get_layer("stem1_relu").output.shape[1:3] == (16, 16)
  assert s3.get_layer("stem0_conv").strides == (3, 3)
  y = np.asarray(s3(_images(2), training=False))
  assert y.shape == (2, 1) and np.all(np.isfinite(y))


def test_stride3_stem_sees_every_pixel_once():
  # 3x3 kernels at stride 3 tile the 96 px exactly: changing one pixel
  # changes exactly one output position of the first stem convolution.
  model = models.build_model("resnet", widths=(8,), stem_widths=(4, 4),
                             stem_strides=(3, 2))
  stem0 = keras.Model(model.input, model.get_layer("stem0_conv").output)
  x = _images(1, seed=5)
  for row, col in [(0, 0), (47, 50), (95, 95)]:
    y = x.copy()
    y[0, row, col] = 255 - y[0, row, col]
    diff = np.abs(np.asarray(stem0(y)) - np.asarray(stem0(x))).sum(axis=-1)
    changed = np.argwhere(diff[0] > 0)
    assert changed.tolist() == [[row // 3, col // 3]]


@pytest.mark.parametrize("overrides", [
    dict(stem_strides=(3,)), dict(stem_strides=(5, 2)),
    dict(stem_strides=(0, 2)), dict(stem_strides=(2.0, 2)),
])
def test_stem_strides_refuses_bad_settings(overrides):
  with pytest.raises(ValueError, match="stem_strides must hold one stride"):
    models.build_model("resnet", **overrides)


def test_centre_pool_adds_the_centre_cells_features_to_the_head():
  # The head sees [global mean, centre mean] of the last map: one more
  # weight per channel of the last stage, nothing else.
  plain = models.build_model("resnet", size=64)
  model = models.build_model("resnet", size=64, centre_pool=True)
  assert model.count_params() == plain.count_params() + 256
  last = model.get_layer("pool_centre_crop").input
  probe = keras.Model(model.input, [last, model.get_layer("pool").output])
  fmap, pooled = (np.asarray(t) for t in probe(_images(2), training=False))
  assert fmap.shape[1:3] == (4, 4) and pooled.shape == (2, 512)
  np.testing.assert_allclose(pooled[:, :256], fmap.mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pooled[:, 256:],
                             fmap[:, 1:3, 1:3].mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid,cells", [(3, 1), (4, 2), (6, 2), (8, 4),
                                        (9, 3)])
def test_centre_cells_cover_the_centre_third_and_stay_centred(grid, cells):
  from hcd.models import common  # pylint: disable=g-import-not-at-top
  x = keras.Input((grid, grid, 2))
  model = keras.Model(x, common.centre_and_global_pool(x))
  fmap = np.arange(grid * grid * 2, dtype=np.float32).reshape(
      1, grid, grid, 2)
  centre = np.asarray(model(fmap))[0, 2:]
  lo = (grid - cells) // 2
  np.testing.assert_allclose(
      centre, fmap[0, lo:lo + cells, lo:lo + cells].mean(axis=(0, 1)))
  assert cells * 3 >= grid and (grid - cells) % 2 == 0


def test_centre_pool_refuses_the_foveated_resnet():
  with pytest.raises(ValueError, match="centre_pool applies to the single"):
    models.build_model("resnet", fovea=48, centre_pool=True)
