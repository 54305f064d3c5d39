"""Image quality scan: one parallel pass over a split, one report row per image.

Per image: readable; 96x96x3 uint8; min and max with the near-black
(`max < dark_max`) and near-white (`min > bright_min`) flags; per-channel
mean and std; the near-white background fraction; the SHA-1 of the pixel
bytes against a Kaggle id; exact duplicates. One bad file never stops the
scan: its row says what is wrong. The report format is in WORKSPACE.md
("Scan report") and hcd/data/scan_report.py, which writes and reads it;
`scan_report.load_exclusions` is how tools/make_shards consumes it.

What is wrong with an image, and how the reason reads, is decided by
`hcd.data.screening`, shared with the shard writer.

Speed (~45 CPU-us an image, of which SHA-1 ~15 and reading ~7) comes from
keeping the per-file Python work to read + SHA-1 (+ decode, skipped for files
laid out like one already decoded, see `decode.TiffLayoutCache`), reading
each file straight into its slot of a batch buffer where its pixels stay
(`_Buffers`: no copy), computing the statistics vectorised over batches of
32 images with contiguous numpy operations only, and formatting the CSV rows
in the workers (one %-format for a clean row). A worker gets a chunk of
records and returns numpy columns and CSV lines; the parent, which learns the
TIFF layout once before forking, only joins them and settles duplicates,
which need the whole split. This module and its workers never import
TensorFlow.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Sequence

import numpy as np

import hcd
from hcd import progress as progress_lib
from hcd.data import decode
from hcd.data import parallel
from hcd.data import scan_report as report
from hcd.data import screening
from hcd.data.features import IMAGE_SHAPE

CHUNK_SIZE = 2000

_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
_IMAGE_BYTES = _PIXELS * IMAGE_SHAPE[2]
# Images per vectorised statistics step: 32 keeps their float32 copy (3.5 MB
# at 64) mostly in a core's L2 cache, ~10% faster than 64 or 16.
_BATCH = 32
# Bytes of file per image of a batch (a 96x96 RGB TIFF is ~28 KB); a larger
# file is read whole and decoded.
_SLOT = 1 << 15
_OK, _UNREADABLE, _BAD_SHAPE = 0, 1, 2
# Sums over 36 rows of 256 RGB pixels: 36 * 255**2 < 2**24, so float32
# partial sums of squares are exact integers; the rest is summed in float64.
_ROWS = 36
_ROW_VALUES = _IMAGE_BYTES // _ROWS

def _per_channel(row_sums: np.ndarray) -> np.ndarray:
  """[m, 768] interleaved RGB partial sums -> exact [m, 3] float64 sums."""
  # A transposed copy makes the last reduction contiguous (a strided one is
  # ~8x slower); a BLAS matmul would start threads in every worker.
  planes = row_sums.reshape(len(row_sums), -1, 3).transpose(0, 2, 1)
  return np.ascontiguousarray(planes).sum(axis=2, dtype=np.float64)


class _Buffers:
  """What a worker process reuses from chunk to chunk.

  A batch of images lives in `files`, one slot of _SLOT bytes per image. A
  file is read straight into its slot and, in the usual case (a TIFF laid
  out like one already decoded, see `decode.TiffLayoutCache`), its pixels
  stay where they landed: the SHA-1 reads them through a memoryview and the
  statistics run on `pixels`, a strided view over all slots at the pixel
  offset `offset`. Pixels that arrive any other way (decoded, or a layout
  with another offset) are written at that offset of their slot. So the
  common path never copies pixels, and nothing is allocated per file.
  """

  def __init__(self):
    self.tiff = decode.TiffLayoutCache()
    self.files = np.zeros((_BATCH, _SLOT), np.uint8)
    self.slots = [memoryview(row) for row in self.files]
    self.offset = -1  # Decided by the first image (`place`).
    self.pixels = None  # [_BATCH, 27648] view of `files` at `offset`.
    self.pixel_views: list[memoryview] = []
    self.f32 = np.empty((_BATCH, _ROWS, _ROW_VALUES), np.float32)
    self.ge = np.empty((_BATCH, _IMAGE_BYTES), np.bool_)
    self.all3 = np.zeros((_BATCH, _IMAGE_BYTES), np.bool_)

  def set_offset(self, offset: int | None) -> None:
    """Fixes where pixels sit in a slot: where the first file had them."""
    if offset is None or offset + _IMAGE_BYTES > _SLOT:
      offset = 0
    self.offset = offset
    self.pixels = self.files[:, offset:offset + _IMAGE_BYTES]
    self.pixel_views = [memoryview(row) for row in self.pixels]


_buffers: _Buffers | None = None


def _worker_buffers() -> _Buffers:
  """This process's buffers (a forked worker gets its own copy)."""
  global _buffers
  if _buffers is None:
    _buffers = _Buffers()
  return _buffers


class _ChunkScanner:
  """Scans one chunk of images into numpy arrays."""

  def __init__(self, n: int, background_min: int):
    self.background_min = background_min
    self.status = np.zeros(n, np.int8)
    self.errors: dict[int, str] = {}
    # Most files are 96x96x3; the slow paths overwrite this.
    self.shape = np.tile(np.asarray(IMAGE_SHAPE, np.int32), (n, 1))
    self.dtypes: dict[int, str] = {}  # Only where not uint8.
    self.min = np.full(n, -1, np.int16)
    self.max = np.full(n, -1, np.int16)
    self.sum = np.zeros((n, 3))
    self.sumsq = np.zeros((n, 3))
    self.background = np.zeros(n, np.int32)
    self.sha1 = [""] * n
    self._b = _worker_buffers()
    self._slots: list[int] = []  # Chunk indices of the batch's images.

  def scan(self, paths: Sequence[str]) -> None:
    """Reads, decodes, validates, hashes and measures every image.

    One loop with everything it calls bound to locals: at ~45 us an image,
    attribute lookups and a method call per image are a visible share.
    """
    b = self._b
    slots = b.slots
    batch = self._slots  # Chunk indices of the images in the batch.
    digests = self.sha1
    pixel_offset = b.tiff.pixel_offset
    pixel_sha1 = screening.pixel_sha1
    os_open, os_readv, os_close = os.open, os.readv, os.close
    read_only = os.O_RDONLY
    for k, path in enumerate(paths):
      try:
        j = len(batch)
        slot = slots[j]
        try:
          # os.open + readv into the slot: no Python file object, no fstat,
          # no allocation (a fresh bytes object per file costs ~20 us).
          fd = os_open(path, read_only)
          try:
            n = os_readv(fd, (slot,))
            data = slot[:n] if n < _SLOT else _read_rest(fd, slot)
          finally:
            os_close(fd)
        except OSError as e:
          self._fail(k, decode.read_error(path, e))
          continue
        off = pixel_offset(data)
        if (off is None or off != b.offset) and not self._place(
            k, j, data, off, path):
          continue
        digests[k] = pixel_sha1(b.pixel_views[j])
        batch.append(k)
        if j + 1 == _BATCH:
          self.flush()
      except Exception as e:  # pylint: disable=broad-except
        # Whatever else goes wrong with one file is its row's error too.
        self._fail(k, decode.ImageError(
            path, f"unexpected {type(e).__name__}: {e}"))
    self.flush()

  def _place(self, k: int, j: int, data, off: int | None, path: str) -> bool:
    """Puts image k's pixels at the batch's offset of slot j (slow paths).

    Args:
      k: the image's index in the chunk.
      j: its slot in the batch.
      data: the file's bytes (a view of the slot, or bytes).
      off: where its pixels start if its layout is known, else None.
      path: the file, for messages.

    Returns:
      False if the image is unusable (its fault recorded).
    """
    b = self._b
    if off is not None:  # A known layout, its pixels elsewhere in the slot.
      pixels = bytes(data[off:off + _IMAGE_BYTES])
    else:
      data = bytes(data)  # The slot is about to be overwritten.
      pixels = self._decode(k, data, path)
      if pixels is None:
        return False
      off = b.tiff.pixel_offset(data)  # Known now if `learn` took it.
    if b.offset < 0:  # The first image decides where pixels sit in a slot.
      b.set_offset(off)
    b.pixel_views[j][:] = memoryview(pixels).cast("B")
    return True

  def _fail(self, k: int, fault: decode.ImageError) -> None:
    """Records why image k cannot be used."""
    self.status[k] = (_BAD_SHAPE if fault.flag == screening.BAD_SHAPE else
                      _UNREADABLE)
    self.errors[k] = fault.detail
    if fault.shape is None:
      self.shape[k] = -1
      self.dtypes.pop(k, None)
    else:
      self._describe(k, fault.shape, fault.dtype)

  def _describe(self, k: int, shape: tuple, dtype: str) -> None:
    """Records what image k decoded to."""
    s = shape  # A 2-D image has one channel.
    self.shape[k] = (s[0] if s else 0, s[1] if len(s) > 1 else 1,
                     s[2] if len(s) > 2 else 1)
    if dtype != "uint8":
      self.dtypes[k] = dtype

  def _decode(self, k: int, data: bytes, path: str) -> np.ndarray | None:
    try:
      raw = decode.decode_raw(data, path)
      valid = decode.validate(raw, path)
    except decode.ImageError as e:
      self._fail(k, e)
      return None
    self._describe(k, raw.shape, str(raw.dtype))
    self._b.tiff.learn(data, valid)
    return valid

  def flush(self) -> None:
    """Computes the statistics of the buffered images in one vector pass."""
    m = len(self._slots)
    if not m:
      return
    idx = np.asarray(self._slots)
    b = self._b
    px = b.pixels[:m]  # [m, 27648]: rows _SLOT bytes apart.
    self.min[idx] = px.min(axis=1)
    self.max[idx] = px.max(axis=1)
    f = b.f32[:m]
    np.copyto(f, px.reshape(m, _ROWS, _ROW_VALUES), casting="unsafe")
    self.sum[idx] = _per_channel(f.sum(axis=1))
    # einsum squares and sums in one pass, without writing the squares.
    self.sumsq[idx] = _per_channel(np.einsum("mrk,mrk->mk", f, f))
    # Background: all three channel bytes of a pixel >= background_min. A
    # strided per-channel view costs ~9 us an image; contiguous ops on
    # shifted views cost ~3: all3[i] = ge[i] & ge[i+1] & ge[i+2] holds the
    # answer for the pixel starting at i, which matters only for i % 3 == 0.
    ge = np.greater_equal(px, self.background_min, out=b.ge[:m])
    all3 = b.all3[:m]
    np.logical_and(ge[:, :-2], ge[:, 1:-1], out=all3[:, :-2])
    np.logical_and(all3[:, :-2], ge[:, 2:], out=all3[:, :-2])
    # Rows of 768 values start on pixel boundaries: add the 36 rows (<= 36
    # fits uint8), then count the pixel-start columns.
    rows = all3.view(np.uint8).reshape(m, _ROWS, _ROW_VALUES).sum(
        axis=1, dtype=np.uint8)
    self.background[idx] = rows[:, ::3].sum(axis=1)
    self._slots.clear()


def _learn_layout(paths: Sequence[str], tries: int = 8) -> None:
  """Learns the split's TIFF layout here, before the workers are forked.

  Forked workers inherit it (and the imports the decoder and the layout
  check make, ~50 ms of CPU each) instead of each paying for them.

  Args:
    paths: image files; the first of `tries` that decodes is learned.
    tries: files to try before giving up (not every split is TIFF).
  """
  tiff = _worker_buffers().tiff
  for path in paths[:tries]:
    try:
      data = decode.read_bytes(path)
      if tiff.pixel_offset(data) is not None:
        return
      tiff.learn(data, decode.validate(decode.decode_raw(data, path), path))
      return
    except decode.ImageError:
      continue


def _read_rest(fd: int, slot) -> bytes:
  """A file larger than a slot (no 96x96 image file is): all its bytes."""
  parts = [bytes(slot)]
  while part := os.read(fd, 1 << 20):
    parts.append(part)
  return b"".join(parts)


def _chunk_columns(ids, paths, labels, s: _ChunkScanner, dark_max: int,
                   bright_min: int) -> dict[str, np.ndarray]:
  """The report columns of one chunk, duplicates not yet known."""
  n = len(ids)
  ok = s.status == _OK
  decoded = s.shape[:, 0] >= 0
  ids = np.asarray(ids, dtype=object)
  error = np.full(n, "", dtype=object)
  for k, v in s.errors.items():
    error[k] = v
  dtype = np.where(decoded, "uint8", "").astype(object)
  for k, v in s.dtypes.items():
    dtype[k] = v
  mean = s.sum / _PIXELS
  # Exact integers until the final division and root.
  std = np.sqrt(np.maximum(_PIXELS * s.sumsq - s.sum**2, 0.0)) / _PIXELS
  mean[~ok] = np.nan
  std[~ok] = np.nan
  match = np.array([report.MATCH_CODE[screening.sha1_matches(i, h)]
                    for i, h in zip(ids.tolist(), s.sha1)], np.int8)
  cols = {
      "id": ids,
      "path": np.asarray(paths, dtype=object),
      "label": np.asarray(labels, dtype=np.int64),
      "ok": ok,
      "error": error,
      "height": s.shape[:, 0], "width": s.shape[:, 1],
      "channels": s.shape[:, 2],
      "dtype": dtype,
      "min": s.min, "max": s.max,
      "mean_r": mean[:, 0], "mean_g": mean[:, 1], "mean_b": mean[:, 2],
      "std_r": std[:, 0], "std_g": std[:, 1], "std_b": std[:, 2],
      "background_frac": np.where(ok, s.background / _PIXELS, np.nan),
      "sha1": np.array(s.sha1, dtype="S40"),
      "sha1_match": np.where(ok, match, np.int8(-1)),
      "duplicate_of": np.full(n, "", dtype=object),
      "dark": ok & screening.is_dark(s.max, dark_max),
      "bright": ok & screening.is_bright(s.min, bright_min),
      "flags": np.full(n, "", dtype=object),
      "reasons": np.full(n, "", dtype=object),
  }
  flagged = ~ok | cols["dark"] | cols["bright"] | (cols["sha1_match"] == 0)
  _set_flags(cols, np.nonzero(flagged)[0], dark_max, bright_min)
  return cols


def _set_flags(cols: dict, rows, dark_max: int, bright_min: int) -> None:
  """(Re)computes the flags and reasons of the given rows in place."""
  for k in rows:
    names, reasons = [], []
    if not cols["ok"][k]:
      name = screening.BAD_SHAPE if cols["dtype"][k] else screening.UNREADABLE
      names.append(name)
      reasons.append(screening.reason(name, cols["error"][k]))
    if cols["dark"][k]:
      names.append(screening.DARK)
      reasons.append(screening.dark_reason(cols["max"][k], dark_max))
    if cols["bright"][k]:
      names.append(screening.BRIGHT)
      reasons.append(screening.bright_reason(cols["min"][k], bright_min))
    if cols["sha1_match"][k] == 0:
      names.append(screening.SHA1_MISMATCH)
      reasons.append(screening.sha1_mismatch_reason(
          cols["sha1"][k].decode()))
    if cols["duplicate_of"][k]:
      names.append(screening.DUPLICATE)
      reasons.append(screening.duplicate_reason(cols["duplicate_of"][k]))
    cols["flags"][k] = ";".join(names)
    cols["reasons"][k] = "; ".join(reasons)


# Text columns travel from the workers as {row: text} for rows that differ
# from the default; pickling 2,000 mostly empty strings per column per chunk
# would cost more than the column is worth.
_SPARSE = ("error", "dtype", "duplicate_of", "flags", "reasons")


def _text_default(cols: dict, c: str) -> np.ndarray:
  n = len(cols["ok"])
  if c == "dtype":
    return np.where(cols["height"] >= 0, "uint8", "").astype(object)
  return np.full(n, "", dtype=object)


def _pack(cols: dict) -> dict:
  """Drops id/path (the parent has them) and sparsifies text columns."""
  out = {c: v for c, v in cols.items() if c not in _SPARSE + ("id", "path")}
  for c in _SPARSE:
    default = _text_default(cols, c)
    out[c] = {int(k): cols[c][k] for k in np.nonzero(cols[c] != default)[0]}
  return out


def _unpack(parts: list[dict], records) -> dict:
  """Joins packed chunks into full columns, in record order."""
  cols = {c: np.concatenate([p[c] for p in parts]) for c in report.COLUMNS
          if c not in _SPARSE + ("id", "path")}
  cols["id"] = np.array([r.id for r in records], dtype=object)
  cols["path"] = np.array([r.path for r in records], dtype=object)
  offsets = np.cumsum([0] + [len(p["ok"]) for p in parts])
  for c in _SPARSE:
    full = _text_default(cols, c)
    for p, off in zip(parts, offsets):
      for k, v in p[c].items():
        full[off + k] = v
    cols[c] = full
  return cols



def _scan_chunk(task) -> tuple[dict, list[str]]:
  """Worker: scans one chunk of records; returns packed columns, CSV lines."""
  ids, paths, labels, dark_max, bright_min, background_min = task
  scanner = _ChunkScanner(len(paths), background_min)
  scanner.scan(paths)
  cols = _chunk_columns(ids, paths, labels, scanner, dark_max, bright_min)
  return _pack(cols), report.format_rows(cols)


def _mark_duplicates(cols: dict, lines: list[str], dark_max: int,
                     bright_min: int) -> None:
  """Marks the duplicates among the readable images, in place.

  The rule (which copy is canonical) is `screening.duplicate_of`'s.
  """
  ok_rows = np.nonzero(cols["ok"])[0]
  dups = screening.duplicate_of(cols["id"][ok_rows], cols["sha1"][ok_rows])
  if not dups:
    return
  later = sorted(ok_rows[d] for d in dups)
  for d, c in dups.items():
    cols["duplicate_of"][ok_rows[d]] = cols["id"][ok_rows[c]]
  _set_flags(cols, later, dark_max, bright_min)
  for k, line in zip(later, report.format_rows(cols, np.asarray(later))):
    lines[k] = line


class ScanResult:
  """A finished scan: its columns, CSV lines and summary (see `scan`)."""

  def __init__(self, columns: dict, lines: list[str], summary: dict):
    self.columns = columns
    self.lines = lines
    self.summary = summary

  def dataframe(self):
    """The report as a pandas DataFrame (nullable dtypes where missing)."""
    import pandas as pd  # pylint: disable=g-import-not-at-top
    data = {}
    for c in report.COLUMNS:
      v = self.columns[c]
      if c in report.INT_COLUMNS:
        data[c] = pd.array(np.where(v < 0, 0, v),
                           dtype=report.INT_COLUMNS[c])
        data[c][v < 0] = pd.NA
      elif c == "sha1":
        data[c] = v.astype(str).astype(object)
      elif c == "sha1_match":
        data[c] = pd.array(v == 1, dtype="boolean")
        data[c][v < 0] = pd.NA
      else:
        data[c] = v
    return pd.DataFrame(data, columns=list(report.COLUMNS))

  def write(self, out_dir: str) -> tuple[str, str]:
    """Writes scan.csv and scan_summary.json atomically into out_dir."""
    return report.write_lines(self.lines, self.summary, out_dir)


def run_scan(records: Sequence, workers: int | None = None,
             dark_max: int = screening.DARK_MAX,
             bright_min: int = screening.BRIGHT_MIN,
             background_min: int = screening.BACKGROUND_MIN,
             chunk_size: int = CHUNK_SIZE, progress: bool = True
             ) -> ScanResult:
  """Scans images in parallel; see `scan` (this skips building a DataFrame).

  Returns:
    A ScanResult.
  """
  t0 = time.perf_counter()
  workers = workers or os.cpu_count() or 1
  n = len(records)
  # No cycles are made here or in the (forked) workers, which inherit the
  # paused collector: it would only re-walk every live row again and again.
  with parallel.gc_paused():
    size = max(1, min(chunk_size, -(-n // (4 * workers))))
    tasks = []
    for s in range(0, n, size):
      part = records[s:s + size]
      tasks.append(([r.id for r in part], [r.path for r in part],
                    [r.label for r in part], dark_max, bright_min,
                    background_min))
    if workers > 1 and n > 1:
      _learn_layout([r.path for r in records[:8]])
    parts, lines = [], []
    bar = None
    if progress:  # tqdm's import alone is a visible share of a short scan.
      bar = progress_lib.bar(total=n, unit="img", desc="scan_quality",
                             smoothing=0.1)
    try:
      for cols, chunk_lines in parallel.imap(_scan_chunk, tasks, workers):
        parts.append(cols)
        lines += chunk_lines
        if bar is not None:
          bar.update(len(chunk_lines))
    finally:
      if bar is not None:
        bar.close()
    if not parts:
      parts = [_pack(_chunk_columns([], [], [], _ChunkScanner(
          0, background_min), dark_max, bright_min))]
    cols = _unpack(parts, records)
    _mark_duplicates(cols, lines, dark_max, bright_min)
    seconds = time.perf_counter() - t0
    summary = _summarize(cols, dark_max, bright_min, background_min)
    summary.update(scan_time_s=round(seconds, 3), workers=workers,
                   images_per_s=round(n / seconds, 1) if seconds else None)
    return ScanResult(cols, lines, summary)


def scan(records: Sequence, workers: int | None = None,
         dark_max: int = screening.DARK_MAX,
         bright_min: int = screening.BRIGHT_MIN,
         background_min: int = screening.BACKGROUND_MIN,
         chunk_size: int = CHUNK_SIZE, progress: bool = True):
  """Scans images in parallel into a report DataFrame.

  Args:
    records: `hcd.data.sources.Record`s (anything with id, path, label).
    workers: worker processes (default: all CPUs; 1 scans in-process).
    dark_max: flag `dark` when an image's max < dark_max.
    bright_min: flag `bright` when an image's min > bright_min.
    background_min: a pixel is near-white background when all its channels
      are >= background_min.
    chunk_size: images per worker task (smaller for small scans, so that all
      workers get work).
    progress: show a tqdm progress bar.

  Returns:
    (report DataFrame with scan_report.COLUMNS, one row per record in order;
     summary dict as written to scan_summary.json).
  """
  result = run_scan(records, workers, dark_max, bright_min, background_min,
                    chunk_size, progress)
  return result.dataframe(), result.summary


def _summarize(cols: dict, dark_max: int, bright_min: int,
               background_min: int, max_examples: int = 20) -> dict:
  flag_counts = {f: 0 for f in screening.FLAGS}
  examples = {f: [] for f in screening.FLAGS}
  flagged = np.nonzero(cols["flags"] != "")[0]
  for k in flagged:
    for f in cols["flags"][k].split(";"):
      flag_counts[f] += 1
      if len(examples[f]) < max_examples:
        examples[f].append(cols["id"][k])
  labels, counts = np.unique(cols["label"], return_counts=True)
  ok = cols["ok"]
  mean = lambda c: round(float(cols[c][ok].mean()), 4) if ok.any() else None
  return {
      "schema_version": report.SCHEMA_VERSION,
      "num_images": int(len(ok)),
      "num_ok": int(ok.sum()),
      "num_flagged": int(len(flagged)),
      "flag_counts": flag_counts,
      "label_counts": {str(int(k)): int(v) for k, v in zip(labels, counts)},
      "sha1_checked": int((cols["sha1_match"] >= 0).sum()),
      "thresholds": {"dark_max": dark_max, "bright_min": bright_min,
                     "background_min": background_min},
      "mean_rgb": [mean("mean_r"), mean("mean_g"), mean("mean_b")],
      "mean_background_frac": mean("background_frac"),
      "examples": {f: v for f, v in examples.items() if v},
      "created": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%dT%H:%M:%SZ"),
      "hcd_version": hcd.__version__,
  }


