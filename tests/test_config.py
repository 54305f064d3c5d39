"""TrainConfig is the single source of hcd_train's flags."""

import dataclasses
import json
import subprocess
import sys

import pytest

from hcd.train import config as config_lib

# Parses flags in a subprocess so that its absl FLAGS never meet another
# binary's in the test process.
DESCRIBE = """
import json
from hcd.cli import flags
out = {}
for name, flag in flags.FLAGS._flags().items():
  if flag.help:
    out[name] = {"default": flag.default, "help": flag.help,
                 "enum": sorted(getattr(flag.parser, "enum_values", None) or [])}
print(json.dumps(out))
"""


def test_every_config_field_is_a_flag_with_its_default_and_help():
  out = subprocess.run([sys.executable, "-c", DESCRIBE], capture_output=True,
                       text=True, check=True).stdout
  described = json.loads(out)
  for field in dataclasses.fields(config_lib.TrainConfig):
    name = "model_override" if field.name == "model_overrides" else field.name
    assert name in described, name
    flag = described[name]
    assert field.metadata["help"] and field.metadata["help"] in flag["help"]
    if field.name != "model_overrides":
      assert flag["default"] == field.default, name
    choices = field.metadata.get("choices")
    if choices is not None:
      choices = choices() if callable(choices) else choices
      assert flag["enum"] == sorted(choices), name


def test_enum_values_are_defined_once():
  from hcd.data import subsets  # pylint: disable=g-import-not-at-top
  from hcd.train import runtime  # pylint: disable=g-import-not-at-top
  assert subsets.BALANCE_MODES is config_lib.BALANCE_MODES
  assert runtime.STRATEGIES is config_lib.STRATEGIES
  assert runtime.PRECISIONS is config_lib.PRECISIONS
  assert runtime.JIT_MODES is config_lib.JIT_MODES


def test_data_settings_are_train_config_fields_defined_once():
  # The data layer's settings carry no defaults of their own: every field
  # is a TrainConfig field, and a config hands over its values.
  from hcd.data import settings  # pylint: disable=g-import-not-at-top
  names = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
  assert set(settings.FIELDS) <= names
  assert all(f.default is dataclasses.MISSING
             for f in dataclasses.fields(settings.DataSettings))
  config = config_lib.TrainConfig(shards_dir="sh", val_split="valid",
                                  num_folds=0, balance="none", seed=7)
  got = config.data_settings()
  assert {n: getattr(got, n) for n in settings.FIELDS} == {
      n: getattr(config, n) for n in settings.FIELDS}


def test_validate_names_the_setting_and_the_choices():
  for field, value in (("balance", "oversample"), ("mix", "blend"),
                       ("strategy", "tpu")):
    config = config_lib.TrainConfig(**{field: value})
    try:
      config.validate()
    except config_lib.ConfigError as e:
      assert repr(value) in str(e) and field.replace("_", " ") in str(e)
    else:
      raise AssertionError(f"{field}={value} was accepted")


def test_each_fold_and_seed_gets_its_own_run_directory():
  TrainConfig = config_lib.TrainConfig  # pylint: disable=invalid-name
  assert TrainConfig(model="resnet").workdir == "runs/resnet"
  assert TrainConfig(model="resnet", num_folds=5,
                     fold=2).workdir == "runs/resnet_fold2"
  assert TrainConfig(workdir="cv/{fold}/run", num_folds=3,
                     fold=1).workdir == "cv/1/run"
  assert TrainConfig(workdir="runs/{x}").workdir == "runs/{x}"
  # A seed ensemble: one flagfile, one directory per member.
  assert TrainConfig(workdir="ens/seed{seed}", seed=7).workdir == "ens/seed7"
  assert TrainConfig(workdir="cv/f{fold}s{seed}", num_folds=2, fold=1,
                     seed=3).workdir == "cv/f1s3"
  # config.json holds the resolved directory; reading it back keeps it.
  config = TrainConfig(workdir="r{fold}", num_folds=2, fold=1)
  assert TrainConfig(**config.to_dict()).workdir == "r1"


def test_negative_weight_decay_is_refused():
  # A negative decay would grow the kernels every step, silently.
  with pytest.raises(config_lib.ConfigError, match="weight_decay must be >= 0"):
    config_lib.TrainConfig(weight_decay=-0.05).validate()
  config_lib.TrainConfig(weight_decay=0.05).validate()


@pytest.mark.parametrize("field,bad,good", [
    # -5 made the epoch loop take negative steps forever: a silent hang.
    ("checkpoint_every_steps", -5, 0),
    ("log_every_steps", -1, 0),
    ("shuffle_blocks", 0, 1),
    ("mix_size", 0, 1),
    ("cpu_logical_devices", -2, 0),
    ("adam_beta1", 1.0, 0.0),
    ("adam_beta1", -0.1, 0.99),
    ("adam_beta2", 1.5, 0.0),
    ("adam_beta2", float("nan"), 0.999),
    ("momentum", 1.0, 0.0),
    ("momentum", -0.1, 0.99),
    ("adam_epsilon", 0.0, 1e-12),
    ("adam_epsilon", float("inf"), 1.0),
    # Checked before only by the Augmenter, built after every shard was
    # scanned, and as a plain ValueError.
    ("color_jitter", 1.0, 0.99),
    ("stain_jitter", -0.1, 0.0),
    ("stain_jitter", float("nan"), 0.05),
])
def test_out_of_range_value_is_a_config_error_naming_it(field, bad, good):
  with pytest.raises(config_lib.ConfigError, match=f"^{field} must be"):
    config_lib.TrainConfig(**{field: bad}).validate()
  config_lib.TrainConfig(**{field: good}).validate()  # The edge is allowed.


def test_jitter_ranges_are_the_augmenters():
  """TrainConfig.validate and the Augmenter accept exactly the same values."""
  from hcd.models import augment  # pylint: disable=g-import-not-at-top
  assert set(augment.JITTER_RANGES) == {"color_jitter", "stain_jitter",
                                        "hue_jitter"}
  for name, (low, high, _) in augment.JITTER_RANGES.items():
    for value in (low - 1e-6, low, (low + high) / 2, high, high + 1e-6):
      try:
        augment.build_augmenter(**{name: value})
      except ValueError as e:
        augmenter_error = str(e)
      else:
        augmenter_error = None
      try:
        config_lib.TrainConfig(**{name: value}).validate()
      except config_lib.ConfigError as e:
        config_error = str(e)
      else:
        config_error = None
      assert config_error == augmenter_error, (name, value)
