"""Which images a run trains and validates on: splits, folds, balance.

Planning reads the shards' ids and labels once (`shard_reader.scan_ids`,
no pixels) and returns exact counts; the tf.data pipeline
(hcd/data/pipeline.py) then selects the same images block by block with
`select_mask`.

The split is deterministic and stable by id: an image goes to validation when
`Fingerprint64("<seed>:<key>") mod 2^62 < fraction * 2^62`, where the key is
its id or, with a group CSV, its group (so no group crosses the split).
Fingerprint64 (tf.strings.to_hash_bucket_fast) is a fixed function of the
bytes, stable across platforms and TensorFlow versions. K folds cut the same
hash range into K equal parts.

Balancing (training subset only; validation is never rebalanced):
  undersample: keep, per class, the `min_c n_c` images with the smallest
    balance hash, so both classes end with exactly equal counts (the
    notebook's 89,000 + 89,000 on the full Kaggle data); a fixed subset,
    as the notebook's `sample()`.
  reweight: keep everything, weight class c by N / (2 n_c).
  none: keep everything, weight 1.

`run_plan` takes a run's data settings (hcd.data.settings.DataSettings):
hcd_train passes those of its TrainConfig, hcd_evaluate those of the run's
saved config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import tensorflow as tf

from hcd.data import BALANCE_MODES
from hcd.data import manifest as manifest_lib
from hcd.data import sources
from hcd.data.shard_reader import check_shard_files
from hcd.data.shard_reader import PipelineError
from hcd.data.settings import DataSettings
from hcd.data.shard_reader import scan_ids

_HASH_BUCKETS = 1 << 62
_MAX_THRESHOLD = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """How to split a labelled shard split into training and validation.

  Attributes:
    val_fraction: fraction of ids (or groups) that go to validation; 0 means
      no validation subset. Ignored when num_folds > 1.
    seed: salt of the split hash; another seed gives another split.
    groups: optional id -> group mapping; ids missing from it are their own
      group.
    num_folds: K > 1 cuts the hash range into K equal folds (stable by id,
      or by group): fold `fold` validates, the other K-1 train, so the K
      runs of one seed see every image in validation exactly once.
    fold: the validation fold, 0..num_folds-1.
  """
  val_fraction: float = 0.2
  seed: int = 123
  groups: Mapping[str, str] | None = None
  num_folds: int = 0
  fold: int = 0

  @property
  def has_validation(self) -> bool:
    return self.num_folds > 1 or self.val_fraction > 0

  def hash_range(self) -> tuple[int, int]:
    """The [low, high) range of the split hash that is validation."""
    if self.num_folds > 1:
      return (self.fold * _HASH_BUCKETS // self.num_folds,
              (self.fold + 1) * _HASH_BUCKETS // self.num_folds)
    return 0, _val_cut(self.val_fraction)


@dataclasses.dataclass
class SubsetPlan:
  """One subset (train or val) of one shard split, with its selection rule.

  Attributes:
    shards_dir: the shards directory.
    split: the shard split name.
    files: full shard paths.
    role: "train" (not in the hash-validation part), "val" (in it) or "all".
    split_spec: the hash split, used unless role is "all".
    balance: one of BALANCE_MODES (train subsets only).
    thresholds: per-class max balance hash kept (undersample).
    class_weights: per-class weights (reweight).
    balance_seed: salt of the balance hash.
    label_counts: counts per label after selection and balancing.
    num_examples: images after selection and balancing.
  """
  shards_dir: str
  split: str
  files: list[str]
  role: str
  split_spec: SplitSpec
  balance: str = "none"
  thresholds: tuple[int, int] = (_MAX_THRESHOLD, _MAX_THRESHOLD)
  class_weights: tuple[float, float] = (1.0, 1.0)
  balance_seed: int = 0
  label_counts: dict[str, int] = dataclasses.field(default_factory=dict)
  num_examples: int = 0

  def summary(self) -> dict:
    """A JSON-friendly description (for config.json and logs)."""
    return {
        "split": self.split, "role": self.role, "balance": self.balance,
        "num_examples": self.num_examples, "label_counts": self.label_counts,
        "class_weights": list(self.class_weights),
        "num_files": len(self.files),
    }


@dataclasses.dataclass
class DataPlan:
  """The training and validation subsets of a run."""
  train: SubsetPlan
  val: SubsetPlan | None


def read_groups_csv(path: str) -> dict[str, str]:
  """Reads an `id,group` CSV (e.g. id -> slide) for the group split.

  Args:
    path: the CSV file, with a header naming `id` and `group` columns.

  Returns:
    dict id -> group.

  Raises:
    PipelineError: unreadable or malformed file, missing columns, empty or
      conflicting rows, naming the file and row.
  """
  groups: dict[str, str] = {}
  with sources.open_csv(path, ("id", "group"), "group CSV",
                        PipelineError) as (reader, header):
    i_id, i_group = header.index("id"), header.index("group")
    for rowno, (rid, grp) in sources.cells(reader, i_id, i_group):
      if not rid or not grp:
        raise PipelineError(f"{path}:{rowno}: empty id or group")
      if groups.get(rid, grp) != grp:
        raise PipelineError(f"{path}:{rowno}: id {rid} is in group {grp!r} "
                            f"but an earlier row put it in {groups[rid]!r}")
      groups[rid] = grp
  return groups


def salted_hash(keys, seed: int, salt: str = ""):
  """Stable 62-bit hash of string keys (graph and eager).

  Args:
    keys: tf.string tensor.
    seed: integer salt.
    salt: extra string salt (separates the split hash from the balance hash).

  Returns:
    int64 tensor of the keys' shape, uniform in [0, 2^62).
  """
  prefix = tf.constant(f"{salt}{seed}:")
  return tf.strings.to_hash_bucket_fast(tf.strings.join([prefix, keys]),
                                        _HASH_BUCKETS)


def _val_cut(fraction: float) -> int:
  return int(round(fraction * _HASH_BUCKETS))


def _group_keys(ids, table):
  return ids if table is None else table.lookup(ids)


def group_table(groups: Mapping[str, str] | None):
  if not groups:
    return None
  keys = tf.constant(list(groups.keys()), tf.string)
  vals = tf.constant(list(groups.values()), tf.string)
  # Ids without a group stand for themselves: a fresh group of one.
  return tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(keys, vals), default_value="")


def _is_val(ids, spec: SplitSpec, table):
  keys = _group_keys(ids, table)
  if table is not None:
    keys = tf.where(keys == "", ids, tf.strings.join(["group:", keys]))
  low, high = spec.hash_range()
  h = salted_hash(keys, spec.seed)
  return tf.logical_and(h >= low, h < high)


def select_mask(ids, labels, plan: SubsetPlan, table):
  """Boolean mask of the images of a block that belong to `plan`."""
  if plan.role == "all":
    mask = tf.ones_like(labels, tf.bool)
  else:
    is_val = _is_val(ids, plan.split_spec, table)
    mask = is_val if plan.role == "val" else tf.logical_not(is_val)
  if plan.balance == "undersample":
    thresholds = tf.constant(plan.thresholds, tf.int64)
    h = salted_hash(ids, plan.balance_seed, salt="balance-")
    lab = tf.clip_by_value(labels, 0, 1)
    mask = tf.logical_and(mask, h <= tf.gather(thresholds, lab))
  return mask


def _counts(labels: np.ndarray) -> dict[str, int]:
  return {str(c): int(np.sum(labels == c)) for c in (0, 1)}


def plan_subset(shards_dir: str, split: str, role: str,
                split_spec: SplitSpec, balance: str = "none",
                balance_seed: int = 0) -> SubsetPlan:
  """Plans one subset of a shard split: which images, how balanced.

  Over 60 lines only for documenting each argument.

  Args:
    shards_dir: the shards directory.
    split: the shard split name ("train", "valid", ...).
    role: "train", "val" or "all" (see SubsetPlan).
    split_spec: the hash split.
    balance: one of BALANCE_MODES.
    balance_seed: salt of the undersampling hash.

  Returns:
    The SubsetPlan, with exact counts.

  Raises:
    manifest_lib.ManifestError: missing or bad manifest (names the path).
    ShardFileError: a missing, truncated or corrupt shard (named).
    PipelineError: unknown balance mode, unlabelled images, empty subset.
  """
  if balance not in BALANCE_MODES:
    raise PipelineError(f"unknown balance mode {balance!r}; known: "
                        f"{list(BALANCE_MODES)}")
  manifest = manifest_lib.load_manifest(shards_dir, split)
  files = manifest_lib.shard_paths(shards_dir, manifest)
  where = manifest_lib.manifest_path(shards_dir, split)
  check_shard_files(files, manifest, where)
  ids, labels = scan_ids(files)
  if len(ids) != manifest["num_examples"]:
    raise PipelineError(f"{where}: manifest lists {manifest['num_examples']} "
                        f"images but the shards hold {len(ids)}; re-run "
                        f"tools/make_shards")
  if np.any((labels != 0) & (labels != 1)):
    raise PipelineError(f"{where}: split {split!r} has unlabelled images; "
                        f"training and validation need labels 0/1")
  plan = SubsetPlan(shards_dir, split, files, role, split_spec, balance,
                    balance_seed=balance_seed)
  if role == "all":
    keep = np.ones(len(ids), bool)
  else:
    table = group_table(split_spec.groups)
    is_val = _is_val(tf.constant(ids, tf.string), split_spec, table).numpy()
    keep = is_val if role == "val" else ~is_val
  sub = labels[keep]
  counts = np.array([np.sum(sub == 0), np.sum(sub == 1)])
  if balance == "undersample":
    h = salted_hash(tf.constant(ids[keep], tf.string), balance_seed,
                    salt="balance-").numpy()
    n_min = int(counts.min())
    thresholds = []
    for c in (0, 1):
      hc = np.sort(h[sub == c])
      thresholds.append(int(hc[n_min - 1]) if n_min > 0 else -1)
    plan.thresholds = tuple(thresholds)
    kept = h <= np.asarray(thresholds)[sub]
    sub = sub[kept]
  elif balance == "reweight":
    n = counts.sum()
    plan.class_weights = tuple(float(n / (2.0 * c)) if c else 0.0
                               for c in counts)
  plan.label_counts = _counts(sub)
  plan.num_examples = int(len(sub))
  if plan.num_examples == 0:
    how = (f"fold {split_spec.fold} of {split_spec.num_folds}"
           if split_spec.num_folds > 1 else
           f"val_fraction={split_spec.val_fraction}")
    raise PipelineError(f"{where}: the {role} subset of split {split!r} is "
                        f"empty ({how})")
  return plan


def whole_split(shards_dir: str, split: str) -> SubsetPlan:
  """Every image of a shard split, labelled or not, planned from its
  manifest alone (no scan: what evaluation and prediction of a whole split
  read).

  Raises:
    manifest_lib.ManifestError: missing or bad manifest (names the path).
    ShardFileError: a shard listed in the manifest is missing or has the
      wrong size.
  """
  manifest = manifest_lib.load_manifest(shards_dir, split)
  files = manifest_lib.shard_paths(shards_dir, manifest)
  check_shard_files(files, manifest,
                    manifest_lib.manifest_path(shards_dir, split))
  return SubsetPlan(shards_dir, split, files, "all", SplitSpec(),
                    label_counts=dict(manifest.get("label_counts") or {}),
                    num_examples=int(manifest["num_examples"]))


def make_plan(shards_dir: str, train_split: str = "train",
              val_split: str | None = None,
              split_spec: SplitSpec = SplitSpec(),
              balance: str = "undersample", seed: int = 0) -> DataPlan:
  """Plans a run's training and validation subsets.

  Args:
    shards_dir: the shards directory.
    train_split: the shard split to train on.
    val_split: a separate shard split to validate on (e.g. "valid"); when
      None, validation is the hash-split part of `train_split`.
    split_spec: the hash split (ignored with `val_split`).
    balance: balancing of the training subset (one of BALANCE_MODES).
    seed: salt of the undersampling hash.

  Returns:
    The DataPlan; `val` is None when there is no validation subset.

  Raises:
    manifest_lib.ManifestError, PipelineError: see `plan_subset`.
  """
  role = "train" if not val_split and split_spec.has_validation else "all"
  train = plan_subset(shards_dir, train_split, role, split_spec, balance, seed)
  return DataPlan(train, plan_validation(shards_dir, train_split, val_split,
                                         split_spec))


def plan_validation(shards_dir: str, train_split: str = "train",
                    val_split: str | None = None,
                    split_spec: SplitSpec = SplitSpec()) -> SubsetPlan | None:
  """Plans only the validation subset of a run (see `make_plan`).

  Returns:
    The validation SubsetPlan, or None when the run has no validation.
  """
  if val_split:
    return plan_subset(shards_dir, val_split, "all", split_spec)
  if split_spec.has_validation:
    return plan_subset(shards_dir, train_split, "val", split_spec)
  return None


def _split_spec(settings: DataSettings) -> SplitSpec:
  return SplitSpec(val_fraction=float(settings.val_fraction),
                   seed=int(settings.split_seed),
                   groups=(read_groups_csv(settings.group_csv)
                           if settings.group_csv else None),
                   num_folds=int(settings.num_folds), fold=int(settings.fold))


def run_plan(settings: DataSettings) -> DataPlan:
  """The training and validation subsets of a run, from its data settings.

  The one place that turns a run's settings into a DataPlan: hcd_train
  calls it with its TrainConfig's settings, hcd_evaluate
  (`run_validation_plan`) with those of the run's saved config.json, so
  evaluation rebuilds exactly the validation images the run was scored on
  (separate split, hash hold-out, fold or group split).

  Args:
    settings: the run's DataSettings (TrainConfig.data_settings()).

  Returns:
    The DataPlan.

  Raises:
    manifest_lib.ManifestError, PipelineError: see `plan_subset`;
      PipelineError also for an unreadable group CSV.
  """
  return make_plan(settings.shards_dir, settings.train_split,
                   settings.val_split or None, _split_spec(settings),
                   settings.balance, seed=int(settings.seed))


def run_validation_plan(settings: DataSettings) -> SubsetPlan | None:
  """Only the validation subset of `run_plan(settings)` (None if none).

  Raises:
    See `run_plan`.
  """
  return plan_validation(settings.shards_dir, settings.train_split,
                         settings.val_split or None, _split_spec(settings))
