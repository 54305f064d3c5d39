"""Tests for hcd.models.batchnorm: the fused kernel computes Keras' layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hcd import models
from hcd.models.batchnorm import FusedBatchNorm


def _pair(shape, seed=0, **kwargs):
  """A Keras BatchNormalization and a FusedBatchNorm with equal weights."""
  rng = np.random.default_rng(seed)
  keras_bn = keras.layers.BatchNormalization(**kwargs)
  fused = FusedBatchNorm(**kwargs)
  for layer in (keras_bn, fused):
    layer.build(shape)
  weights = [rng.normal(1.0, 0.3, w.shape).astype(np.float32)
             for w in keras_bn.get_weights()]
  weights[-1] = np.abs(weights[-1])  # the moving variance
  keras_bn.set_weights(weights)
  fused.set_weights(weights)
  return keras_bn, fused


def _forward_backward(layer, x, training):
  """[outputs, gradients of a weighted sum w.r.t. x, gamma, beta]."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=training)
    loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.sin(x))
  return [y] + tape.gradient(loss, [x, layer.gamma, layer.beta])


def _run(layer, x, training):
  """_forward_backward, eagerly, as float32 numpy arrays."""
  return [np.asarray(tf.cast(t, tf.float32))
          for t in _forward_backward(layer, x, training)]


@pytest.mark.parametrize("shape", [(6, 5, 5, 7), (3, 4, 4, 8, 5), (16, 9)],
                         ids=["nhwc", "5d", "dense_2d"])
@pytest.mark.parametrize("training", [True, False])
def test_matches_keras_batchnorm(shape, training):
  keras_bn, fused = _pair(shape, momentum=0.9)
  x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, shape),
                  tf.float32)
  initial_mean = fused.moving_mean.numpy()
  want, got = _run(keras_bn, x, training), _run(fused, x, training)
  for name, w, g in zip(["y", "dx", "dgamma", "dbeta"], want, got):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=name)
  # The moving statistics move in training only, and by the same amount
  # (the kernel's Bessel-corrected variance is undone).
  for w, g in zip(keras_bn.non_trainable_weights, fused.non_trainable_weights):
    np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
  moved = not np.allclose(fused.moving_mean.numpy(), initial_mean)
  assert moved == training


def test_runs_the_fused_kernel():
  _, fused = _pair((4, 6, 6, 3))
  x = tf.zeros((4, 6, 6, 3))
  for training in (True, False):
    graph = tf.function(lambda x, t=training: fused(x, training=t)
                        ).get_concrete_function(x).graph
    ops = {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" in ops, sorted(ops)
    assert "Rsqrt" not in ops  # the unfused formula's


def test_falls_back_to_keras_where_the_kernel_does_not_apply():
  # Channels first: the kernel here takes NHWC only.
  keras_bn, fused = _pair((4, 3, 5, 5), axis=1)
  x = tf.constant(np.random.default_rng(2).normal(size=(4, 3, 5, 5)),
                  tf.float32)
  np.testing.assert_allclose(_run(fused, x, True)[0],
                             _run(keras_bn, x, True)[0], rtol=1e-5, atol=1e-5)
  graph = tf.function(lambda x: fused(x, training=True)
                      ).get_concrete_function(x).graph
  assert "FusedBatchNormV3" not in {op.type for op in graph.get_operations()}


def test_keras_kernel_builds_unfused_layers_that_keep_their_choice():
  from hcd.models import batchnorm  # pylint: disable=g-import-not-at-top
  with batchnorm.keras_kernel():
    unfused = FusedBatchNorm()
  assert not unfused.fused and FusedBatchNorm().fused
  copy = FusedBatchNorm.from_config(unfused.get_config())
  assert not copy.fused
  copy.build((2, 3, 3, 4))
  graph = tf.function(lambda x: copy(x, training=True)
                      ).get_concrete_function(tf.zeros((2, 3, 3, 4))).graph
  assert "FusedBatchNormV3" not in {op.type for op in graph.get_operations()}


def test_inside_an_xla_compiled_training_step():
  keras_bn, fused = _pair((8, 6, 6, 4))
  x = tf.constant(np.random.default_rng(3).normal(size=(8, 6, 6, 4)),
                  tf.float32)
  step = tf.function(lambda x: _forward_backward(fused, x, True),
                     jit_compile=True)
  got = step(x)
  want = _run(keras_bn, x, True)
  for w, g in zip(want, got):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(fused.moving_variance.numpy(),
                             keras_bn.moving_variance.numpy(), rtol=1e-5)


def test_bf16_statistics_in_float32_output_in_bf16():
  try:
    keras.config.set_dtype_policy("mixed_bfloat16")
    keras_bn, fused = _pair((8, 4, 4, 6))
  finally:
    keras.config.set_dtype_policy("float32")
  x = tf.constant(np.random.default_rng(4).normal(5.0, 2.0, (8, 4, 4, 6)),
                  tf.bfloat16)
  y = fused(x, training=True)
  assert y.dtype == tf.bfloat16
  np.testing.assert_allclose(np.asarray(tf.cast(y, tf.float32)),
                             np.asarray(tf.cast(keras_bn(x, training=True),
                                                tf.float32)),
                             atol=0.05)
  np.testing.assert_allclose(fused.moving_mean.numpy(),
                             keras_bn.moving_mean.numpy(), rtol=1e-5)


def test_saved_models_hold_the_standard_layer():
  keras.utils.set_random_seed(0)
  model = models.build_model("resnet", widths=(8, 16), stem_widths=(4, 8))
  assert any(isinstance(l, FusedBatchNorm) for l in model.layers)
  x = np.random.default_rng(5).integers(0, 256, (3, 96, 96, 3), np.uint8)
  model(x, training=True)  # move the statistics off their initial values
  standard = models.standard_model(model)
  assert not any(isinstance(l, FusedBatchNorm) for l in standard.layers)
  assert sum(type(l) is keras.layers.BatchNormalization
             for l in standard.layers) == sum(
                 isinstance(l, FusedBatchNorm) for l in model.layers)
  assert standard.count_params() == model.count_params()
  np.testing.assert_allclose(np.asarray(standard(x, training=False)),
                             np.asarray(model(x, training=False)),
                             rtol=1e-5, atol=1e-6)

