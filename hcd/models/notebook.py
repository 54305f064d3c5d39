"""The three models of the original Kaggle notebook, layer for layer.

Parameter counts match the notebook exactly (8,868,929 and 2,212,925), which
tests check. The only addition is at the ends: the uint8 input with
`Rescaling(1/255)` (the notebook rescaled in ImageDataGenerator) and a float32
output layer so mixed precision keeps float32 probabilities.
"""

from __future__ import annotations

import keras
from keras import layers

from hcd.models import common
from hcd.models.batchnorm import FusedBatchNorm


def model1(dropout: float = 0.2) -> keras.Model:
  """Notebook model1: two convs, pool, BN, dense 60-30-1 (8,868,929 params).

  Args:
    dropout: dropout rate after the pooling.

  Returns:
    keras.Model: uint8 [B, 96, 96, 3] -> float32 probability [B, 1].
  """
  inputs, x = common.input_and_rescale()
  x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
  x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
  x = layers.MaxPooling2D(2)(x)
  x = layers.Dropout(dropout)(x)
  x = FusedBatchNorm()(x)
  x = layers.Flatten()(x)
  x = layers.Dense(60, activation="relu")(x)
  x = layers.Dense(30, activation="relu")(x)
  return keras.Model(inputs, common.probability_head(x), name="model1")


def _model2_graph(name: str, dropout: float) -> keras.Model:
  inputs, x = common.input_and_rescale()
  x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
  x = layers.MaxPooling2D(2)(x)
  x = layers.Dropout(dropout)(x)
  x = FusedBatchNorm()(x)
  x = layers.Flatten()(x)
  x = layers.Dense(30, activation="relu")(x)
  return keras.Model(inputs, common.probability_head(x), name=name)


def model2(dropout: float = 0.2) -> keras.Model:
  """Notebook model2: one conv, pool, BN, dense 30-1 (2,212,925 params).

  Args:
    dropout: dropout rate after the pooling.

  Returns:
    keras.Model: uint8 [B, 96, 96, 3] -> float32 probability [B, 1].
  """
  return _model2_graph("model2", dropout)


def model3(dropout: float = 0.2) -> keras.Model:
  """Notebook model3: model2's graph; the notebook trained it at lr 1e-4.

  Args:
    dropout: dropout rate after the pooling.

  Returns:
    keras.Model: uint8 [B, 96, 96, 3] -> float32 probability [B, 1].
  """
  return _model2_graph("model3", dropout)
