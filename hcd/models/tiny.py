"""A test-only model: a few thousand parameters, fast on CPU."""

from __future__ import annotations

import keras
from keras import layers

from hcd.models import common
from hcd.models.batchnorm import FusedBatchNorm


def tiny(width: int = 8, stain_norm: str = "none") -> keras.Model:
  """Strided conv, BN, global pooling, dense: 1,433 parameters at width 8.

  It has a BatchNormalization and a Dropout so tests exercise the training
  flag and non-trainable state the real models have.

  Args:
    width: channels of the two convolutions.
    stain_norm: see common.input_and_rescale.

  Returns:
    keras.Model: uint8 [B, 96, 96, 3] -> float32 probability [B, 1].
  """
  inputs, x = common.input_and_rescale(stain_norm=stain_norm)
  x = layers.Conv2D(width, 3, strides=4, padding="same", use_bias=False)(x)
  x = FusedBatchNorm()(x)
  x = layers.Activation("relu")(x)
  x = layers.Conv2D(2 * width, 3, strides=2, padding="same",
                    activation="relu")(x)
  x = layers.GlobalAveragePooling2D()(x)
  x = layers.Dropout(0.1)(x)
  return keras.Model(inputs, common.probability_head(x), name="tiny")
