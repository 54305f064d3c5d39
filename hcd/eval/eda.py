"""Exploratory figures, as the notebook drew them, from real inputs.

  label_frequency.png  bar chart of label counts (and shares)
  samples.png          a class-balanced grid of patches, each titled with its
                       class, the centre 32x32 box (which decides the label)
                       outlined
  flagged.png          the images tools/scan_quality flagged (dark, bright,
                       unreadable, ...), each captioned with its flags

Inputs are shards (counts from the manifest, patches from the first blocks)
or an image folder (hcd.data.sources layouts), plus a scan.csv.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from hcd import plots
from hcd.data import decode
from hcd.data import features
from hcd.data import manifest as manifest_lib
from hcd.data import sources
from hcd.eval import inputs


class EdaError(ValueError):
  """Unusable EDA input; the message names the file."""


def _balanced_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
  """Indices of up to n items, split evenly across the classes present."""
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  picks = []
  for j, c in enumerate(classes):
    idx = np.nonzero(labels == c)[0]
    want = n // len(classes) + (1 if j < n % len(classes) else 0)
    picks.append(rng.choice(idx, min(want, len(idx)), replace=False))
  out = np.concatenate(picks) if picks else np.zeros(0, np.int64)
  return np.sort(out)


def samples_from_shards(shards_dir: str, split: str, n: int = 16,
                        seed: int = 0, max_blocks: int = 8):
  """Reads a class-balanced sample from the first blocks of a split.

  Returns:
    (images uint8 [k, 96, 96, 3], labels [k], ids) with k <= n.

  Raises:
    manifest_lib.ManifestError: no manifest.
  """
  from hcd.data import shard_reader  # pylint: disable=g-import-not-at-top
  manifest = manifest_lib.load_manifest(shards_dir, split)
  paths = manifest_lib.shard_paths(shards_dir, manifest)
  images, labels, ids = [], [], []
  # Shards are stratified, so the first blocks hold both classes.
  for rec in shard_reader.read_blocks(paths[:1]).take(max_blocks):
    im, i, lab = features.parse_block_numpy(rec.numpy())
    images.append(im)
    ids += i
    labels.append(lab)
  if not images:
    raise EdaError(f"{paths[0]}: no records")
  images, labels = np.concatenate(images), np.concatenate(labels)
  pick = _balanced_pick(labels, n, seed)
  return images[pick], labels[pick], [ids[k] for k in pick]


def samples_from_records(records: Sequence[sources.Record], n: int = 16,
                         seed: int = 0):
  """Reads a class-balanced sample of records (unreadable ones skipped).

  Returns:
    (images uint8 [k, 96, 96, 3], labels [k], ids) with k <= n.
  """
  labels = np.array([r.label for r in records], np.int64)
  pick = _balanced_pick(labels, n, seed)
  images, labs, ids = [], [], []
  for k in pick:
    try:
      images.append(decode.read_image(records[k].path))
    except decode.ImageError:
      continue
    labs.append(labels[k])
    ids.append(records[k].id)
  if not images:
    raise EdaError("no readable images in the sample")
  return np.stack(images), np.array(labs), ids


def read_flagged(scan_csv: str, max_images: int = 32):
  """Reads the images a scan flagged.

  Args:
    scan_csv: tools/scan_quality's scan.csv (columns id, path, label, flags,
      ...).
    max_images: at most this many are returned.

  Returns:
    (images uint8 [k, 96, 96, 3], labels [k], captions [k], total flagged).
    An image that cannot be read is shown as a grey placeholder.

  Raises:
    EdaError: unreadable or malformed CSV, or missing columns.
  """
  what = "tools/scan_quality scan.csv"
  with sources.open_csv(scan_csv, ("id", "path", "flags"), what,
                        EdaError) as (reader, header):
    rows = (dict(zip(header, row)) for row in reader if row)
    flagged = [r for r in rows if (r.get("flags") or "").strip()]
  images, labels, captions = [], [], []
  for r in flagged[:max_images]:
    try:
      img = decode.read_image(r["path"])
    except decode.ImageError:
      img = np.full(features.IMAGE_SHAPE, 128, np.uint8)
    images.append(img)
    try:
      labels.append(int(r.get("label") or features.UNKNOWN_LABEL))
    except ValueError:
      labels.append(features.UNKNOWN_LABEL)
    captions.append(f"{r['id'][:10]}\n{r['flags']}")
  return (np.stack(images) if images else None, labels, captions,
          len(flagged))


def make_eda(out_dir: str, shards_dir: str | None = None,
             data_dir: str | None = None, split: str = "train",
             scan_csv: str | None = None, num_samples: int = 16,
             seed: int = 0, labels_csv: str | None = None) -> dict:
  """Draws the EDA figures.

  Args:
    out_dir: where the PNGs go (created).
    shards_dir: a shards directory (or give data_dir).
    data_dir: an image folder (hcd.data.sources layouts).
    split: the split to describe.
    scan_csv: a scan.csv whose flagged images to draw.
    num_samples: patches in the sample grid.
    seed: sample selection seed.
    labels_csv: labels for the Kaggle layout.

  Returns:
    {"label_frequency": path, "samples": path, "flagged": path or None,
     "label_counts": {...}, "num_flagged": int or None}.

  Raises:
    EdaError / manifest_lib.ManifestError / sources.DataError: bad inputs.
  """
  if bool(shards_dir) == bool(data_dir) and not scan_csv:
    raise EdaError("give one of shards_dir or data_dir (and/or scan_csv)")
  os.makedirs(out_dir, exist_ok=True)
  out = {"label_frequency": None, "samples": None, "flagged": None,
         "label_counts": None, "num_flagged": None}
  if shards_dir or data_dir:
    if shards_dir:
      counts = manifest_lib.load_manifest(shards_dir, split)["label_counts"]
      images, labels, _ = samples_from_shards(shards_dir, split, num_samples,
                                              seed)
      where = f"{shards_dir} ({split})"
    else:
      records = inputs.folder_records(data_dir, split, labels_csv)
      counts = manifest_lib.label_counts([r.label for r in records])
      images, labels, _ = samples_from_records(records, num_samples, seed)
      where = f"{data_dir} ({split})"
    out["label_counts"] = counts
    out["label_frequency"] = plots.label_bar(
        counts, os.path.join(out_dir, "label_frequency.png"),
        title=f"Label frequency: {where}")
    out["samples"] = plots.sample_grid(
        images, os.path.join(out_dir, "samples.png"), labels=labels,
        title="Sample patches (box: the centre 32x32 that decides the label)")
  if scan_csv:
    images, labels, captions, total = read_flagged(scan_csv)
    out["num_flagged"] = total
    if images is not None:
      shown = f"{len(captions)} of {total}" if total > len(captions) else total
      out["flagged"] = plots.sample_grid(
          images, os.path.join(out_dir, "flagged.png"), labels=labels,
          captions=captions, title=f"Images flagged by the scanner ({shown})")
  return out
