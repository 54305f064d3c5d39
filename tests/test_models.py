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
  names = ["model2", "resnet", "efficientnet_v2_b0", "tiny", "resnet64"]
  built = {**built, "resnet64": models.build_model(
      "resnet", widths=(8, 16), stem_widths=(4, 4), size=64)}
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


def test_resnet_size_resizes_inside_the_model_with_the_same_weights():
  # pcam_cpu.flags' --model_override=size=64: the whole patch, resized by a
  # layer of the model, so validation and saved models see the same view.
  at96 = models.build_model("resnet")
  at64 = models.build_model("resnet", size=64)
  assert at64.count_params() == at96.count_params()
  assert at64.get_layer("resize").output.shape[1:3] == (64, 64)
  assert at64.get_layer("stem1_relu").output.shape[1:3] == (16, 16)
  with pytest.raises(ValueError, match="size must be >= 8"):
    models.build_model("resnet", size=4)
