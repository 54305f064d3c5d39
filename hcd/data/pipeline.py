"""The tf.data input pipeline, from a shard manifest to uint8 batches.

Everything here is a pure function of its arguments (no flags, no globals).
The order of operations is fixed:

  manifest -> shard files -> (per-worker shard) -> file shuffle
    -> parallel interleave of TFRecord readers -> parse blocks (<=256 images)
    -> select by id: hash split (or group split) + class balance, per block
    -> [cache] -> repeat -> block shuffle -> mix images -> batch -> prefetch

Why blocks all the way down: one-image records cap 2 cores at ~35k records/s
and per-element tf.data ops (unbatch, shuffle, batch) cost about as much
again, so selection, shuffling and batching all work on whole tensors. The
image-level shuffle is "block shuffle + mix": blocks are shuffled in a
buffer, `rebatch` concatenates several of them into a chunk, the chunk is
permuted with a stateless seed and re-sliced into batches. Shards already
store images in id-hash order, so a block is itself a random sample.

Batches are uint8 dicts {"image": [B,96,96,3], "label": float32 [B],
"weight": float32 [B]} with static shapes; the cast, /255 and augmentation
run on the accelerator inside the train step (4x fewer bytes to the device).

The split is deterministic and stable by id: an image goes to validation when
`Fingerprint64("<seed>:<key>") mod 2^62 < fraction * 2^62`, where the key is
its id or, with a group CSV, its group (so no group crosses the split).
Fingerprint64 (tf.strings.to_hash_bucket_fast) is a fixed function of the
bytes, stable across platforms and TensorFlow versions.

Balancing (training subset only; validation is never rebalanced):
  undersample: keep, per class, the `min_c n_c` images with the smallest
    balance hash, so both classes end with exactly equal counts (the
    notebook's 89,000 + 89,000 on the full Kaggle data); a fixed subset,
    as the notebook's `sample()`.
  reweight: keep everything, weight class c by N / (2 n_c).
  none: keep everything, weight 1.
Exact counts need one pass over the ids (`make_plan`), which reads the shards
once but copies no pixels.

Shard files are opened in tf.data in one place, `read_blocks`: training,
validation, the id scan of planning, and evaluation and prediction
(hcd.eval.inputs) all read through it. Before reading, `check_shard_files`
stats every shard against its manifest (missing, truncated); a record that
fails its CRC while reading (a DataLossError, which names no file) is traced
to its shard by `naming_bad_shard`. Either way the error names the shard and
the remedy (`tools/make_shards --verify`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf

from hcd.data import features
from hcd.data import manifest as manifest_lib
from hcd.data import sources
from hcd.data import BALANCE_MODES

_HASH_BUCKETS = 1 << 62
_MAX_THRESHOLD = np.iinfo(np.int64).max


class PipelineError(ValueError):
  """Bad pipeline input (group CSV, unlabelled training data, empty split)."""


class ShardFileError(PipelineError):
  """A shard that is missing, of the wrong size or unreadable.

  The message names the shard file and the remedy.
  """


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


def _group_table(groups: Mapping[str, str] | None):
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


def _select_mask(ids, labels, plan: SubsetPlan, table):
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


def scan_ids(files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Reads every id and label of some shards without copying pixels.

  Args:
    files: shard paths.

  Returns:
    (ids as an object array of bytes, labels int64), in read order.

  Raises:
    ShardFileError: a shard with a corrupt record (named).
  """
  spec = {features.KEY_IDS: tf.io.RaggedFeature(tf.string),
          features.KEY_LABELS: tf.io.RaggedFeature(tf.int64)}

  def parse(serialized):
    parsed = tf.io.parse_example(serialized, spec)
    return (parsed[features.KEY_IDS].flat_values,
            parsed[features.KEY_LABELS].flat_values)

  ds = read_blocks(files).batch(64).map(parse,
                                        num_parallel_calls=tf.data.AUTOTUNE)
  ids, labels = [], []
  with naming_bad_shard(files):
    for i, l in ds.prefetch(2).as_numpy_iterator():
      ids.append(i)
      labels.append(l)
  if not ids:
    return np.zeros(0, object), np.zeros(0, np.int64)
  return np.concatenate(ids), np.concatenate(labels)


def _counts(labels: np.ndarray) -> dict[str, int]:
  return {str(c): int(np.sum(labels == c)) for c in (0, 1)}


def plan_subset(shards_dir: str, split: str, role: str,
                split_spec: SplitSpec, balance: str = "none",
                balance_seed: int = 0) -> SubsetPlan:
  """Plans one subset of a shard split: which images, how balanced.

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
    table = _group_table(split_spec.groups)
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


def _run_settings(config) -> tuple[dict, SplitSpec]:
  # Attributes only, no defaults here: TrainConfig holds them (a saved
  # config.json goes through TrainConfig.from_dict), so a setting missing
  # from a file means what it means to hcd_train.
  spec = SplitSpec(val_fraction=float(config.val_fraction),
                   seed=int(config.split_seed),
                   groups=(read_groups_csv(config.group_csv)
                           if config.group_csv else None),
                   num_folds=int(config.num_folds), fold=int(config.fold))
  where = {"shards_dir": config.shards_dir,
           "train_split": config.train_split,
           "val_split": config.val_split or None}
  return {**where, "balance": config.balance, "seed": int(config.seed)}, spec


def run_plan(config) -> DataPlan:
  """The training and validation subsets of a run, from its config.

  The one place that turns a run's settings into a DataPlan: hcd_train
  calls it with its TrainConfig, hcd_evaluate (`run_validation_plan`) with
  that of the run's saved config.json, so evaluation rebuilds exactly the
  validation images the run was scored on (separate split, hash hold-out,
  fold or group split).

  Args:
    config: a TrainConfig (a saved config.json through
      TrainConfig.from_dict).

  Returns:
    The DataPlan.

  Raises:
    manifest_lib.ManifestError, PipelineError: see `plan_subset`;
      PipelineError also for an unreadable group CSV.
  """
  s, spec = _run_settings(config)
  return make_plan(s["shards_dir"], s["train_split"], s["val_split"], spec,
                   s["balance"], seed=s["seed"])


def run_validation_plan(config) -> SubsetPlan | None:
  """Only the validation subset of `run_plan(config)` (None if it has none).

  Raises:
    See `run_plan`.
  """
  s, spec = _run_settings(config)
  return plan_validation(s["shards_dir"], s["train_split"], s["val_split"],
                         spec)


# ----------------------------------------------------------------------------
# Datasets.


def _pipeline_index(input_context) -> tuple[int, int]:
  if input_context is None:
    return 1, 0
  return input_context.num_input_pipelines, input_context.input_pipeline_id


def read_blocks(files: Sequence[str], *, shuffle: bool = False, seed: int = 0,
                repeat: bool = False, cycle_length: int = 4):
  """Serialized blocks from shard files: the one place shards are opened.

  Every reader of shards in tf.data goes through here (training,
  validation, planning's id scan, evaluation and prediction), so buffering,
  interleaving and the CRC checks of TFRecordDataset are the same for all.

  Args:
    files: shard paths.
    shuffle: shuffle the file order (again on every pass).
    seed: shuffle seed.
    repeat: repeat forever.
    cycle_length: files read concurrently (records interleave one by one
      across them, in a deterministic order).

  Returns:
    tf.data.Dataset of scalar tf.string records.
  """
  ds = tf.data.Dataset.from_tensor_slices(list(files))
  if shuffle:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  return ds.interleave(
      lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
      cycle_length=max(1, min(cycle_length, len(files))),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _verify_hint(path: str) -> str:
  return (f"check the shards with tools/make_shards --verify "
          f"--out_dir={os.path.dirname(path) or '.'} and rewrite the bad ones "
          f"with tools/make_shards")


def check_shard_files(files: Sequence[str], manifest: dict,
                      where: str) -> None:
  """Checks that every shard of a manifest exists with its recorded size.

  A stat per file, no reading: cheap enough to run before every read, and
  it catches missing and truncated shards before tf.data fails on them.

  Args:
    files: the manifest's shard paths, in manifest order.
    manifest: the manifest (its "shards" entries give the sizes).
    where: the manifest's path, for messages.

  Raises:
    ShardFileError: the first missing or wrongly sized shard, named with
      the remedy.
  """
  for path, entry in zip(files, manifest.get("shards", [])):
    try:
      size = os.stat(path).st_size
    except OSError as e:
      raise ShardFileError(f"{path}: {e.strerror.lower()} (listed in "
                           f"{where}); {_verify_hint(path)}") from None
    want = entry.get("bytes")
    if want is not None and size != want:
      raise ShardFileError(f"{path}: {size} bytes, {where} says {want} "
                           f"(truncated or replaced); {_verify_hint(path)}")


def op_message(e) -> str:
  """A TensorFlow error's own words, in one line.

  Drops what TensorFlow wraps them in: the "Graph execution error:" header,
  the Python stack of the node, `{{function_node ...}}` and `[Op:...]`.
  """
  in_stack = False
  for line in str(e.message).splitlines():
    text = line.strip()
    if text.startswith("Detected at node"):
      in_stack = True
      continue
    if (not text or text == "Graph execution error:" or
        in_stack and line[:1].isspace()):
      continue
    in_stack = False
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text).split(" [Op:", 1)[0].strip()
    if text:
      return text
  return type(e).__name__


def unreadable_shard(files: Sequence[str]) -> ShardFileError | None:
  """Rereads shards one at a time and returns the first that fails.

  TFRecordDataset checks every record's CRCs, but its error ("corrupted
  record at N") names no file; reading each shard alone does.

  Args:
    files: shard paths.

  Returns:
    A ShardFileError naming the first unreadable shard, or None when all
    read.
  """
  for path in files:
    try:
      read_blocks([path]).reduce(np.int64(0), lambda n, _: n + 1)
    except tf.errors.OpError as e:
      return ShardFileError(f"{path}: {op_message(e)}; {_verify_hint(path)}")
  return None


@contextlib.contextmanager
def naming_bad_shard(files: Sequence[str],
                     errors: tuple = (tf.errors.DataLossError,)
                     ) -> Iterator[None]:
  """Turns a read failure inside the block into an error naming the shard.

  Args:
    files: the shards the block reads.
    errors: the exception types that may come from a bad shard.

  Raises:
    ShardFileError: when one of `files` does not read back; otherwise the
      original error.
  """
  try:
    yield
  except errors:
    bad = unreadable_shard(files)
    if bad is None:
      raise
    raise bad from None


def select_blocks(records, plan: SubsetPlan, with_ids: bool = False):
  """Parses blocks and keeps the images of `plan`, with their weights.

  Args:
    records: dataset of serialized blocks.
    plan: the subset to keep.
    with_ids: keep the "id" strings (evaluation output needs them; training
      does not, and strings cannot go to an accelerator).

  Returns:
    dataset of blocks {"image" uint8 [n,96,96,3], "label" float32 [n],
    "weight" float32 [n] (, "id" string [n])}, n varying (may be 0).
  """
  table = _group_table(plan.split_spec.groups) if plan.role != "all" else None
  weights = tf.constant(plan.class_weights, tf.float32)

  def select(serialized):
    block = features.parse_block(serialized)
    labels = block["label"]
    mask = _select_mask(block["id"], labels, plan, table)
    labels = tf.boolean_mask(labels, mask)
    out = {
        "image": tf.boolean_mask(block["image"], mask),
        "label": tf.cast(labels, tf.float32),
        "weight": tf.gather(weights, tf.clip_by_value(labels, 0, 1)),
    }
    if with_ids:
      out["id"] = tf.boolean_mask(block["id"], mask)
    return out

  return records.map(select, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True)


def _mix(chunk, seed):
  n = tf.shape(chunk["label"])[0]
  order = tf.random.experimental.stateless_shuffle(tf.range(n), seed)
  return {k: tf.gather(v, order) for k, v in chunk.items()}


def _options(threads: int | None = None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # Sharding is done by hand below (per file or per element).
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)
  if threads:
    options.threading.private_threadpool_size = threads
  return options


def train_dataset(plan: SubsetPlan, batch_size: int, *, seed: int,
                  input_context=None, cache: bool = False,
                  shuffle_blocks: int = 16, mix_size: int = 1024,
                  cycle_length: int = 4, threads: int | None = None):
  """The infinite, shuffled training stream of uint8 batches.

  Epochs are counted in steps by the caller, so every worker of a
  multi-worker run takes the same number of steps (uneven shards would
  otherwise deadlock the collectives).

  Args:
    plan: the training subset.
    batch_size: the batch size of this pipeline (per replica under a
      strategy: `input_context.get_per_replica_batch_size(global)`).
    seed: shuffle seed; a restarted run passes a seed derived from its step
      so that the resumed stream is deterministic.
    input_context: tf.distribute.InputContext; with several input pipelines
      each one reads every N-th shard file (every N-th block when there are
      fewer files than pipelines).
    cache: keep the selected blocks in memory after the first pass.
    shuffle_blocks: blocks held in the shuffle buffer.
    mix_size: images permuted together before batching.
    cycle_length: shard files read concurrently.
    threads: private tf.data thread pool size (None: TensorFlow's default).

  Returns:
    tf.data.Dataset of {"image" uint8 [B,96,96,3], "label" float32 [B],
    "weight" float32 [B]} with a static batch dimension.
  """
  num, index = _pipeline_index(input_context)
  seed = int(seed) + 7919 * index
  files = list(plan.files)
  by_file = num > 1 and len(files) >= num
  if by_file:
    files = files[index::num]
  records = read_blocks(files, shuffle=not cache, seed=seed,
                        repeat=not cache, cycle_length=cycle_length)
  if num > 1 and not by_file:
    records = records.shard(num, index)
  blocks = select_blocks(records, plan)
  if cache:
    blocks = blocks.cache().repeat()
  blocks = blocks.shuffle(shuffle_blocks, seed=seed + 1,
                          reshuffle_each_iteration=True)
  chunks = blocks.rebatch(max(mix_size, batch_size), drop_remainder=False)
  seeds = tf.data.Dataset.random(seed=seed + 2).batch(2)
  chunks = tf.data.Dataset.zip(chunks, seeds).map(
      _mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  batches = chunks.rebatch(batch_size, drop_remainder=True)
  return batches.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))


def _pad_batch(batch, batch_size: int):
  """Pads a final partial batch with weight-0 images to a static size."""
  n = tf.shape(batch["label"])[0]
  out = {}
  for k, v in batch.items():
    pad = [[0, batch_size - n]] + [[0, 0]] * (len(v.shape) - 1)
    out[k] = tf.ensure_shape(tf.pad(v, pad), [batch_size] + v.shape[1:])
  return out


def _zero_batch(batch_size: int, with_ids: bool):
  z = {"image": tf.zeros((batch_size,) + features.IMAGE_SHAPE, tf.uint8),
       "label": tf.zeros([batch_size], tf.float32),
       "weight": tf.zeros([batch_size], tf.float32)}
  if with_ids:
    z["id"] = tf.fill([batch_size], "")
  return z


def eval_steps(plan: SubsetPlan, global_batch_size: int) -> int:
  """Steps that cover every image of `plan` once at this global batch size."""
  return max(1, math.ceil(plan.num_examples / global_batch_size))


def eval_dataset(plan: SubsetPlan, batch_size: int, *, steps: int | None = None,
                 input_context=None, with_ids: bool = False,
                 cycle_length: int = 4, threads: int | None = None):
  """The validation stream: every image once, in shard order, unaugmented.

  Batches have a static size: the last one is padded with weight-0 images
  (which every metric ignores), and under a strategy each pipeline emits
  exactly `steps` batches per local replica so all replicas run the same
  number of steps.

  Args:
    plan: the validation subset (never rebalanced).
    batch_size: batch size of this pipeline (per replica under a strategy).
    steps: global steps to emit; None emits every image once, then stops.
    input_context: tf.distribute.InputContext; pipelines take every N-th
      image.
    with_ids: include "id" strings (single-device prediction only).
    cycle_length: shard files read concurrently.
    threads: private tf.data thread pool size.

  Returns:
    tf.data.Dataset of {"image", "label", "weight"(, "id")} batches.
  """
  num, index = _pipeline_index(input_context)
  records = read_blocks(plan.files, shuffle=False, seed=0, repeat=False,
                        cycle_length=cycle_length)
  blocks = select_blocks(records, plan, with_ids=with_ids)
  if num > 1:
    # Per image, not per block: blocks vary in size after selection, and an
    # uneven split could need more steps on one worker than on another.
    blocks = blocks.unbatch().shard(num, index).batch(1024)
  batches = blocks.rebatch(batch_size, drop_remainder=False).map(
      lambda b: _pad_batch(b, batch_size))
  if steps is not None:
    local_replicas = 1
    if input_context is not None:
      local_replicas = max(1, input_context.num_replicas_in_sync // num)
    padding = tf.data.Dataset.from_tensors(
        _zero_batch(batch_size, with_ids)).repeat()
    batches = batches.concatenate(padding).take(steps * local_replicas)
  return batches.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))
