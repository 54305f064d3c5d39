"""The training loop's streaming AUC agrees with scikit-learn, also when saturated."""

import numpy as np
from sklearn.metrics import roc_auc_score
import tensorflow as tf

from hcd.train import steps


def _streaming_auc(labels, probs):
  m = steps.Metrics("val_")
  for s in range(0, len(labels), 64):
    y = tf.constant(labels[s:s + 64], tf.float32)
    p = tf.constant(probs[s:s + 64, None], tf.float32)
    m.update(y, p, tf.zeros_like(y), tf.ones_like(y))
  return m.result()["val_auc"]


def test_auc_matches_sklearn_on_spread_probabilities():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 2000).astype(np.float32)
  probs = 1 / (1 + np.exp(-(2.0 * labels - 1 + rng.normal(0, 1.5, 2000))))
  assert abs(_streaming_auc(labels, probs) - roc_auc_score(labels, probs)) < 0.005


def test_auc_survives_saturated_probabilities():
  # An over-confident model: every probability above 0.999, ranking still good.
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 2000).astype(np.float32)
  logits = 9.0 + 3.0 * labels + rng.normal(0, 1.0, 2000)
  probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
  exact = roc_auc_score(labels, probs)
  assert exact > 0.9
  assert abs(_streaming_auc(labels, probs) - exact) < 0.01
