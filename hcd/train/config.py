"""TrainConfig: everything a training run needs, defined once.

The dataclass is the single source of the training settings: each field's
default, help text and allowed values live here, and hcd/cli/flags.py derives
hcd_train's absl flags from these fields (so a setting cannot exist in one
place and not the other). Tests build a TrainConfig directly; library code
takes a TrainConfig and never reads flags. The config is saved as
`<workdir>/config.json` (with what the run derived: parameter count,
strategy, subset sizes).

The enumerated values (balance modes, schedules, strategies, ...) are
defined here too; the modules that act on them import these tuples.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from typing import Any

from hcd.data import BALANCE_MODES
from hcd.data import settings as data_settings
from hcd.data.settings import DataSettings

LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd")
MIX_MODES = ("none", "mixup")
STRATEGIES = ("auto", "mirrored", "multiworker", "one_device")
JIT_MODES = ("auto", "true", "false")
PRECISIONS = ("none", "bf16", "fp16", "auto")


class ConfigError(ValueError):
  """An invalid training setting; the message names it and what is allowed."""


def parse_model_overrides(items) -> dict:
  """`--model_override` values ("key=value", Python literals) as a dict.

  Raises:
    ConfigError: an item without "key=".
  """
  out = {}
  for item in items:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"--model_override={item!r}: expected key=value")
    try:
      out[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      out[key] = raw  # A bare word is a string, e.g. weights=imagenet.
  return out


def _check(cond, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def _model_names() -> list[str]:
  from hcd import models  # pylint: disable=g-import-not-at-top
  return models.model_names()


def _stain_norms() -> tuple[str, ...]:
  from hcd import models  # pylint: disable=g-import-not-at-top
  return models.STAIN_NORMS


def setting(default, help: str, choices=None, group: str = "",
            **kwargs):  # pylint: disable=redefined-builtin
  """A TrainConfig field with its flag help text and allowed values.

  Args:
    default: the default value (also the flag's).
    help: the flag's help text.
    choices: allowed values (a tuple, or a callable returning them).
    group: the --help section ("data", "model", "augmentation", "runtime").
    **kwargs: passed to dataclasses.field (e.g. default_factory).

  Returns:
    A dataclasses.field carrying the metadata hcd/cli/flags.py reads.
  """
  metadata = {"help": help, "choices": choices, "group": group}
  if "default_factory" in kwargs:
    return dataclasses.field(metadata=metadata, **kwargs)
  return dataclasses.field(default=default, metadata=metadata, **kwargs)


# config.json entries that say where a run is and how it logs, not what it
# trains: they may differ between the folds of one experiment
# (hcd.eval.crossval) and when a run is resumed (hcd.train.loop).
BOOKKEEPING_KEYS = frozenset({
    "workdir", "runtime", "tensorboard", "log_every_steps",
    "checkpoint_every_steps", "steps_per_loop",
})


@dataclasses.dataclass
class TrainConfig:
  """A training run; see each field's help (also `hcd_train --help`)."""
  # --- data ---
  shards_dir: str = setting(
      "shards", "Directory with the shard manifests (tools/make_shards).",
      group="data")
  workdir: str = setting(
      "", "Run directory for checkpoints and artifacts; default "
      "runs/<model>, runs/<model>_fold<fold> with --num_folds. '{fold}' in "
      "it stands for --fold and '{seed}' for --seed, so one flagfile serves "
      "every fold, or every member of a seed ensemble. An existing "
      "run there is resumed (refused if its settings differ).",
      group="data")
  train_split: str = setting("train", "Shard split to train on.",
                             group="data")
  val_split: str = setting(
      "", "Separate shard split to validate on (e.g. valid). Empty: hold "
      "out --val_fraction (or fold --fold of --num_folds) of --train_split "
      "by id hash.", group="data")
  val_fraction: float = setting(
      0.2, "Fraction of ids (or groups) held out for validation; 0 trains on "
      "everything without validation. Ignored with --num_folds.",
      group="data")
  num_folds: int = setting(
      0, "K-fold cross-validation: split --train_split into K folds by id "
      "hash (by group with --group_csv) and validate on fold --fold; 0 or 1: "
      "no folds. Train one run per fold, then hcd_predict --ensemble over "
      "them.", group="data")
  fold: int = setting(0, "The validation fold, 0..num_folds-1.",
                      group="data")
  split_seed: int = setting(
      123, "Salt of the id hash that splits train/validation (and folds).",
      group="data")
  group_csv: str = setting(
      "", "CSV with columns id,group (e.g. slide): no group is split between "
      "training and validation.", group="data")
  balance: str = setting(
      "undersample", "Class balance of the training subset: undersample the "
      "majority class to equal counts (the notebook), none, or reweight "
      "examples by inverse class frequency.", choices=BALANCE_MODES,
      group="data")
  cache: bool = setting(
      True, "Keep the selected training images in memory after the first "
      "pass (uint8: 27.6 KB per image).", group="data")
  shuffle_blocks: int = setting(
      16, "Blocks of <=256 images in the shuffle buffer.", group="data")
  mix_size: int = setting(1024, "Images permuted together before batching.",
                          group="data")
  # --- model and optimisation ---
  model: str = setting(
      "model1", "Model from the hcd.models table (python -m hcd.models).",
      choices=_model_names, group="model")
  model_overrides: dict[str, Any] = setting(
      None, "Model builder argument as key=value (a Python literal), e.g. "
      "--model_override=dropout=0.3; repeatable.", group="model",
      default_factory=dict)
  seed: int = setting(
      123, "Seed of initialisation, shuffling, augmentation and "
      "undersampling.", group="model")
  batch_size: int = setting(32, "Global batch size (all replicas).",
                            group="model")
  epochs: int = setting(10, "Epochs to train.", group="model")
  steps_per_epoch: int = setting(
      0, "Steps per epoch; 0: one pass over the training subset.",
      group="model")
  val_steps: int = setting(
      0, "Validation steps per epoch; 0: the whole subset.", group="model")
  learning_rate: float | None = setting(
      None, "Peak learning rate; default: the model's (hcd.models).",
      group="model")
  optimizer: str = setting(
      "adam", "adam: Adam (AdamW with --weight_decay); sgd: SGD with "
      "Nesterov momentum (--momentum), the classic ResNet optimizer. Either "
      "way --weight_decay is multiplied by the learning rate (w -= lr * wd "
      "* w), so SGD at lr 0.1 wants about 5e-4 where AdamW at 4e-3 wants "
      "0.05.", choices=OPTIMIZERS,
      group="model")
  momentum: float = setting(0.9, "SGD momentum (Nesterov); --optimizer=sgd "
                            "only.", group="model")
  adam_beta1: float = setting(0.9, "Adam beta_1.", group="model")
  adam_beta2: float = setting(0.999, "Adam beta_2.", group="model")
  adam_epsilon: float = setting(1e-7, "Adam epsilon.", group="model")
  weight_decay: float = setting(
      0.0, "Decoupled (AdamW) weight decay of the kernels; BatchNorm "
      "scales/offsets and biases are not decayed (0: off).", group="model")
  lr_schedule: str = setting(
      "constant", "Learning-rate schedule: constant, or linear warm-up then "
      "cosine decay to 0 over all steps.", choices=LR_SCHEDULES,
      group="model")
  warmup_epochs: float = setting(0.0, "Warm-up epochs (cosine schedule).",
                                 group="model")
  time_budget_min: float = setting(
      0.0, "Wall-clock minutes for the epochs (training and validation; "
      "start-up and the final artifacts come on top). After epoch "
      "max(2, ceil(warmup_epochs)) the run measures its pace and trains the "
      "whole epochs that fit, then a shorter last one with the steps still "
      "left (at most --epochs); with the cosine schedule the peak learning "
      "rate holds until then and the cosine anneals to 0 over the steps "
      "left, so the model is annealed when the budget ends. After every "
      "later epoch but the last it plans again at the pace of the last two "
      "epochs (a box's speed drifts within a run): the cosine's end moves, "
      "its current value does not. Each plan is logged and checkpointed. "
      "0: no budget, train --epochs.",
      group="model")
  label_smoothing: float = setting(0.0, "Binary label smoothing.",
                                   group="model")
  ema_decay: float = setting(
      0.0, "Exponential moving average of the weights (and BatchNorm "
      "statistics) with this decay, e.g. 0.999; validation, best.keras and "
      "model.keras then use the averaged weights. At step t the decay is "
      "min(ema_decay, (1+t)/(10+t)), so for the first ~10/(1-ema_decay) "
      "steps the warm-up governs and the average spans about the last "
      "fifth of the steps so far. 0: off.", group="model")
  # --- augmentation (in the train step, on the accelerator) ---
  flips: bool = setting(
      True, "Random horizontal and vertical flips (the notebook).",
      group="augmentation")
  rot90: bool = setting(
      False, "Random 90-degree rotations (with --flips: the full dihedral "
      "group D4).", group="augmentation")
  color_jitter: float = setting(
      0.0, "Brightness/contrast/saturation jitter strength (0: off, ~0.1 "
      "mild).", group="augmentation")
  hue_jitter: float = setting(
      0.0, "HSV hue shift, uniform in +-this fraction of a turn (0: off, "
      "~0.04 mild).", group="augmentation")
  stain_jitter: float = setting(
      0.0, "H&E stain jitter sigma (0: off, ~0.05 'HED-light'); helps on "
      "slides from other labs.", group="augmentation")
  stain_norm: str = setting(
      "none", "Stain normalisation inside the model, so slides in other "
      "labs' stains look alike to it (and the exported model carries it): "
      "'reinhard' maps every input's L*a*b* mean and deviation to one "
      "reference, 'macenko' its H&E stain vectors and concentrations; "
      "'none' is off.",
      choices=_stain_norms, group="augmentation")
  mix: str = setting(
      "none", "Batch mixing: mixup (images and labels blended with a "
      "partner's), or none.", choices=MIX_MODES, group="augmentation")
  mix_alpha: float = setting(
      0.2, "Beta(alpha, alpha) of the mixing weight for --mix.",
      group="augmentation")
  # --- runtime ---
  strategy: str = setting(
      "auto", "Distribution strategy; auto: multiworker with a TF_CONFIG "
      "cluster, mirrored with several devices, else one device.",
      choices=STRATEGIES, group="runtime")
  jit_compile: str = setting(
      "auto", "XLA-compile the per-replica step; auto: on with a GPU, off on "
      "the CPU (XLA measured 3-4x slower there).", choices=JIT_MODES,
      group="runtime")
  mixed_precision: str = setting(
      "none", "Mixed precision (fp16 adds dynamic loss scaling); auto: bf16 "
      "on GPUs >= sm80 and CPUs with AMX-BF16 or AVX512-BF16, fp16 on sm7x GPUs, else none.",
      choices=PRECISIONS, group="runtime")
  cpu_logical_devices: int = setting(
      0, "Split the CPU into N logical devices (multi-replica tests on a "
      "CPU-only machine).", group="runtime")
  steps_per_loop: int = setting(
      50, "Train steps per tf.function call (dispatch overhead).",
      group="runtime")
  checkpoint_every_steps: int = setting(
      0, "Also checkpoint every N steps (0: at epoch ends).", group="runtime")
  log_every_steps: int = setting(
      0, "Log a progress line every N steps instead of a progress bar (0: "
      "progress bar).", group="runtime")
  tensorboard: bool = setting(True, "Write TensorBoard summaries.",
                              group="runtime")

  def __post_init__(self):
    if not self.workdir:
      self.workdir = (f"runs/{self.model}_fold{{fold}}" if self.num_folds > 1
                      else f"runs/{self.model}")
    # A plain replace, not str.format: other braces stay as the user wrote.
    self.workdir = self.workdir.replace("{fold}", str(self.fold)).replace(
        "{seed}", str(self.seed))

  @property
  def model_kwargs(self) -> dict[str, Any]:
    """The model builder's arguments: --model_override and --stain_norm."""
    if self.stain_norm == "none":
      return dict(self.model_overrides)
    return {**self.model_overrides, "stain_norm": self.stain_norm}

  def validate(self) -> None:
    """Checks every value against its allowed range or choices.

    Pure checks of the values: nothing is read, so an invalid run fails
    before any data is scanned or anything is written.

    Raises:
      ConfigError: naming the setting and the allowed values.
    """
    for f in dataclasses.fields(self):
      choices = f.metadata.get("choices")
      if choices is None:
        continue
      choices = tuple(choices() if callable(choices) else choices)
      value = getattr(self, f.name)
      noun = f.name.replace("_", " ")
      _check(value in choices, f"unknown {noun} {value!r}; known {noun}s: "
             f"{', '.join(choices)}")
    self._check_data()
    self._check_optimisation()
    self._check_runtime()
    self._check_augmentation()

  def _check_data(self) -> None:
    _check(0.0 <= self.val_fraction < 1.0,
           f"val_fraction must be in [0, 1), got {self.val_fraction}")
    _check(self.num_folds >= 0,
           f"num_folds must be >= 0, got {self.num_folds}")
    if self.num_folds > 1:
      _check(0 <= self.fold < self.num_folds,
             f"fold must be in 0..{self.num_folds - 1}, got {self.fold}")
      _check(not self.val_split, "num_folds and val_split exclude each "
             "other: folds split --train_split itself")
    else:
      _check(self.fold == 0, f"fold={self.fold} needs num_folds > 1")
    _check(self.shuffle_blocks >= 1,
           f"shuffle_blocks must be >= 1, got {self.shuffle_blocks}")
    _check(self.mix_size >= 1, f"mix_size must be >= 1 (values up to "
           f"batch_size mix within each batch), got {self.mix_size}")

  def _check_optimisation(self) -> None:
    _check(self.batch_size > 0,
           f"batch_size must be > 0, got {self.batch_size}")
    _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
    _check(self.steps_per_epoch >= 0, "steps_per_epoch must be >= 0")
    _check(self.val_steps >= 0, "val_steps must be >= 0")
    _check(self.learning_rate is None or self.learning_rate > 0,
           f"learning_rate must be > 0, got {self.learning_rate}")
    _check(0.0 <= self.label_smoothing < 1.0,
           "label_smoothing must be in [0,1)")
    _check(self.warmup_epochs >= 0, "warmup_epochs must be >= 0")
    _check(self.time_budget_min >= 0,
           f"time_budget_min must be >= 0, got {self.time_budget_min}")
    _check(self.weight_decay >= 0.0,
           f"weight_decay must be >= 0, got {self.weight_decay}")
    _check(0.0 <= self.ema_decay < 1.0,
           f"ema_decay must be in [0, 1), got {self.ema_decay}")
    # Written so that NaN fails the comparison and is refused: Adam divides
    # by 1 - beta**t and by sqrt(v) + epsilon.
    for name in ("adam_beta1", "adam_beta2"):
      value = getattr(self, name)
      _check(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")
    _check(0.0 <= self.momentum < 1.0,
           f"momentum must be in [0, 1), got {self.momentum}")
    _check(0.0 < self.adam_epsilon < math.inf,
           f"adam_epsilon must be > 0 and finite, got {self.adam_epsilon}")

  def _check_runtime(self) -> None:
    _check(self.steps_per_loop > 0, "steps_per_loop must be > 0")
    _check(self.cpu_logical_devices >= 0, f"cpu_logical_devices must be >= "
           f"0 (0 or 1: the CPU is not split), got "
           f"{self.cpu_logical_devices}")
    # A negative cadence would make the epoch loop take negative steps and
    # spin forever without training (step % -N is <= 0).
    _check(self.checkpoint_every_steps >= 0, f"checkpoint_every_steps must "
           f"be >= 0 (0: checkpoint at epoch ends), got "
           f"{self.checkpoint_every_steps}")
    _check(self.log_every_steps >= 0, f"log_every_steps must be >= 0 (0: a "
           f"progress bar), got {self.log_every_steps}")

  def _check_augmentation(self) -> None:
    _check(self.mix_alpha > 0, f"mix_alpha must be > 0, got {self.mix_alpha}")
    # The jitter ranges live with the augmenter that applies them; checked
    # here too so that a bad value fails before the data plan scans every
    # shard. Imported here: hcd.models.augment imports TensorFlow, and this
    # module must stay importable without it.
    from hcd.models import augment  # pylint: disable=g-import-not-at-top
    try:
      augment.check_augment_args(color_jitter=self.color_jitter,
                                 stain_jitter=self.stain_jitter,
                                 hue_jitter=self.hue_jitter)
    except ValueError as e:
      raise ConfigError(str(e)) from None

  def data_settings(self) -> DataSettings:
    """The settings the data layer plans this run's subsets from."""
    return DataSettings(**{name: getattr(self, name)
                           for name in data_settings.FIELDS})

  def to_dict(self) -> dict:
    """The config as a JSON-friendly dict."""
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    """Builds a config from a dict, ignoring keys it does not know.

    Unknown keys are the derived entries that config.json adds
    (num_params, runtime, ...).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})
