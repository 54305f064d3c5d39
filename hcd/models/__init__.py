"""Models chosen by name from one table.

Every model maps a uint8 batch [B, 96, 96, 3] to the float32 probability of
tumour [B, 1]. The cast to float and the /255 are the model's first layer
(`Rescaling`), so the input pipeline ships 4x fewer bytes to the device, and
the last layer is `Dense(1, sigmoid, dtype="float32")` so mixed precision
still returns float32 probabilities. Models are built from standard Keras
layers plus one of hcd's with a standard equivalent that `standard_model`
swaps in whenever hcd saves: `FusedBatchNorm` (Keras' BatchNormalization
through TensorFlow's fused kernel, hcd.models.batchnorm). So a saved
`.keras` file loads with `keras.saving.load_model(safe_mode=True)` without
hcd installed; the one exception is a model built with `stain_norm`
(hcd.models.stain), whose layer has no standard equivalent and needs
`import hcd.models.stain` first.
Augmentation is not part of any model (see `hcd.models.augment`).

The table maps a name to a `ModelSpec`; builders are imported lazily so that
`import hcd.models` (e.g. to validate a flag) does not import TensorFlow.

  hcd.models.build_model("model1")          # a keras.Model
  hcd.models.default_learning_rate("model3")  # 1e-4
  python -m hcd.models                       # prints the table
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

from hcd.data.features import IMAGE_SHAPE  # pylint: disable=unused-import


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One row of the model table.

  Attributes:
    builder: callable(**overrides) -> keras.Model.
    default_lr: learning rate the model was tuned with (Adam).
    description: one line for `python -m hcd.models` and --help texts.
  """
  builder: Callable[..., Any]
  default_lr: float
  description: str


def _lazy(module: str, function: str) -> Callable[..., Any]:
  """Returns a builder that imports `hcd.models.<module>` on first call."""

  def build(**overrides):
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, function)(**overrides)

  build.__name__ = function
  build.__qualname__ = function
  build.target = (f"{__name__}.{module}", function)
  return build


MODELS: dict[str, ModelSpec] = {
    "model1": ModelSpec(
        _lazy("notebook", "model1"), 1e-3,
        "notebook model1: conv32-conv64-pool-BN-dense60-dense30 (Adam 1e-3)"),
    "model2": ModelSpec(
        _lazy("notebook", "model2"), 1e-3,
        "notebook model2: conv32-pool-BN-dense30 (Adam 1e-3)"),
    "model3": ModelSpec(
        _lazy("notebook", "model3"), 1e-4,
        "notebook model3: model2 with Adam 1e-4"),
    "resnet": ModelSpec(
        _lazy("resnet", "resnet"), 1e-3,
        "compact ResNet for 96 px: 2 stride-2 stem convs, residual stages "
        "64/128/256, global pooling (use warm-up + cosine)"),
    "efficientnet_v2_b0": ModelSpec(
        _lazy("applications", "efficientnet_v2_b0"), 1e-3,
        "keras.applications EfficientNetV2-B0 backbone, weights=None unless "
        "weights='imagenet' is passed"),
    "tiny": ModelSpec(
        _lazy("tiny", "tiny"), 1e-3,
        "test-only: ~1.4k parameters, fast on CPU"),
}


# In-model stain normalisation methods (hcd.models.stain; here so that a
# flag can be checked without importing TensorFlow).
STAIN_NORMS = ("none", "reinhard", "macenko")


def model_names() -> list[str]:
  """Returns the known model names in table order."""
  return list(MODELS)


def get_spec(name: str) -> ModelSpec:
  """Returns the table row of a model.

  Args:
    name: a model name.

  Returns:
    Its ModelSpec.

  Raises:
    ValueError: unknown name; the message lists the known names.
  """
  try:
    return MODELS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown model {name!r}; known models: "
                     f"{', '.join(model_names())}") from None


def default_learning_rate(name: str) -> float:
  """Returns the model's default learning rate.

  Raises:
    ValueError: unknown name; the message lists the known names.
  """
  return get_spec(name).default_lr


def _builder_parameters(spec: ModelSpec) -> list[str]:
  module, function = spec.builder.target
  fn = getattr(importlib.import_module(module), function)
  return [p.name for p in inspect.signature(fn).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY or
          p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def check_overrides(name: str, overrides) -> None:
  """Checks that a model's builder accepts every override key.

  Imports the model's module (not TensorFlow's data machinery), so a binary
  can refuse a misspelt --model_override before it reads any data.

  Args:
    name: a name from `model_names()`.
    overrides: the builder keyword arguments (only the keys matter).

  Raises:
    ValueError: unknown model name (lists the known ones) or an override the
      model does not accept (lists the accepted ones).
  """
  spec = get_spec(name)
  accepted = _builder_parameters(spec)
  unknown = sorted(set(overrides) - set(accepted))
  if unknown:
    raise ValueError(f"model {name!r} does not accept {', '.join(unknown)}; "
                     f"accepted overrides: {', '.join(accepted) or 'none'}")


def build_model(name: str, **overrides):
  """Builds a model from the table.

  Args:
    name: a name from `model_names()`.
    **overrides: builder keyword arguments (e.g. `dropout=0.3`,
      `weights="imagenet"`); each model's module lists what it accepts.

  Returns:
    An unbuilt-optimizer keras.Model: uint8 [B, 96, 96, 3] -> float32 [B, 1].

  Raises:
    ValueError: unknown model name (lists the known ones) or an override the
      model does not accept (lists the accepted ones).
  """
  check_overrides(name, overrides)
  return get_spec(name).builder(**overrides)


def standard_model(model):
  """A model computing the same function from standard Keras layers only.

  hcd saves every .keras file through this, so saved models load with
  `keras.saving.load_model(safe_mode=True)` without hcd installed. A custom
  layer opts in by defining `standard_equivalent()` -> (standard layer,
  its weights); e.g. a FusedBatchNorm becomes the BatchNormalization it
  computes. Models without such layers are returned as they are.

  Args:
    model: a functional keras.Model from the table.

  Returns:
    `model` itself, or a functional copy with the custom layers replaced.
  """
  import keras  # pylint: disable=g-import-not-at-top
  if not any(hasattr(l, "standard_equivalent") for l in model.layers):
    return model
  weights = {}

  def clone(layer):
    if hasattr(layer, "standard_equivalent"):
      new, w = layer.standard_equivalent()
      weights[new.name] = w
      return new
    new = layer.__class__.from_config(layer.get_config())
    weights[new.name] = layer.get_weights()
    return new

  copy = keras.models.clone_model(model, clone_function=clone)
  for layer in copy.layers:
    if layer.name in weights:
      layer.set_weights(weights[layer.name])
  return copy


def compute_precision(model) -> str:
  """The mixed precision a model computes in: "bf16", "fp16" or "none"."""
  for layer in model.layers:
    dtype = layer.dtype_policy.compute_dtype
    if dtype in ("bfloat16", "float16"):
      return "bf16" if dtype == "bfloat16" else "fp16"
  return "none"


def float32_copy(model):
  """The model with every mixed-precision layer computing in float32.

  A model trained under a mixed policy keeps float32 weights but computes
  in bf16 / fp16. Where the hardware has no native support for that type it
  is emulated, several times slower than float32, so prediction runs such a
  model in float32: the same weights, outputs equal up to bf16 rounding.

  Args:
    model: a functional keras.Model.

  Returns:
    A functional copy whose layers all compute in float32 (`model` itself
    if it already does).
  """
  import keras  # pylint: disable=g-import-not-at-top
  if compute_precision(model) == "none":
    return model

  def clone(layer):
    config = layer.get_config()
    policy = layer.dtype_policy
    if policy.compute_dtype != policy.variable_dtype:
      config["dtype"] = "float32"
    return layer.__class__.from_config(config)

  copy = keras.models.clone_model(model, clone_function=clone)
  copy.set_weights(model.get_weights())
  return copy


def count_params(model) -> int:
  """Returns the total (trainable + non-trainable) parameter count."""
  return int(model.count_params())
