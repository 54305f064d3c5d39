"""Tests for hcd.metrics: values against scikit-learn and hand counts."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from hcd import metrics


def test_perfect_and_reversed_separation():
  y = [0, 0, 0, 1, 1]
  p = [0.1, 0.2, 0.3, 0.7, 0.9]
  m = metrics.binary_metrics(y, p)
  assert m["roc_auc"] == 1.0
  assert m["pr_auc"] == 1.0
  assert m["accuracy"] == 1.0
  r = metrics.binary_metrics(y, [1 - x for x in p])
  assert r["roc_auc"] == 0.0
  assert r["accuracy"] == 0.0


def test_confusion_counts_by_hand():
  # tn: 0.1, 0.4 ; fp: 0.6 ; fn: 0.2 ; tp: 0.5 (>= threshold), 0.9.
  y = [0, 0, 0, 1, 1, 1]
  p = [0.1, 0.4, 0.6, 0.2, 0.5, 0.9]
  m = metrics.binary_metrics(y, p)
  assert m["confusion_matrix"] == [[2, 1], [1, 2]]
  np.testing.assert_allclose(m["confusion_matrix_normalized"],
                             [[2 / 3, 1 / 3], [1 / 3, 2 / 3]])
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["num_examples"] == 6
  assert m["positive_fraction"] == 0.5
  # At threshold 0.55 the 0.5 positive becomes a false negative.
  m2 = metrics.binary_metrics(y, p, threshold=0.55)
  assert m2["confusion_matrix"] == [[2, 1], [2, 1]]
  assert m2["accuracy_at_threshold"] == pytest.approx(3 / 6)
  assert m2["accuracy"] == pytest.approx(4 / 6)  # Still at 0.5.
  assert m2["threshold"] == 0.55


def test_matches_sklearn_on_random_data():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 500)
  p = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1)
  m = metrics.binary_metrics(y, p[:, None])  # [n, 1] model output accepted.
  assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
  assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
  assert m["log_loss"] == pytest.approx(skm.log_loss(y, p), rel=1e-6)
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p >= 0.5))
  np.testing.assert_array_equal(m["confusion_matrix"],
                                skm.confusion_matrix(y, p >= 0.5))
  json.dumps(m, allow_nan=False)  # JSON-ready.


def test_single_class_gives_none_auc_and_finite_loss():
  m = metrics.binary_metrics([1, 1, 1], [0.0, 0.5, 1.0])
  assert m["roc_auc"] is None and m["pr_auc"] is None
  assert np.isfinite(m["log_loss"])  # Clipped, not infinite.
  assert m["confusion_matrix"] == [[0, 0], [1, 2]]
  assert m["confusion_matrix_normalized"][0] == [0.0, 0.0]
  json.dumps(m, allow_nan=False)


@pytest.mark.parametrize("y,p,match", [
    ([0, 1], [0.5], "2 labels but y_prob has 1"),
    ([], [], "empty"),
    ([0, 2], [0.1, 0.2], "only 0 and 1"),
    ([0, -1], [0.1, 0.2], "unlabelled"),
    ([0, 1], [0.1, float("nan")], "index 1"),
    ([0, 1], [0.1, 1.5], "in \\[0, 1\\]"),
])
def test_bad_input_is_refused(y, p, match):
  with pytest.raises(ValueError, match=match):
    metrics.binary_metrics(y, p)


def test_bad_threshold_is_refused():
  with pytest.raises(ValueError, match="threshold"):
    metrics.binary_metrics([0, 1], [0.2, 0.8], threshold=2.0)


def test_choose_threshold():
  y = [0, 0, 0, 1, 1, 1]
  p = [0.05, 0.1, 0.2, 0.3, 0.8, 0.9]
  t = metrics.choose_threshold(y, p)
  # Every threshold in (0.2, 0.3] separates the classes perfectly.
  assert 0.2 < t <= 0.3
  assert metrics.binary_metrics(y, p, t)["accuracy_at_threshold"] == 1.0
  assert metrics.choose_threshold(y, p, "accuracy") == t
  with pytest.raises(ValueError, match="known"):
    metrics.choose_threshold(y, p, "magic")
  with pytest.raises(ValueError, match="both classes"):
    metrics.choose_threshold([1, 1], [0.2, 0.3])
