"""The tf.data input pipeline, from a subset plan to uint8 batches.

Everything here is a pure function of its arguments (no flags, no globals).
The order of operations is fixed:

  subset plan (hcd/data/subsets.py) -> shard files -> (per-worker shard)
    -> file shuffle -> parallel interleave of TFRecord readers
    (hcd/data/shard_reader.py) -> parse blocks (<=256 images)
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
"""

from __future__ import annotations

import math

import tensorflow as tf

from hcd.data import features
from hcd.data import subsets
from hcd.data.shard_reader import read_blocks
from hcd.data.subsets import SubsetPlan


def _pipeline_index(input_context) -> tuple[int, int]:
  if input_context is None:
    return 1, 0
  return input_context.num_input_pipelines, input_context.input_pipeline_id


def subset_blocks(plan: SubsetPlan, *, with_ids: bool = False,
                  cycle_length: int = 4):
  """Every image of `plan` once, in shard order, as blocks (unbatched size).

  The one reader of a subset that validation (`eval_dataset`), evaluation
  and prediction (hcd.eval.inputs) share; they batch it their own way.

  Args:
    plan: the subset (a whole split: subsets.whole_split).
    with_ids: include the "id" strings.
    cycle_length: shard files read concurrently (the output order depends
      on it, deterministically).

  Returns:
    dataset of blocks {"image", "label", "weight"(, "id")}; see
    `select_blocks`.
  """
  records = read_blocks(plan.files, shuffle=False, seed=0, repeat=False,
                        cycle_length=cycle_length)
  return select_blocks(records, plan, with_ids=with_ids)


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
  table = (subsets.group_table(plan.split_spec.groups)
           if plan.role != "all" else None)
  weights = tf.constant(plan.class_weights, tf.float32)

  # A whole split keeps every image: no mask to copy every image through.
  keep_all = plan.role == "all" and plan.balance != "undersample"

  def select(serialized):
    block = features.parse_block(serialized)
    labels = block["label"]
    kept = {"image": block["image"], "label": labels}
    if with_ids:
      kept["id"] = block["id"]
    if not keep_all:
      mask = subsets.select_mask(block["id"], labels, plan, table)
      kept = {k: tf.boolean_mask(v, mask) for k, v in kept.items()}
    labels = kept["label"]
    kept["label"] = tf.cast(labels, tf.float32)
    kept["weight"] = tf.gather(weights, tf.clip_by_value(labels, 0, 1))
    return kept

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
  blocks = subset_blocks(plan, with_ids=with_ids, cycle_length=cycle_length)
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
