"""TrainConfig: everything a training run needs, as one plain dataclass.

Binaries build it from flags (hcd/cli/flags.py); tests build it directly.
Library code takes a TrainConfig and never reads flags. The config is saved
as `<workdir>/config.json` (with what the run derived: parameter count,
strategy, subset sizes).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


class ConfigError(ValueError):
  """An invalid training setting; the message names it and what is allowed."""


@dataclasses.dataclass
class TrainConfig:
  """A training run.

  Attributes:
    model: model name from the hcd.models table.
    shards_dir: directory with the shard manifests.
    workdir: the run directory (artifacts, checkpoints, logs).
    train_split: shard split to train on.
    val_split: separate shard split to validate on (e.g. "valid"); empty
      means the hash-split part of `train_split`.
    val_fraction: fraction of ids (or groups) held out for validation when
      `val_split` is empty; 0 disables validation.
    split_seed: seed of the id hash that splits train/validation.
    group_csv: optional `id,group` CSV; no group crosses the split.
    balance: "undersample", "none" or "reweight".
    seed: seed of weights initialisation, shuffling, augmentation and
      undersampling.
    batch_size: global batch size (over all replicas).
    epochs: epochs to train.
    steps_per_epoch: steps per epoch; 0 means one pass over the (balanced)
      training subset.
    val_steps: validation steps per epoch; 0 means the whole subset.
    learning_rate: peak learning rate; None means the model's default.
    adam_beta1, adam_beta2, adam_epsilon: Adam's moments and epsilon.
    weight_decay: decoupled weight decay (AdamW) when > 0.
    lr_schedule: "constant" or "cosine" (linear warm-up, cosine decay).
    warmup_epochs: warm-up length for the cosine schedule.
    label_smoothing: binary cross-entropy label smoothing.
    flips, rot90, color_jitter, stain_jitter: the training augmentation
      (hcd.models.augment.build_augmenter); never at evaluation.
    strategy: "auto", "mirrored", "multiworker" or "one_device".
    jit_compile: "auto", "true" or "false".
    mixed_precision: "none", "bf16" or "fp16".
    cpu_logical_devices: split the CPU into this many devices (tests).
    steps_per_loop: train steps per tf.function call.
    cache: keep the selected training images in memory after one pass.
    shuffle_blocks: blocks (<=256 images each) in the shuffle buffer.
    mix_size: images permuted together before batching.
    checkpoint_every_steps: also checkpoint every N steps (0: epoch ends).
    log_every_steps: log a progress line every N steps (0: progress bar).
    tensorboard: write TensorBoard summaries.
    model_overrides: keyword overrides for hcd.models.build_model.
  """
  model: str = "model1"
  shards_dir: str = "shards"
  workdir: str = "runs/model1"
  train_split: str = "train"
  val_split: str = ""
  val_fraction: float = 0.2
  split_seed: int = 123
  group_csv: str = ""
  balance: str = "undersample"
  seed: int = 123
  batch_size: int = 32
  epochs: int = 10
  steps_per_epoch: int = 0
  val_steps: int = 0
  learning_rate: float | None = None
  adam_beta1: float = 0.9
  adam_beta2: float = 0.999
  adam_epsilon: float = 1e-7
  weight_decay: float = 0.0
  lr_schedule: str = "constant"
  warmup_epochs: float = 0.0
  label_smoothing: float = 0.0
  flips: bool = True
  rot90: bool = False
  color_jitter: float = 0.0
  stain_jitter: float = 0.0
  strategy: str = "auto"
  jit_compile: str = "auto"
  mixed_precision: str = "none"
  cpu_logical_devices: int = 0
  steps_per_loop: int = 50
  cache: bool = True
  shuffle_blocks: int = 16
  mix_size: int = 1024
  checkpoint_every_steps: int = 0
  log_every_steps: int = 0
  tensorboard: bool = True
  model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

  def validate(self) -> None:
    """Checks values that flags cannot constrain on their own.

    Raises:
      ConfigError: naming the setting and the allowed values.
    """
    def check(cond, msg):
      if not cond:
        raise ConfigError(msg)
    check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
    check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
    check(self.steps_per_epoch >= 0, "steps_per_epoch must be >= 0")
    check(self.val_steps >= 0, "val_steps must be >= 0")
    check(0.0 <= self.val_fraction < 1.0,
          f"val_fraction must be in [0, 1), got {self.val_fraction}")
    check(self.balance in ("undersample", "none", "reweight"),
          f"balance must be undersample|none|reweight, got {self.balance!r}")
    check(self.lr_schedule in ("constant", "cosine"),
          f"lr_schedule must be constant|cosine, got {self.lr_schedule!r}")
    check(self.learning_rate is None or self.learning_rate > 0,
          f"learning_rate must be > 0, got {self.learning_rate}")
    check(self.steps_per_loop > 0, "steps_per_loop must be > 0")
    check(0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0,1)")
    check(self.warmup_epochs >= 0, "warmup_epochs must be >= 0")

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
