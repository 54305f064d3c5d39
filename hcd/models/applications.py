"""keras.applications backbones behind the table's uniform ends.

Backbones are built with `weights=None` by default (random init, no
download). ImageNet weights are used only when asked for with
`weights="imagenet"`, which needs internet access the first time (Keras
caches them in ~/.keras/models).
"""

from __future__ import annotations

import keras
from keras import layers

from hcd.models import common

# ImageNet statistics the EfficientNet B-variants were trained with; kept as
# a standard Normalization layer (not the backbone's own preprocessing) so
# the model still starts with the table's Rescaling(1/255).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_VARIANCE = (0.229**2, 0.224**2, 0.225**2)


def efficientnet_v2_b0(weights: str | None = None,
                    dropout: float = 0.2) -> keras.Model:
  """EfficientNetV2-B0 backbone with global pooling and a sigmoid head.

  V2-B0 rather than V1-B0: fewer parameters (5.9M total), faster fused-MBConv
  stem, and its `include_preprocessing=False` mode lets the table's
  Rescaling(1/255) stay the first layer.

  Args:
    weights: None (random init) or "imagenet" (downloads once).
    dropout: dropout rate before the classifier.

  Returns:
    keras.Model: uint8 [B, 96, 96, 3] -> float32 probability [B, 1].

  Raises:
    ValueError: weights is neither None nor "imagenet".
  """
  if weights not in (None, "imagenet"):
    raise ValueError(f"weights must be None or 'imagenet', got {weights!r}")
  inputs, x = common.input_and_rescale()
  x = layers.Normalization(mean=_IMAGENET_MEAN, variance=_IMAGENET_VARIANCE,
                           name="imagenet_normalize")(x)
  backbone = keras.applications.EfficientNetV2B0(
      include_top=False, weights=weights, input_shape=common.IMAGE_SHAPE,
      pooling="avg", include_preprocessing=False)
  x = backbone(x)
  x = layers.Dropout(dropout, name="dropout")(x)
  return keras.Model(inputs, common.probability_head(x),
                     name="efficientnet_v2_b0")
