"""The shard writer: a resumable, parallel job that converts a split to shards.

`make_split` converts one split of a data directory in a single decode pass
per image (read, decode, screen by `hcd.data.screening`: shape, SHA-1 of the
pixels against a Kaggle id, dark/bright) and writes whole shards in worker
processes that never import TensorFlow (hcd/data/shard_worker.py; the
bytes come from `hcd.data.tfrecord`). Which image goes to which shard
(hcd/data/shard_plan.py) depends only on the ids and labels, so the output
never depends on the number of workers. The layout and manifest are
documented in WORKSPACE.md ("Shards"); readers use `hcd.data.manifest`,
and `hcd.data.verify` rereads the output with TensorFlow.

Resumability: each finished shard is renamed into place and then gets a
sidecar `<out_dir>/.hcd-<split>.state/<shard>.json` holding its manifest
entry, the exclusions found in it, and a fingerprint of exactly what went
into it (paths, ids, labels, options). A rerun skips a shard whose sidecar
fingerprint matches and whose file has the recorded size, so a run killed at
any point (kill -9 included) resumes where it stopped, and a rerun on
finished output writes nothing. One lock per split keeps a second run out.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import time
from typing import Iterable, Sequence

import numpy as np

import hcd
from hcd import progress as progress_lib
from hcd import text
from hcd.data import features
from hcd.data import parallel
from hcd.data import scan_report
from hcd.data import screening
from hcd.data import sources
from hcd.data import shard_plan
from hcd.data import shard_worker
from hcd.data.manifest import DATASET_NAME
from hcd.data.manifest import label_counts
from hcd.data.manifest import manifest_path
from hcd.data.manifest import ShardError
from hcd.data.manifest import shard_name
from hcd.data.manifest import state_dir
from hcd.data.tfrecord import encode_block_head
from hcd import fileio
from hcd.fileio import atomic_write_text
from hcd.fileio import file_size

DARK_BRIGHT_MODES = ("auto", "exclude", "keep")
_SPLIT_RE = re.compile(r"[A-Za-z0-9_]+")


def write_shard(path: str, images: np.ndarray, ids: Sequence[str],
                labels: Sequence[int],
                block_size: int = features.BLOCK_SIZE) -> dict:
  """Writes one shard of in-memory images atomically; returns its entry.

  Args:
    path: final shard path; written as `<path>.tmp-<pid>`, then renamed.
    images: uint8 [n, 96, 96, 3].
    ids: n ids.
    labels: n labels.
    block_size: images per record.

  Returns:
    The shard's manifest entry (file, counts, bytes, sha256).

  Raises:
    ValueError: images of the wrong dtype or shape, or n mismatches.
  """
  images = np.ascontiguousarray(images)
  n = len(ids)
  if images.dtype != np.uint8 or images.shape != (n,) + features.IMAGE_SHAPE:
    raise ValueError(f"{path}: images must be uint8 "
                     f"{(n,) + features.IMAGE_SHAPE}, got {images.dtype} "
                     f"{images.shape}")
  with shard_worker.open_shard(path) as writer:
    for s in range(0, n, block_size):
      block = images[s:s + block_size]
      writer.write(encode_block_head(block.nbytes, ids[s:s + block_size],
                                     labels[s:s + block_size]), block)
    num_bytes, sha = writer.close()
    os.replace(writer.path, path)
  return {
      "file": os.path.basename(path),
      "num_examples": n,
      "num_records": writer.num_records,
      "label_counts": label_counts(labels),
      "bytes": num_bytes,
      "sha256": sha,
  }


def build_manifest(split: str, shard_entries: list[dict], source: dict,
                   excluded: list[dict] | None = None,
                   block_size: int = features.BLOCK_SIZE) -> dict:
  """Assembles a manifest dict (see WORKSPACE.md) from shard entries.

  Args:
    split: split name.
    shard_entries: one entry per shard (`write_shard`), in order.
    source: the manifest's "source" entry.
    excluded: images left out, {"id", "path", "reason"} each.
    block_size: images per record.

  Returns:
    The manifest, with totals over the entries.
  """
  totals: dict[str, int] = {}
  for e in shard_entries:
    for k, v in e["label_counts"].items():
      totals[k] = totals.get(k, 0) + v
  return {
      "schema_version": features.SCHEMA_VERSION,
      "record_format": features.RECORD_FORMAT,
      "name": DATASET_NAME,
      "split": split,
      "image_shape": list(features.IMAGE_SHAPE),
      "dtype": "uint8",
      "block_size": block_size,
      "num_examples": sum(e["num_examples"] for e in shard_entries),
      "label_counts": dict(sorted(totals.items())),
      "source": source,
      "shards": shard_entries,
      "excluded": excluded or [],
      "created": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%dT%H:%M:%SZ"),
      "hcd_version": hcd.__version__,
  }


def write_manifest(shards_dir: str, manifest: dict) -> str:
  """Writes a split's manifest atomically.

  Args:
    shards_dir: the shards directory.
    manifest: the manifest (its "split" names the file).

  Returns:
    The manifest's path.
  """
  path = manifest_path(shards_dir, manifest["split"])
  atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
  return path


def write_arrays(images: np.ndarray, ids: Sequence[str],
                 labels: Sequence[int], out_dir: str, split: str,
                 num_shards: int, source: dict | None = None,
                 block_size: int = features.BLOCK_SIZE) -> dict:
  """Shards in-memory arrays (tests and small data; in one process).

  Args:
    images: uint8 [n, 96, 96, 3].
    ids: n unique ids.
    labels: n labels.
    out_dir: the shards directory.
    split: split name.
    num_shards: number of shards.
    source: the manifest's "source" entry.
    block_size: images per record.

  Returns:
    The manifest, also written to `manifest_path(out_dir, split)`.
  """
  os.makedirs(out_dir, exist_ok=True)
  labels = np.asarray(labels, np.int64)
  entries = []
  for s, idx in enumerate(shard_plan.shard_members(ids, labels, num_shards)):
    entries.append(write_shard(
        os.path.join(out_dir, shard_name(split, s, num_shards)),
        images[idx], [ids[i] for i in idx], labels[idx], block_size))
  manifest = build_manifest(split, entries, source or {"layout": "arrays"},
                            block_size=block_size)
  write_manifest(out_dir, manifest)
  return manifest


@contextlib.contextmanager
def _split_lock(out_dir: str, split: str):
  """Holds an exclusive lock on a split's output (released even by kill -9)."""
  sdir = state_dir(out_dir, split)
  os.makedirs(sdir, exist_ok=True)
  path = os.path.join(sdir, "lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ShardError(f"{out_dir}: another make_shards run is writing split "
                       f"{split!r} (lock {path} is held); wait for it to "
                       f"finish") from None
    try:
      yield
    except BaseException:
      # A run refused before it wrote anything leaves no state directory
      # holding only its lock (we still hold it, so no other run uses it).
      if os.listdir(sdir) == ["lock"]:
        os.remove(path)
        os.rmdir(sdir)
      raise
  finally:
    os.close(fd)


def _remove_stale_tmp(out_dir: str, split: str) -> list[str]:
  """Deletes temporary files left by killed runs (we hold the split lock)."""
  prefix = f"{DATASET_NAME}-{split}."
  tmp_re = re.compile(r"\.tmp-\d+$")
  removed = []
  for d, match in ((out_dir, lambda n: n.startswith(prefix)),
                   (state_dir(out_dir, split), lambda n: True)):
    for name in os.listdir(d):
      if match(name) and tmp_re.search(name):
        os.remove(os.path.join(d, name))
        removed.append(name)
  return removed


def _read_json(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _fingerprint(obj, lines: Iterable[str] = ()) -> str:
  h = hashlib.sha256(json.dumps(obj, sort_keys=True).encode())
  for line in lines:
    h.update(line.encode("utf-8", "surrogateescape"))
  return h.hexdigest()


def _labels_csv_used(data_dir: str, split: str, layout: str,
                     labels_csv: str | None) -> str | None:
  if labels_csv:
    return os.path.abspath(labels_csv)
  if layout == sources.LAYOUT_KAGGLE and split == "train":
    return os.path.join(data_dir, sources.LABELS_CSV)
  return None


def _thresholds(scan_dir: str | None, dark_max: int | None,
                bright_min: int | None) -> tuple[int, int]:
  """The dark/bright thresholds in force: asked for, the scan's, or default.

  With a scan report the report decides what is dark or bright, so its
  thresholds are the ones in force (and recorded in the manifest); asking
  for others as well is refused rather than recorded but not applied.

  Raises:
    ShardError: a threshold asked for disagrees with the scan report's.
    hcd.data.scan_report.ScanError: unreadable scan summary.
  """
  asked = {"dark_max": dark_max, "bright_min": bright_min}
  if not scan_dir:
    return (screening.DARK_MAX if dark_max is None else int(dark_max),
            screening.BRIGHT_MIN if bright_min is None else int(bright_min))
  scan = scan_report.load_thresholds(scan_dir)
  for name, value in asked.items():
    if value is not None and int(value) != scan[name]:
      raise ShardError(
          f"--{name}={value} disagrees with the scan report in {scan_dir} "
          f"({name}={scan[name]}), which decides what is excluded; rerun "
          f"tools/scan_quality with --{name}={value}, or drop --{name}")
  return scan["dark_max"], scan["bright_min"]


def make_split(data_dir: str, split: str, out_dir: str,
               workers: int | None = None, scan_dir: str | None = None,
               num_shards: int | None = None, labels_csv: str | None = None,
               skip_invalid: bool = False,
               dark_max: int | None = None,
               bright_min: int | None = None,
               dark_bright: str = "auto",
               overwrite: bool = False, progress: bool = True,
               block_size: int = features.BLOCK_SIZE) -> dict:
  """Converts one split of a data directory to verified-format shards.

  Idempotent and resumable: shards already written for the same inputs and
  options are kept; a rerun on finished output writes nothing.

  Over 60 lines only for documenting each argument.

  Args:
    data_dir: Kaggle layout (`<split>/<id>.tif` + `train_labels.csv`) or a
      class-folder layout (`<split>/<0|1>/*`).
    split: split name, e.g. "train" or "test".
    out_dir: the shards directory (created if missing).
    workers: writer processes (default: all CPUs; 1 = in this process).
    scan_dir: a tools/scan_quality output directory; the images its report
      flags are excluded, with the report's reason.
    num_shards: number of shards (default:
      `shard_plan.default_num_shards`).
    labels_csv: labels CSV for the Kaggle layout (default
      `<data_dir>/train_labels.csv` for train).
    skip_invalid: exclude invalid inputs (label-CSV problems, unreadable or
      wrong-shape images, pixels that do not hash to their Kaggle id) and
      list them in the manifest, instead of refusing.
    dark_max: an image whose max is below this is dark (None: the scan
      report's with scan_dir, else screening.DARK_MAX).
    bright_min: an image whose min is above this is bright (None: likewise,
      screening.BRIGHT_MIN).
    dark_bright: "exclude" dark/bright images, "keep" them (listed under
      "flagged" in the manifest), or "auto": exclude from labelled splits
      unless a scan report decides, keep in unlabelled ones (a submission
      needs every test id).
    overwrite: rewrite every shard even if up to date.
    progress: show a tqdm progress bar over images.
    block_size: images per record.

  Returns:
    {"status": "written" | "up_to_date", "manifest": dict, "manifest_path",
     "written": shards written now, "reused": shards kept, "removed_tmp":
     temporary files of interrupted runs deleted, "removed": shards of an
     earlier shard count deleted, "seconds": wall time, "images": images in
     the shards}.

  Raises:
    sources.DataError: missing data directory or bad labels (see sources).
    ShardError: invalid images without skip_invalid, a bad option, a scan
      report of other data or of other thresholds, or another run holding
      the split's lock.
    hcd.data.scan_report.ScanError: a missing or malformed scan report.
    OSError: an unwritable out_dir.
  """
  t0 = time.perf_counter()
  _check_options(split, dark_bright, block_size)
  dark_max, bright_min = _thresholds(scan_dir, dark_max, bright_min)
  data_dir = os.path.abspath(data_dir)
  out_dir = os.path.abspath(out_dir)
  if not os.path.isdir(data_dir):
    raise sources.DataError(f"{data_dir}: no such data directory")
  options = {"dark_max": int(dark_max), "bright_min": int(bright_min),
             "dark_bright": dark_bright, "block_size": int(block_size),
             "sha1_check": screening.SHA1_CHECK}
  # A refused run leaves no empty out_dir behind (fileio.made_dirs).
  with fileio.made_dirs(out_dir), _split_lock(out_dir, split), \
      parallel.gc_paused():
    removed_tmp = _remove_stale_tmp(out_dir, split)
    result = _convert(data_dir, split, out_dir, options, labels_csv,
                      scan_dir, num_shards, skip_invalid, overwrite,
                      workers or os.cpu_count() or 1, progress)
  result.update(removed_tmp=removed_tmp, seconds=time.perf_counter() - t0)
  return result


def _convert(data_dir: str, split: str, out_dir: str, options: dict,
             labels_csv: str | None, scan_dir: str | None,
             num_shards: int | None, skip_invalid: bool, overwrite: bool,
             workers: int, progress: bool) -> dict:
  """`make_split` once its options are checked and the split is locked.

  Returns:
    make_split's result but for "removed_tmp" and "seconds".
  """
  records, pre_excluded, layout = _select_records(
      data_dir, split, labels_csv, skip_invalid, scan_dir)
  source = {"data_dir": data_dir, "split": split, "layout": layout,
            "labels_csv": _labels_csv_used(data_dir, split, layout,
                                           labels_csv),
            "scan_dir": os.path.abspath(scan_dir) if scan_dir else None}
  tasks = _plan_tasks(records, split, out_dir, num_shards, options,
                      data_dir, bool(scan_dir), bool(skip_invalid))
  plan_fp = _fingerprint({"shards": [t.fingerprint for t in tasks],
                          "excluded": pre_excluded, "source": source})
  mpath = manifest_path(out_dir, split)
  old = None if overwrite else _read_json(mpath)
  if _up_to_date(old, plan_fp, out_dir):
    return {"status": "up_to_date", "manifest": old, "manifest_path": mpath,
            "written": 0, "reused": len(tasks), "removed": [],
            "images": old["num_examples"]}
  results, written = _write_tasks(tasks, overwrite, workers, progress,
                                  mpath, split)
  _check_invalid(results, os.path.join(data_dir, split))
  manifest = _assemble_manifest(split, [results[t.index] for t in tasks],
                                source, pre_excluded, options, plan_fp)
  write_manifest(out_dir, manifest)
  removed = _remove_unplanned(out_dir, split, {t.path for t in tasks})
  return {"status": "written", "manifest": manifest, "manifest_path": mpath,
          "written": written, "reused": len(tasks) - written,
          "removed": removed, "images": manifest["num_examples"]}


def _check_options(split: str, dark_bright: str, block_size: int) -> None:
  """Raises ShardError for a bad split name, dark_bright mode or block."""
  if not _SPLIT_RE.fullmatch(split or ""):
    raise ShardError(f"split name {split!r} must be letters, digits or _")
  if dark_bright not in DARK_BRIGHT_MODES:
    raise ShardError(f"dark_bright={dark_bright!r}; expected one of "
                     f"{list(DARK_BRIGHT_MODES)}")
  if block_size < 1:
    raise ShardError(f"block_size must be >= 1, got {block_size}")


def _select_records(data_dir: str, split: str, labels_csv: str | None,
                    skip_invalid: bool, scan_dir: str | None):
  """The split's records to shard, less the scan report's exclusions.

  Returns:
    (records, [{"id", "path", "reason"}] excluded before any shard is
    written, the data layout).

  Raises:
    ShardError: a scan report naming ids not in the split, or no images.
  """
  records, problems, layout = sources.list_records(
      data_dir, split, labels_csv, skip_invalid)
  excluded = [{"id": p.id, "path": p.path,
               "reason": f"{p.kind}: {p.reason}"} for p in problems]
  if scan_dir:
    report = scan_report.load_exclusions(scan_dir)
    known = {r.id for r in records} | {p.id for p in problems}
    foreign = sorted(i for i in report if i not in known)
    if foreign:
      raise ShardError(
          f"{scan_dir}: the scan report excludes {len(foreign)} id(s) that "
          f"are not in {os.path.join(data_dir, split)} (first: "
          f"{foreign[0]}); is it the report of another split or data set?")
    excluded += [{"id": r.id, "path": r.path,
                  "reason": f"scan: {report[r.id]}"}
                 for r in records if r.id in report]
    records = [r for r in records if r.id not in report]
  if not records:
    raise ShardError(f"{os.path.join(data_dir, split)}: no images left to "
                     f"shard ({len(excluded)} excluded)")
  return records, excluded, layout


def _shard_count(labels: np.ndarray, num_shards: int | None,
                 split: str) -> int:
  """The number of shards: as asked, or shard_plan.default_num_shards.

  Raises:
    ShardError: more shards than images, or than images of a class.
  """
  labelled = bool(np.all(labels >= 0))
  counts = label_counts(labels)
  n_shards = num_shards or shard_plan.default_num_shards(
      len(labels), counts if labelled else None)
  if n_shards > len(labels):
    raise ShardError(f"num_shards={n_shards} is more than the "
                     f"{len(labels)} images of split {split!r}")
  small = min((counts.get(k, 0), k) for k in ("0", "1"))
  if labelled and small[0] > 0 and n_shards > small[0]:
    raise ShardError(f"num_shards={n_shards} is more than the {small[0]} "
                     f"images of class {small[1]}: some shards would lack "
                     f"that class; use --num_shards={small[0]} or fewer")
  return n_shards


def _plan_tasks(records, split: str, out_dir: str, num_shards: int | None,
                options: dict, data_dir: str, scanned: bool,
                skip_invalid: bool) -> list[shard_worker.ShardTask]:
  """One task per shard, each with the fingerprint of what goes into it.

  Also settles options["dark_bright"] when it is "auto": exclude from
  labelled splits unless a scan report decides, keep in unlabelled ones.
  """
  ids = [r.id for r in records]
  labels = np.asarray([r.label for r in records], np.int64)
  n_shards = _shard_count(labels, num_shards, split)
  if options["dark_bright"] == "auto":
    options["dark_bright"] = ("exclude" if np.all(labels >= 0) and
                              not scanned else "keep")
  sdir = state_dir(out_dir, split)
  strip = len(os.path.join(data_dir, ""))
  triples = [(r.path, r.id, r.label) for r in records]
  tasks = []
  for s, idx in enumerate(shard_plan.shard_members(ids, labels, n_shards)):
    name = shard_name(split, s, n_shards)
    members = [triples[i] for i in idx.tolist()]
    fp = _fingerprint(
        {"format": features.RECORD_FORMAT, "file": name, "options": options,
         "data_dir": data_dir},
        (f"{p[strip:]}\t{i}\t{lab}\n" for p, i, lab in members))
    tasks.append(shard_worker.ShardTask(
        s, os.path.join(out_dir, name), os.path.join(sdir, name + ".json"),
        fp, members, options["dark_max"], options["bright_min"],
        options["dark_bright"], options["block_size"], skip_invalid))
  return tasks


def _up_to_date(old: dict | None, plan_fp: str, out_dir: str) -> bool:
  """Whether the manifest there describes exactly this plan's shards."""
  return bool(
      old and old.get("fingerprint") == plan_fp and
      old.get("schema_version") == features.SCHEMA_VERSION and
      all(file_size(os.path.join(out_dir, e["file"])) == e["bytes"]
          for e in old["shards"]))


def _write_tasks(tasks, overwrite: bool, workers: int, progress: bool,
                 mpath: str, split: str) -> tuple[dict[int, dict], int]:
  """Writes the shards not already finished; ({index: result}, written)."""
  results: dict[int, dict] = {}
  if not overwrite:
    for t in tasks:
      side = _read_json(t.sidecar)
      if (side and side.get("fingerprint") == t.fingerprint and
          side.get("entry") and
          file_size(t.path) == side["entry"].get("bytes")):
        results[t.index] = side
  todo = [t for t in tasks if t.index not in results]
  # Any manifest here now describes other shards, some about to be
  # replaced: no manifest is better than a wrong one while they are.
  with contextlib.suppress(FileNotFoundError):
    os.remove(mpath)
  with progress_lib.bar(total=sum(len(t.members) for t in todo),
                        unit="img", desc=f"make_shards {split}",
                        enabled=progress, smoothing=0.05) as pbar:
    for r in shard_worker.run_tasks(todo, workers, pbar):
      results[r["index"]] = r
  return results, len(todo)


def _check_invalid(results: dict[int, dict], where: str) -> None:
  """Raises ShardError naming the invalid images the tasks refused."""
  invalid = [x for r in results.values() for x in r["invalid"]]
  if invalid:
    first = "; ".join(f"{text.shown(x['path'])}: {x['reason']}"
                      for x in invalid[:3])
    more = f" (+{len(invalid) - 3} more)" if len(invalid) > 3 else ""
    raise ShardError(
        f"{len(invalid)} invalid image(s) in {where}: {first}{more}; rerun "
        f"with --skip_invalid to exclude them (listed in the manifest; "
        f"finished shards are kept)")


def _assemble_manifest(split: str, ordered: list[dict], source: dict,
                       pre_excluded: list[dict], options: dict,
                       plan_fp: str) -> dict:
  """The split's manifest from the tasks' results, in shard order."""
  excluded = sorted(
      pre_excluded + [x for r in ordered for x in r["excluded"]],
      key=lambda x: (x["id"], x["reason"]))
  flagged = sorted((x for r in ordered for x in r["flagged"]),
                   key=lambda x: x["id"])
  manifest = build_manifest(split, [r["entry"] for r in ordered], source,
                            excluded, options["block_size"])
  manifest.update(flagged=flagged, options=options, fingerprint=plan_fp)
  return manifest


def _remove_unplanned(out_dir: str, split: str, planned: set[str]) -> list[str]:
  """Deletes shards (and sidecars) of this split that the manifest dropped.

  They come from earlier runs with another shard count; left in place, a
  glob over `hcd-<split>.tfrecord-*` would read them too.
  """
  removed = []
  shard_re = re.compile(re.escape(f"{DATASET_NAME}-{split}.tfrecord-") +
                        r"\d{5}-of-\d{5}$")
  planned_names = {os.path.basename(p) for p in planned}
  for name in os.listdir(out_dir):
    if shard_re.match(name) and name not in planned_names:
      os.remove(os.path.join(out_dir, name))
      removed.append(name)
  sdir = state_dir(out_dir, split)
  for name in os.listdir(sdir):
    if name.endswith(".json") and name[:-5] not in planned_names:
      os.remove(os.path.join(sdir, name))
  return removed


