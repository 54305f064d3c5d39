"""Tests of test-time stain augmentation (hcd.eval.predict, --stain_tta)."""

import numpy as np
import pytest

from hcd.eval import predict
from hcd.models import augment

import evalutil


def test_stain_views_are_fixed_and_plausible():
  x = evalutil.images(8, seed=3)
  assert predict.stain_view(x, 0) is x
  a = predict.stain_view(x, 1).numpy()
  assert a.dtype == np.uint8 and a.shape == x.shape
  np.testing.assert_array_equal(a, predict.stain_view(x, 1).numpy())
  b = predict.stain_view(x, 2).numpy()
  assert not np.array_equal(a, b)
  # HED-light moves colours a little, not a lot.
  diff = np.abs(a.astype(int) - x.astype(int)).mean()
  assert 0.5 < diff < 20


def test_stain_tta_averages_the_stain_views():
  model = evalutil.tiny_model()
  x = evalutil.images(6, seed=4)
  got = predict.make_predict_fn([model], tta=2, stain_tta=3)(x).numpy()
  want = np.mean([model(predict.stain_view(augment.d4_transform(x, k), j),
                        training=False).numpy().reshape(-1)
                  for k in range(2) for j in range(3)], axis=0)
  np.testing.assert_allclose(got, want, atol=1e-6)
  plain = predict.make_predict_fn([model], tta=2)(x).numpy()
  assert np.abs(got - plain).max() > 1e-7
  np.testing.assert_allclose(
      predict.make_predict_fn([model], tta=2, stain_tta=1)(x).numpy(), plain,
      atol=1e-7)


@pytest.mark.parametrize("bad", [0, 17, 2.5, "2"])
def test_bad_stain_tta_refused(bad):
  with pytest.raises(ValueError, match="--stain_tta"):
    predict.check_stain_tta(bad)
