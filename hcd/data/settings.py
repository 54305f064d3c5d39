"""The data settings of a run, as the data layer takes them.

`DataSettings` names what decides which images a run trains and validates
on. It has no defaults on purpose: hcd_train's TrainConfig holds them
(hcd/train/config.py, `TrainConfig.data_settings()`), so a setting is
defined once and a saved config.json means what it meant to hcd_train.
This module imports nothing heavy, so a config can build its settings
without TensorFlow.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Which shards a run reads and how it splits and balances them.

  Attributes:
    shards_dir: the shards directory.
    train_split: the shard split to train on.
    val_split: a separate shard split to validate on ("" for none).
    val_fraction: fraction of ids (or groups) held out for validation.
    split_seed: salt of the id hash that splits train/validation (folds).
    group_csv: CSV with columns id,group ("" for none).
    num_folds: K-fold cross-validation (0 or 1: no folds).
    fold: the validation fold.
    balance: the training subset's class balance (hcd.data.BALANCE_MODES).
    seed: salt of the undersampling hash.
  """
  shards_dir: str
  train_split: str
  val_split: str
  val_fraction: float
  split_seed: int
  group_csv: str
  num_folds: int
  fold: int
  balance: str
  seed: int


FIELDS = tuple(f.name for f in dataclasses.fields(DataSettings))
