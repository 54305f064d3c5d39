"""BatchNormalization through TensorFlow's fused kernel.

Keras 3 computes BatchNormalization from separate ops under every backend
(`tf.nn.moments`, then `tf.nn.batch_normalization`): several element-wise
passes over each activation forward, and more for the gradient
(keras-team/keras-core#225, "BatchNorm is slow"). tf.keras 2 called
TensorFlow's fused kernel instead, `FusedBatchNormV3`: one pass each way,
run by oneDNN on CPUs and cuDNN on GPUs. On the 2-core CPU box the
unfused layer was 14% of a training step of hcd's ResNet, and this layer
made the step of `pcam_cpu.flags` 1.11x faster (BENCHMARKS.md, "Training
step").

`FusedBatchNorm` is Keras' layer (same arguments, weights, statistics and
arithmetic, within float rounding) that calls the fused kernel where it
applies: the TensorFlow backend, normalisation over the last axis, no mask,
no renorm, no synchronized statistics; anything else takes Keras' own path.
Inputs of any rank >= 2 go through the kernel as a 4-D view (statistics
per feature over every other axis are the same reduction).

Like Keras, the statistics are computed in float32 whatever the compute
dtype, and the moving variance is updated with the biased batch variance
(the kernel's own output carries Bessel's correction, which is undone).

`with batchnorm.keras_kernel():` builds the layers with Keras' own path
instead (`fused=False`), for A/B timings (bench/train_step.py
--batchnorm=fused,keras) and as an escape hatch.

Saving: `standard_equivalent()` returns the plain `BatchNormalization` with
the same config and weights, so `hcd.models.standard_model` (every .keras
file hcd writes) keeps saved models free of hcd layers.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

# cuDNN refuses a smaller epsilon; Keras' default is 1e-3.
_MIN_EPSILON = 1.001e-5

# What `fused=None` means: True, except inside `keras_kernel()`.
_fused_default = True


@contextlib.contextmanager
def keras_kernel():
  """FusedBatchNorm layers built inside take Keras' unfused path."""
  global _fused_default
  previous, _fused_default = _fused_default, False
  try:
    yield
  finally:
    _fused_default = previous


@keras.saving.register_keras_serializable(package="hcd")
class FusedBatchNorm(keras.layers.BatchNormalization):
  """keras.layers.BatchNormalization computed by `FusedBatchNormV3`.

  Args:
    fused: use the fused kernel where it applies (tf.keras 2's argument);
      None: yes, unless built inside `keras_kernel()`.
    **kwargs: keras.layers.BatchNormalization's arguments.
  """

  def __init__(self, fused: bool | None = None, **kwargs):
    super().__init__(**kwargs)
    self.fused = _fused_default if fused is None else bool(fused)

  def _fusable(self, inputs, mask) -> bool:
    rank = len(inputs.shape)
    return (self.fused and keras.backend.backend() == "tensorflow" and
            mask is None and
            # `renorm` is Keras 3.13+ (absent, i.e. off, in 3.12).
            not getattr(self, "renorm", False) and not self.synchronized and
            rank >= 2 and
            self.axis in (-1, rank - 1) and self.epsilon >= _MIN_EPSILON and
            inputs.shape[-1] is not None)

  def call(self, inputs, training=None, mask=None):
    if not self._fusable(inputs, mask):
      return super().call(inputs, training=training, mask=mask)
    # As Keras: statistics in float32 (bf16/fp16 sums overflow or round).
    x = tf.cast(inputs, tf.float32)
    channels = x.shape[-1]
    if len(x.shape) != 4:
      # The kernel takes NHWC; the statistics are over every axis but the
      # last, so any 4-D view with the channels last computes the same.
      x = tf.reshape(x, [-1, 1, 1, channels])
    gamma = (tf.ones([channels]) if self.gamma is None else
             tf.cast(self.gamma, tf.float32))
    beta = (tf.zeros([channels]) if self.beta is None else
            tf.cast(self.beta, tf.float32))
    if training and self.trainable:
      y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
          x, gamma, beta, epsilon=self.epsilon, data_format="NHWC",
          is_training=True)
      # The kernel returns the unbiased variance (for a running estimate);
      # Keras' moving variance follows the biased one.
      n = tf.cast(tf.size(x) // channels, tf.float32)
      variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
      momentum = self.momentum
      self.moving_mean.assign(
          self.moving_mean * momentum + mean * (1.0 - momentum))
      self.moving_variance.assign(
          self.moving_variance * momentum + variance * (1.0 - momentum))
    else:
      y, _, _ = tf.compat.v1.nn.fused_batch_norm(
          x, gamma, beta, mean=tf.cast(self.moving_mean, tf.float32),
          variance=tf.cast(self.moving_variance, tf.float32),
          epsilon=self.epsilon, data_format="NHWC", is_training=False)
    if len(inputs.shape) != 4:
      y = tf.reshape(y, tf.shape(inputs))
    return tf.cast(y, self.compute_dtype)

  def get_config(self):
    return {**super().get_config(), "fused": self.fused}

  def standard_equivalent(self):
    """(the plain BatchNormalization computing the same, its weights)."""
    config = self.get_config()
    del config["fused"]
    layer = keras.layers.BatchNormalization.from_config(config)
    return layer, self.get_weights()
