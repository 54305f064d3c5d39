"""Evaluation and prediction input: shards or image folders, as Sources.

Both sources yield the one batch structure of hcd.data.batches, with ids:
  image   uint8 [B, 96, 96, 3]
  label   int64 [B]    (-1 where unknown, e.g. Kaggle test)
  weight  float32 [B]  (1: evaluation never pads or reweights)
  id      string [B]
and both are built by hcd.data.pipeline, the builder training uses too.

Shards are read as blocks of up to 256 raw images (no decode) by
`pipeline.eval_dataset`, the reader of validation during training (a whole
split, or a run's validation subset, which is then exactly what validation
saw). An image folder (Kaggle `test/`, a class-folder split, or a plain
folder of TIFFs) is read file by file inside tf.data and decoded a batch at
a time in the graph (`pipeline.folder_dataset`, hcd/data/folder_reader.py),
so no sharding step is needed to predict, and the pixels are exactly those
the shard writer stores for the same files.

Every folder image is first checked here with the decoder of record
(imagecodecs, `check_images`, in a thread pool): a file it refuses is
refused by name, or skipped and listed when the caller allows it, before
tf.data starts. The check also records, per file, the proof that its TIFF
layout is one plain strip of pixels (`decode.TiffLayoutCache`); tf.data
then slices those pixels from the file instead of decoding it (re-checking
the proof on the bytes it reads), and runs imagecodecs through
`tf.numpy_function` for the rest.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
from typing import Sequence

import numpy as np

from hcd import progress as progress_lib
from hcd.data import decode
from hcd.data import features
from hcd.data import sources

CHECK_CHUNK = 256


class InputError(ValueError):
  """Unusable input data; the message names the files and what is wrong."""


@dataclasses.dataclass
class Source:
  """A batched dataset and what it holds.

  Attributes:
    dataset: tf.data.Dataset of hcd.data.batches batches, with ids.
    num_examples: images the dataset yields.
    description: one line for logs and metrics.json.
    skipped: images left out as unreadable (sources.Problem), when allowed.
    files: the shard files the dataset reads (empty for an image folder).
  """
  dataset: object
  num_examples: int
  description: str
  skipped: list = dataclasses.field(default_factory=list)
  files: list = dataclasses.field(default_factory=list)

  @contextlib.contextmanager
  def naming_bad_shard(self):
    """Names the shard at fault when iterating the dataset fails.

    A corrupt record stops tf.data with an error that names no file (and
    hcd.eval.predict reports it as a RuntimeError); the shards are then
    reread one by one to find it.

    Raises:
      hcd.data.shard_reader.ShardFileError: naming the unreadable shard;
        otherwise the original error.
    """
    if not self.files:
      yield
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from hcd.data import shard_reader  # pylint: disable=g-import-not-at-top
    with shard_reader.naming_bad_shard(self.files,
                                       (RuntimeError, tf.errors.OpError)):
      yield


def _fmt_problems(problems: Sequence[sources.Problem], limit: int = 20) -> str:
  lines = [f"  {p.path}: {p.reason}" for p in problems[:limit]]
  if len(problems) > limit:
    lines.append(f"  ... and {len(problems) - limit} more")
  return "\n".join(lines)


def shards_source(shards_dir: str, split: str, batch_size: int) -> Source:
  """Batches of a sharded split, in manifest order.

  Args:
    shards_dir: directory with hcd-<split>.manifest.json and its shards.
    split: split name.
    batch_size: images per batch (the last batch may be smaller).

  Returns:
    A Source.

  Raises:
    hcd.data.manifest.ManifestError: no or invalid manifest.
    hcd.data.shard_reader.ShardFileError: a shard listed in the manifest is
      missing or has the wrong size.
  """
  from hcd.data import subsets  # pylint: disable=g-import-not-at-top
  plan = subsets.whole_split(shards_dir, split)
  # Blocks are big (256 images), so two readers keep up with any model; a
  # deterministic interleave keeps the output order reproducible.
  return plan_source(plan, batch_size, cycle_length=2,
                     description=f"shards {shards_dir} split {split} "
                     f"({plan.num_examples} images)")


def folder_records(data_dir: str, split: str,
                   labels_csv: str | None = None) -> list[sources.Record]:
  """Lists the images of a folder source.

  `<data_dir>/<split>` in the Kaggle or class-folder layout (see
  hcd.data.sources); or, when that does not exist, `data_dir` itself as a
  plain folder of images (ids = file stems, labels unknown).

  Args:
    data_dir: the data directory (or a plain folder of images).
    split: the split's sub-directory.
    labels_csv: labels for the Kaggle layout (see sources.kaggle_records).

  Returns:
    Records sorted by id.

  Raises:
    sources.DataError: no such folder, no images, files sharing an id
      (`a.tif` and `a.png`), or label problems.
  """
  if not os.path.isdir(os.path.join(data_dir, split)) and os.path.isdir(
      data_dir):
    records = sources.image_records(data_dir)
    if records:
      return records
  # No skip_hint: evaluation and prediction have no --skip_invalid (their
  # --skip_unreadable leaves out undecodable images, not label problems).
  records, _, _ = sources.list_records(data_dir, split, labels_csv,
                                       skip_hint=None)
  if not records:
    raise sources.DataError(f"{os.path.join(data_dir, split)}: no images")
  return records


@dataclasses.dataclass
class Checked:
  """What the up-front check found.

  Attributes:
    problems: one Problem per image the decoder of record refuses, in record
      order.
    layouts: path -> the proof (`decode.TiffLayoutCache.layout`) that the
      file is one plain strip of pixels, for the files that have one.
  """
  problems: list
  layouts: dict


def _check_chunk(records) -> Checked:
  # One cache per chunk: the cache is not thread-safe, and Kaggle files
  # share a few layouts, so each chunk decodes only its first file of each.
  cache = decode.TiffLayoutCache()
  found = Checked([], {})
  for r in records:
    # The scanner's and the shard writer's checks, so a refusal is worded
    # as in scan.csv and the manifest ("unreadable: ...", "bad_shape: ...").
    try:
      layout = decode.check_image(r.path, cache)
    except decode.ImageError as e:
      found.problems.append(sources.Problem(r.id, r.path, e.reason))
      continue
    if layout is not None:
      found.layouts[r.path] = layout
  return found


def check_images(records: Sequence[sources.Record], workers: int | None = None,
                 progress: bool = True) -> Checked:
  """Checks every image once with the decoder of record (imagecodecs).

  imagecodecs and file reads release the GIL, so threads scale with cores.

  Args:
    records: the images.
    workers: threads (default: the CPU count).
    progress: show a tqdm bar.

  Returns:
    The unreadable or invalid images, and the plain-layout proofs of the
    others (see `Checked`).
  """
  chunks = [records[i:i + CHECK_CHUNK]
            for i in range(0, len(records), CHECK_CHUNK)]
  checked = Checked([], {})
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as ex, \
      progress_lib.bar(total=len(records), unit="img", desc="check images",
                       enabled=progress, leave=False) as bar:
    for chunk, found in zip(chunks, ex.map(_check_chunk, chunks)):
      checked.problems += found.problems
      checked.layouts.update(found.layouts)
      bar.update(len(chunk))
  return checked


def folder_source(data_dir: str, split: str, batch_size: int,
                  labels_csv: str | None = None,
                  skip_unreadable: bool = False, check: bool = True,
                  progress: bool = True) -> Source:
  """Batches of an image folder decoded in the graph, unreadables handled.

  Args:
    data_dir: data directory (see `folder_records`).
    split: sub-folder (e.g. "test", "train", "valid").
    batch_size: images per batch.
    labels_csv: labels for the Kaggle layout (default: train_labels.csv for
      the train split).
    skip_unreadable: leave unreadable images out (listed in
      `Source.skipped`) instead of refusing.
    check: check every file once up front (see `check_images`); without it
      every file is decoded by imagecodecs in tf.data, and a bad file fails
      there (the error still names it).
    progress: show progress bars.

  Returns:
    A Source.

  Raises:
    sources.DataError: no folder or images, or label problems.
    InputError: unreadable images and not `skip_unreadable`; the message
      lists them, one line per file.
  """
  records = folder_records(data_dir, split, labels_csv)
  checked = (check_images(records, progress=progress) if check
             else Checked([], {}))
  problems = checked.problems
  if problems and not skip_unreadable:
    raise InputError(
        f"{len(problems)} of {len(records)} images under {data_dir} cannot "
        f"be read:\n{_fmt_problems(problems)}\n(pass --skip_unreadable to "
        f"leave them out; they are then listed in a side file)")
  bad = {p.path for p in problems}
  records = [r for r in records if r.path not in bad]
  if not records:
    raise InputError(f"{data_dir}: no readable images left")
  where = os.path.join(data_dir, split) if os.path.isdir(
      os.path.join(data_dir, split)) else data_dir
  sliced = sum(r.path in checked.layouts for r in records)
  from hcd.data import pipeline  # pylint: disable=g-import-not-at-top
  return Source(pipeline.folder_dataset(records, batch_size, checked.layouts),
                len(records),
                f"folder {where} ({len(records)} images, imagecodecs: "
                f"{sliced} plain TIFFs sliced in tf.data, "
                f"{len(records) - sliced} decoded)", problems)


def open_source(shards_dir: str | None = None, data_dir: str | None = None,
                split: str = "test", batch_size: int = 256,
                labels_csv: str | None = None, skip_unreadable: bool = False,
                progress: bool = True) -> Source:
  """Opens exactly one of a shards directory or a data directory.

  Raises:
    InputError: neither or both given; see shards_source / folder_source.
  """
  if bool(shards_dir) == bool(data_dir):
    raise InputError("give exactly one input: --shards_dir (TFRecord shards) "
                     "or --data_dir (a folder of images)")
  if batch_size < 1:
    raise InputError(f"batch size must be >= 1, got {batch_size}")
  if shards_dir:
    return shards_source(shards_dir, split, batch_size)
  return folder_source(data_dir, split, batch_size, labels_csv,
                       skip_unreadable, progress=progress)


def take_arrays(source: Source) -> tuple[np.ndarray, list[str], np.ndarray]:
  """Materialises a (small) source: (images, ids, labels). For tests/EDA."""
  images, ids, labels = [], [], []
  for b in source.dataset:
    images.append(b["image"].numpy())
    ids += [i.decode("utf-8") for i in b["id"].numpy()]
    labels.append(b["label"].numpy())
  if not images:
    return (np.zeros((0,) + features.IMAGE_SHAPE, np.uint8), [],
            np.zeros((0,), np.int64))
  return np.concatenate(images), ids, np.concatenate(labels)


def plan_source(plan, batch_size: int, cycle_length: int = 4,
                description: str | None = None) -> Source:
  """Batches of a subset of shards: a whole split, or a run's validation part.

  Read by the reader of validation during training (pipeline.eval_dataset),
  so evaluation sees exactly the images, labels and order validation saw.

  Args:
    plan: hcd.data.subsets.SubsetPlan (selection by id hash, never
      rebalanced for validation; subsets.whole_split for a whole split).
    batch_size: images per batch (the last batch may be smaller).
    cycle_length: shard files read concurrently (sets the order).
    description: the Source's description (default: names the subset).

  Returns:
    A Source with ids and int64 labels (-1 where unknown), in shard order.
  """
  from hcd.data import pipeline  # pylint: disable=g-import-not-at-top
  # Unpadded (nothing for the caller to drop) and with fixed parallelism
  # (see pipeline._options).
  ds = pipeline.eval_dataset(plan, batch_size, with_ids=True, pad=False,
                             cycle_length=cycle_length, autotune=False)
  return Source(ds, plan.num_examples, description or (
      f"shards {plan.shards_dir} split {plan.split} ({plan.role} subset, "
      f"{plan.num_examples} images)"), files=list(plan.files))


def run_validation_source(config: dict, shards_dir: str,
                          batch_size: int) -> Source | None:
  """The validation data a run was scored on, rebuilt from its config.json.

  Planned by `hcd.data.subsets.run_validation_plan`, the code training
  itself plans with (separate split, hash hold-out, fold or group split).

  Args:
    config: the run's config.json.
    shards_dir: the shards directory (usually the run's own).
    batch_size: images per batch.

  Returns:
    A Source, or None when the config describes no validation subset.

  Raises:
    hcd.data.manifest.ManifestError, shard_reader.PipelineError: missing
      or bad shards.
  """
  from hcd.data import subsets  # pylint: disable=g-import-not-at-top
  from hcd.train.config import TrainConfig  # pylint: disable=g-import-not-at-top
  # Through TrainConfig: a setting config.json lacks (an older hcd wrote
  # it) takes hcd_train's default, as it did in training.
  plan = subsets.run_validation_plan(
      TrainConfig.from_dict(dict(config, shards_dir=shards_dir))
      .data_settings())
  return None if plan is None else plan_source(plan, batch_size)
