"""A model saved by an earlier stack still loads and predicts the same.

tests/fixtures/tiny_tf217.keras was written by hcd on TensorFlow 2.17.1 /
Keras 3.15.1 (tests/fixtures/README); the npz holds its probabilities there.
"""

import importlib.util
import json
import os

import keras
import numpy as np
import pytest

from hcd import rundir
from hcd.eval import predict

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "fixtures")
_SPEC = importlib.util.spec_from_file_location(
    "make_tiny_legacy", os.path.join(FIXTURES, "make_tiny_legacy.py"))
make_fixture = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(make_fixture)
TAGS = ("tf217",)
REEXPORT = ("re-export it: load it with the stack that saved it (meta in the "
            "npz) and save it again with hcd.train.artifacts.save_keras_model, "
            "or rerun tests/fixtures/make_tiny_legacy.py (tests/fixtures/README)")


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


@pytest.mark.parametrize("tag", TAGS)
def test_legacy_model_predicts_the_same(tag):
  path = os.path.join(FIXTURES, f"tiny_{tag}.keras")
  expected = np.load(os.path.join(FIXTURES, f"tiny_{tag}_expected.npz"))
  meta = json.loads(str(expected["meta"]))
  images = make_fixture.images()
  assert make_fixture.images_sha256(images) == str(expected["images_sha256"]), (
      "np.random.default_rng(0) no longer gives the fixture's images")
  saved_by = f"saved by TF {meta['tensorflow']} / Keras {meta['keras']}"
  try:
    model = predict.load_model(path)
  except rundir.RunError as e:
    cause = str(e).strip().splitlines()[0][:300]
    if _version(keras.__version__) < _version(meta["keras"]):
      # Python 3.10 gets Keras 3.12 (setup.cfg), older than the file's.
      pytest.skip(f"Keras {keras.__version__} is older than the file's "
                  f"({saved_by}) and cannot read it: {cause}")
    pytest.fail(f"{path} ({saved_by}) no longer loads: {cause}; {REEXPORT}",
                pytrace=False)
  probs = model(images, training=False).numpy()[:, 0]
  assert probs.shape == expected["probs"].shape
  diff = float(np.max(np.abs(probs - expected["probs"])))
  if not diff <= 1e-5:  # NaN fails too.
    pytest.fail(f"{path} ({saved_by}) predicts differently: max |diff| "
                f"{diff:.3g} > 1e-5; {REEXPORT}", pytrace=False)
