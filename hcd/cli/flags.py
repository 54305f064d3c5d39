"""Flags of hcd_train, derived from the TrainConfig dataclass.

Every TrainConfig field is one flag of the same name, type, default, help
text and allowed values (hcd/train/config.py is the single source); only
`model_overrides` is spelled `--model_override=key=value` (repeatable).
Defaults are the notebook's experiment (model1, Adam 0.9/0.999, batch 32,
10 epochs, flips, undersampling, 20% validation, seed 123). Flagfiles in
hcd/configs/ (copied to a workspace by `python -m hcd.configs`) set them
explicitly; flags on the command line override a flagfile:

  hcd_train --flagfile=model1.flags --epochs=2 --workdir=runs/try

Library code never reads these flags: `config_from_flags` builds the
TrainConfig that hcd.train.loop takes.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import typing

from absl import flags

from hcd.train.config import ConfigError
from hcd.train.config import TrainConfig
from hcd.train.config import parse_model_overrides

FLAGS = flags.FLAGS
_OVERRIDES = "model_overrides"
_OVERRIDE_FLAG = "model_override"


def _define(field: dataclasses.Field, kind) -> None:
  meta = field.metadata
  name, default, text = field.name, field.default, meta["help"]
  choices = meta.get("choices")
  if choices is not None:
    choices = list(choices() if callable(choices) else choices)
    flags.DEFINE_enum(name, default, choices, text)
  elif kind is bool:
    flags.DEFINE_boolean(name, default, text)
  elif kind is int:
    flags.DEFINE_integer(name, default, text)
  elif kind is float or kind == (float | None):
    flags.DEFINE_float(name, default, text)
  elif kind is str:
    flags.DEFINE_string(name, default, text)
  else:
    raise TypeError(f"TrainConfig.{name}: no flag type for {kind}")


def _define_all() -> None:
  kinds = typing.get_type_hints(TrainConfig)
  for field in dataclasses.fields(TrainConfig):
    if field.name == _OVERRIDES:
      flags.DEFINE_multi_string(_OVERRIDE_FLAG, [], field.metadata["help"])
    else:
      _define(field, kinds[field.name])


_define_all()


def config_from_flags(flag_values=FLAGS) -> TrainConfig:
  """Builds the TrainConfig of hcd_train from parsed flags.

  Raises:
    ConfigError: a malformed --model_override or an invalid value.
  """
  values = {f.name: flag_values[f.name].value
            for f in dataclasses.fields(TrainConfig) if f.name != _OVERRIDES}
  config = TrainConfig(**values, model_overrides=parse_model_overrides(
      flag_values[_OVERRIDE_FLAG].value))
  config.validate()
  return config


def resolved_flags_text(config: TrainConfig, flag_values=FLAGS) -> str:
  """The train flags with their final values, as a flagfile.

  Running `hcd_train --flagfile=<workdir>/flags.txt` repeats the run.

  Args:
    config: the flags' TrainConfig (config_from_flags), whose run directory
      (the default one, or '{fold}' filled in) --workdir records.
    flag_values: the parsed flags.
  """
  module = sys.modules[__name__]
  lines = [f"# hcd_train resolved flags, "
           f"{datetime.datetime.now().isoformat(timespec='seconds')}",
           f"# command: {' '.join(sys.argv)}"]
  for flag in sorted(flag_values.get_flags_for_module(module),
                     key=lambda fl: fl.name):
    text = flag.serialize()
    if flag.name == "workdir":
      text = f"--workdir={config.workdir}"
    if text:
      lines.append(text)
  return "\n".join(lines) + "\n"
