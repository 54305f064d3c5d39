"""The tf.data input pipeline: one builder for every batch a model sees.

Training, validation during training, evaluation and prediction batches
are all made here, in the one structure of hcd/data/batches.py (image
uint8, label int64 with -1 for unknown, weight float32, optional id).
Everything is a pure function of its arguments (no flags, no globals).
Two sources of blocks, one batching stage:

  shards: subset plan (hcd/data/subsets.py) -> shard files -> (per-worker
    shard) -> [file shuffle, repeat] -> parallel interleave of TFRecord
    readers (hcd/data/shard_reader.py) -> parse blocks (<=256 images)
    -> select by id: hash split (or group split) + class balance, per block
    -> [cache -> repeat]
  folder: image files -> read -> decode a block at a time in the graph
    (hcd/data/folder_reader.py)
  then `batch_blocks`: [block shuffle -> mix images] -> batch (drop, keep or
    pad the remainder) -> [pad to a number of batches] -> prefetch -> options

  train_dataset   training: shards, shuffled, repeated, static batches
  eval_dataset    validation (static batches padded with weight 0) and
                  evaluation/prediction of shards (pad=False, with ids)
  folder_dataset  evaluation/prediction of an image folder

Why blocks all the way down: one-image records cap 2 cores at ~35k
records/s and per-element tf.data ops (unbatch, shuffle, batch) cost about
as much again, so selection, shuffling and batching all work on whole
tensors. The image-level shuffle is "block shuffle + mix": blocks are
shuffled in a buffer, `rebatch` concatenates several of them into a chunk,
the chunk is permuted with a stateless seed and re-sliced into batches.
Shards already store images in id-hash order, so a block is itself a random
sample.

Pixels stay uint8; the cast, /255 and augmentation run on the accelerator
inside the train step (4x fewer bytes to the device), which also casts the
labels to float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import tensorflow as tf

from hcd.data import batches
from hcd.data import features
from hcd.data import folder_reader
from hcd.data import sources
from hcd.data import subsets
from hcd.data.shard_reader import read_blocks
from hcd.data.subsets import SubsetPlan

# Batches buffered ahead of the model when autotuning is off.
FIXED_PREFETCH = 2
REMAINDERS = ("drop", "keep", "pad")


def _pipeline_index(input_context) -> tuple[int, int]:
  if input_context is None:
    return 1, 0
  return input_context.num_input_pipelines, input_context.input_pipeline_id


def subset_blocks(plan: SubsetPlan, *, with_ids: bool = False,
                  cycle_length: int = 4):
  """Every image of `plan` once, in shard order, as blocks (unbatched size).

  The reader of a subset behind `eval_dataset`, which serves validation,
  evaluation and prediction alike.

  Args:
    plan: the subset (a whole split: subsets.whole_split).
    with_ids: include the "id" strings.
    cycle_length: shard files read concurrently (the output order depends
      on it, deterministically).

  Returns:
    dataset of blocks; see `select_blocks`.
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
    dataset of blocks in the hcd.data.batches structure: "image" uint8
    [n,96,96,3], "label" int64 [n], "weight" float32 [n] (the plan's class
    weight) (, "id" string [n]); n varies (may be 0).
  """
  table = (subsets.group_table(plan.split_spec.groups)
           if plan.role != "all" else None)
  weights = tf.constant(plan.class_weights, tf.float32)

  # A whole split keeps every image: no mask to copy every image through.
  keep_all = plan.role == "all" and plan.balance != "undersample"

  def select(serialized):
    block = features.parse_block(serialized)
    kept = {"image": block["image"], "label": block["label"]}
    if with_ids:
      kept["id"] = block["id"]
    if not keep_all:
      mask = subsets.select_mask(block["id"], block["label"], plan, table)
      kept = {k: tf.boolean_mask(v, mask) for k, v in kept.items()}
    labels = kept["label"]
    # Unknown labels (-1, a test split) are clipped to class 0's weight,
    # which is 1: a whole split is never reweighted.
    return batches.make(
        kept["image"], labels, ids=kept.get("id"),
        weight=tf.gather(weights, tf.clip_by_value(labels, 0, 1)))

  return records.map(select, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True)


@dataclasses.dataclass(frozen=True)
class Shuffle:
  """The image-level shuffle of a training stream ("block shuffle + mix").

  Attributes:
    seed: seed of the block shuffle; the mix permutations use seed + 1.
    buffer_blocks: blocks held in the shuffle buffer.
    mix_size: images permuted together before batching.
  """
  seed: int
  buffer_blocks: int = 16
  mix_size: int = 1024


def _mix(chunk, seed):
  n = tf.shape(chunk["label"])[0]
  order = tf.random.experimental.stateless_shuffle(tf.range(n), seed)
  return {k: tf.gather(v, order) for k, v in chunk.items()}


def _options(autotune: bool, threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # Sharding is done by hand (per file or per element), never by tf.data.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)
  # With autotuning, deleting a finished iterator sometimes blocked for
  # 10-30 s (TF 2.17, measured on 57k TIFFs: the autotuner thread is slow
  # to stop). Evaluation and prediction therefore run with fixed
  # parallelism and a 2-batch prefetch: as fast there, since the model,
  # not the input, is their bottleneck.
  options.autotune.enabled = autotune
  if threads:
    options.threading.private_threadpool_size = threads
  return options


def _pad_batch(batch, batch_size: int):
  """Pads a final partial batch with weight-0 images to a static size."""
  n = tf.shape(batch["label"])[0]
  out = {}
  for k, v in batch.items():
    pad = [[0, batch_size - n]] + [[0, 0]] * (len(v.shape) - 1)
    out[k] = tf.ensure_shape(tf.pad(v, pad), [batch_size] + v.shape[1:])
  return out


def batch_blocks(blocks, batch_size: int, *, remainder: str,
                 shuffle: Shuffle | None = None,
                 num_batches: int | None = None, autotune: bool = True,
                 threads: int | None = None):
  """The one batching stage: blocks of any size to batches, prefetched.

  Args:
    blocks: dataset of blocks in the hcd.data.batches structure, of any
      size (0 included).
    batch_size: images per batch.
    remainder: what becomes of a last partial batch: "drop" it (static
      shapes for an infinite stream, which has none), "keep" it (a smaller
      last batch) or "pad" it with weight-0 images (static shapes).
    shuffle: shuffle images across blocks (training); None keeps the
      block order.
    num_batches: emit exactly this many batches, adding whole padding
      batches after the data (only with remainder="pad"); None: as many
      as the data fills.
    autotune: tf.data autotuning and an AUTOTUNE prefetch; False: fixed
      parallelism and a FIXED_PREFETCH-batch prefetch (see `_options`).
    threads: private tf.data thread pool size (None: TensorFlow's default).

  Returns:
    tf.data.Dataset of batches (static batch dimension unless "keep").

  Raises:
    ValueError: an unknown remainder, or num_batches without padding.
  """
  if remainder not in REMAINDERS:
    raise ValueError(f"remainder must be one of {REMAINDERS}, got "
                     f"{remainder!r}")
  if num_batches is not None and remainder != "pad":
    raise ValueError("num_batches needs remainder='pad'")
  if shuffle is not None:
    blocks = blocks.shuffle(shuffle.buffer_blocks, seed=shuffle.seed,
                            reshuffle_each_iteration=True)
    chunks = blocks.rebatch(max(shuffle.mix_size, batch_size),
                            drop_remainder=False)
    seeds = tf.data.Dataset.random(seed=shuffle.seed + 1).batch(2)
    blocks = tf.data.Dataset.zip(chunks, seeds).map(
        _mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  out = blocks.rebatch(batch_size, drop_remainder=remainder == "drop")
  if remainder == "pad":
    out = out.map(lambda b: _pad_batch(b, batch_size))
  if num_batches is not None:
    padding = tf.data.Dataset.from_tensors(batches.padding(
        batch_size, with_ids=batches.ID in out.element_spec)).repeat()
    out = out.concatenate(padding).take(num_batches)
  out = out.prefetch(tf.data.AUTOTUNE if autotune else FIXED_PREFETCH)
  return out.with_options(_options(autotune, threads))


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
    tf.data.Dataset of hcd.data.batches batches without ids, with a static
    batch dimension.
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
  return batch_blocks(blocks, batch_size, remainder="drop",
                      shuffle=Shuffle(seed + 1, shuffle_blocks, mix_size),
                      threads=threads)


def eval_steps(plan: SubsetPlan, global_batch_size: int) -> int:
  """Steps that cover every image of `plan` once at this global batch size."""
  return max(1, math.ceil(plan.num_examples / global_batch_size))


def eval_dataset(plan: SubsetPlan, batch_size: int, *, steps: int | None = None,
                 input_context=None, with_ids: bool = False, pad: bool = True,
                 cycle_length: int = 4, autotune: bool = True,
                 threads: int | None = None):
  """Every image of a subset once, in shard order, unaugmented.

  Validation during training uses static batches: the last one is padded
  with weight-0 images (which every metric ignores), and under a strategy
  each pipeline emits exactly `steps` batches per local replica so all
  replicas run the same number of steps. Evaluation and prediction of
  shards (hcd.eval.inputs) take `pad=False, with_ids=True,
  autotune=False`: a smaller last batch, nothing to drop afterwards.

  Args:
    plan: the subset (validation: never rebalanced; a whole split:
      subsets.whole_split).
    batch_size: batch size of this pipeline (per replica under a strategy).
    steps: global steps to emit; None emits every image once, then stops.
      Needs `pad`.
    input_context: tf.distribute.InputContext; pipelines take every N-th
      image.
    with_ids: include "id" strings (single-device use only).
    pad: pad the last batch to `batch_size` with weight-0 images.
    cycle_length: shard files read concurrently (sets the order).
    autotune: see `batch_blocks`.
    threads: private tf.data thread pool size.

  Returns:
    tf.data.Dataset of hcd.data.batches batches.

  Raises:
    ValueError: `steps` without `pad`.
  """
  if steps is not None and not pad:
    raise ValueError("eval_dataset: steps needs pad=True (the batches that "
                     "fill the steps are padding)")
  num, index = _pipeline_index(input_context)
  blocks = subset_blocks(plan, with_ids=with_ids, cycle_length=cycle_length)
  if num > 1:
    # Per image, not per block: blocks vary in size after selection, and an
    # uneven split could need more steps on one worker than on another.
    blocks = blocks.unbatch().shard(num, index).batch(1024)
  num_batches = None
  if steps is not None:
    local_replicas = 1
    if input_context is not None:
      local_replicas = max(1, input_context.num_replicas_in_sync // num)
    num_batches = steps * local_replicas
  return batch_blocks(blocks, batch_size, remainder="pad" if pad else "keep",
                      num_batches=num_batches, autotune=autotune,
                      threads=threads)


def folder_dataset(records: Sequence[sources.Record], batch_size: int,
                   layouts: dict | None = None):
  """Batches of an image folder, decoded in tf.data, in record order.

  Args:
    records: the images (paths, ids, labels), all checked readable.
    batch_size: images per batch (the last may be smaller).
    layouts: plain-TIFF proofs of these records (see
      folder_reader.folder_blocks).

  Returns:
    tf.data.Dataset of hcd.data.batches batches with ids (weight 1).
  """
  # Blocks of one batch each: decoding granularity is the batch size, as
  # measured in BENCHMARKS.md, and rebatching them changes nothing.
  blocks = folder_reader.folder_blocks(records, batch_size, layouts)
  return batch_blocks(blocks, batch_size, remainder="keep", autotune=False)
