"""Synthetic H&E-like patches in the Kaggle layout (demo, tests, benchmarks).

A patch is drawn from a small stain model: hematoxylin (purple, nuclei) and
eosin (pink, stroma) concentrations are turned into RGB with Beer-Lambert's
law, `rgb = 255 * exp(-optical_density)`, so empty glass comes out white.

  * stroma: eosin modulated by smooth noise, with white (near-background)
    regions where a low-frequency tissue field falls below a per-patch level;
  * nuclei: small sparse purple blobs (thresholded mid-frequency noise);
  * tumour: a dense cluster of large, dark, irregular nuclei with little
    stroma. Label 1 puts it inside the centre 32x32 (as PCam defines the
    label); independently of the label, half the patches carry the same
    texture as a distractor in the outer ring, so the label can only be read
    from the centre;
  * a few planted near-black (max < 10) and near-white (min > 245) patches,
    labelled 0, for the quality scanner to find (`num_planted` of each per
    split, at `planted_indices`).

Generation is vectorised per chunk of `CHUNK_SIZE` images, and every chunk
draws from its own seed (`seed`, split, chunk index), so the output does not
depend on the number of worker processes. The image at index i does not
depend on the split size either, except for the planted patches.

Files are written as uncompressed RGB TIFFs with the same layout as
`decode.encode_tiff` (tifffile) writes; the file name is the SHA-1 of the
pixel bytes, as Kaggle's ids are.
"""

from __future__ import annotations

import functools
import io
import json
import os

import numpy as np

from hcd import progress as progress_lib
from hcd.data import parallel
from hcd.data import screening
from hcd.fileio import atomic_write_text
from hcd.data.features import IMAGE_BYTES, IMAGE_SHAPE

CHUNK_SIZE = 512
# Images rendered at once: small enough for float planes to stay in cache.
RENDER_BATCH = 32
POSITIVE_FRACTION = 0.405  # Kaggle train: 89,117 / 220,025.
DISTRACTOR_FRACTION = 0.5
# One planted dark and one planted bright patch per this many images (at
# least one of each from PLANT_MIN_IMAGES images up).
PLANT_EVERY = 20000
PLANT_MIN_IMAGES = 20

SPLITS = {"train": 0, "test": 1}
MARKER = "hcd_synthetic.json"
TEST_LABELS_CSV = "synthetic_test_labels.csv"

# Stain optical-density vectors (Ruifrok & Johnston), per unit concentration.
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
_EOSIN = np.array([0.07, 0.99, 0.11], np.float32)
_H = IMAGE_SHAPE[0]
_CENTRE = (32, 64)  # The centre 32x32 that defines the label.


class WorkspaceError(ValueError):
  """The output directory cannot be used; the message names it."""


@functools.lru_cache(maxsize=None)
def _upsample_matrix(k: int) -> np.ndarray:
  """[96, k] bilinear interpolation matrix from a k-grid to 96 pixels."""
  x = np.clip((np.arange(_H) + 0.5) * k / _H - 0.5, 0, k - 1)
  i0 = np.floor(x).astype(np.int64)
  i1 = np.minimum(i0 + 1, k - 1)
  w = (x - i0).astype(np.float32)
  u = np.zeros((_H, k), np.float32)
  np.add.at(u, (np.arange(_H), i0), 1 - w)
  np.add.at(u, (np.arange(_H), i1), w)
  return u


def _field(rng: np.random.Generator, b: int, k: int) -> np.ndarray:
  """Smooth random fields [b, 96, 96], about unit variance at grid scale k."""
  low = rng.standard_normal((b, k, k), dtype=np.float32)
  u = _upsample_matrix(k)
  return u @ low @ u.T


def _boxes(r0: np.ndarray, c0: np.ndarray, h: np.ndarray,
           w: np.ndarray) -> np.ndarray:
  """Boolean masks [b, 96, 96] of per-image boxes [r0, r0+h) x [c0, c0+w)."""
  rows = np.arange(_H)[None, :, None]
  cols = np.arange(_H)[None, None, :]
  ex = lambda a: np.asarray(a)[:, None, None]
  return ((rows >= ex(r0)) & (rows < ex(r0) + ex(h)) &
          (cols >= ex(c0)) & (cols < ex(c0) + ex(w)))


def _ring_boxes(rng: np.random.Generator, b: int) -> np.ndarray:
  """Tumour-like distractor boxes lying entirely outside the centre 32x32."""
  size = rng.integers(16, 31, b)
  along = rng.integers(0, _H - size + 1)
  across = rng.integers(0, _CENTRE[0] - size + 1)
  side = rng.integers(0, 4, b)
  # Sides 0/1: top/bottom band (rows < 32 or >= 64); 2/3: left/right band.
  across = np.where(side % 2 == 0, across, _H - size - across)
  r0 = np.where(side < 2, across, along)
  c0 = np.where(side < 2, along, across)
  return _boxes(r0, c0, size, size)


def _ramp(x: np.ndarray, gain: float) -> np.ndarray:
  """clip(x * gain, 0, 1), in place (np.clip's wrapper is slow here)."""
  x *= gain
  np.maximum(x, 0.0, out=x)
  np.minimum(x, 1.0, out=x)
  return x


def _render(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
  """Renders uint8 [b, 96, 96, 3] tissue patches for the given labels."""
  b = len(labels)
  per = lambda lo, hi: rng.uniform(lo, hi, b).astype(np.float32)[:, None, None]

  # Tissue vs empty glass: most patches are full of tissue, some half empty.
  tissue = _ramp(_field(rng, b, 4) + per(0.0, 4.0), 2.0)
  eosin = per(0.35, 0.60) + 0.15 * _field(rng, b, 12)
  np.maximum(eosin, 0.05, out=eosin)
  eosin *= tissue
  nuclei = _ramp(_field(rng, b, 24) - per(1.1, 1.6), 3.0)
  hema = tissue * (per(0.08, 0.16) + per(0.7, 1.0) * nuclei)

  # Tumour texture: larger, denser, darker nuclei, little stroma.
  dense = _field(rng, b, 12) + 0.6 * _field(rng, b, 24)
  tumour_nuclei = _ramp(dense - per(-0.3, 0.3), 2.0)
  tumour_hema = per(0.20, 0.30) + per(1.2, 1.6) * tumour_nuclei
  tumour_eosin = per(0.20, 0.30) + 0.05 * tumour_nuclei

  # Positive: a cluster covering most of the centre 32x32 (its ragged edge
  # comes from a smooth field), never outside it.
  lo = rng.integers(_CENTRE[0], _CENTRE[0] + 5, (2, b))
  hi = rng.integers(_CENTRE[1] - 4, _CENTRE[1] + 1, (2, b))
  centre = _boxes(lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])
  centre &= _field(rng, b, 8) > -0.8
  centre &= (labels == 1)[:, None, None]
  ring = _ring_boxes(rng, b) & (_field(rng, b, 8) > -0.8)
  ring &= (rng.random(b) < DISTRACTOR_FRACTION)[:, None, None]
  region = centre | ring
  hema = np.where(region, tumour_hema, hema)
  eosin = np.where(region, tumour_eosin, eosin)

  strength = per(0.8, 1.25)  # Slide-to-slide stain variation.
  hema *= strength
  out = np.empty((b,) + IMAGE_SHAPE, np.uint8)
  # Sensor noise, drawn as random bytes because that is cheap.
  noise = np.frombuffer(rng.bytes(out.size), np.uint8).reshape(out.shape) & 7
  plane = np.empty_like(hema)
  tmp = np.empty_like(hema)
  for c in range(3):  # Planes stay contiguous and small; no [b,96,96,3] floats.
    np.multiply(hema, -_HEMATOXYLIN[c], out=plane)
    np.multiply(eosin, -_EOSIN[c], out=tmp)
    plane += tmp
    plane -= 0.02
    np.exp(plane, out=plane)
    plane *= 255.0
    plane += 0.5
    plane -= noise[..., c]
    np.clip(plane, 0, 255, out=plane)
    out[..., c] = plane
  return out


def num_planted(n: int) -> int:
  """Number of planted dark (and, as many, bright) patches among n images."""
  if n < PLANT_MIN_IMAGES:
    return 0
  return max(1, round(n / PLANT_EVERY))


def planted_indices(n: int, seed: int, split: str = "train"
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the planted (dark, bright) patches of a split of n images."""
  k = num_planted(n)
  rng = np.random.default_rng([seed, SPLITS[split], 1 << 20])
  idx = rng.choice(n, 2 * k, replace=False) if k else np.zeros(0, np.int64)
  return np.sort(idx[:k]), np.sort(idx[k:])


def make_chunk(seed: int, split: str, chunk: int, n: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """Generates chunk `chunk` of a split of n images.

  Args:
    seed: the workspace seed.
    split: "train" or "test".
    chunk: chunk index; it covers images [chunk*CHUNK_SIZE, ...) of the split.
    n: the split size (the last chunk is cut short, plants depend on it).

  Returns:
    (images uint8 [m, 96, 96, 3], labels int64 [m]).
  """
  start = chunk * CHUNK_SIZE
  m = min(CHUNK_SIZE, n - start)
  if m <= 0:
    raise ValueError(f"chunk {chunk} is empty for a split of {n} images")
  rng = np.random.default_rng([seed, SPLITS[split], chunk])
  # Labels are drawn for a full chunk and sub-batches render in order, so
  # image i never depends on n; planted pixels use a stream of their own.
  labels = (rng.random(CHUNK_SIZE) < POSITIVE_FRACTION).astype(np.int64)
  images = np.concatenate([_render(rng, labels[s:s + RENDER_BATCH])
                           for s in range(0, m, RENDER_BATCH)])[:m]
  labels = labels[:m]
  dark, bright = planted_indices(n, seed, split)
  plant_rng = np.random.default_rng([seed, SPLITS[split], chunk, 1])
  for idx, lo, hi in ((dark, 0, screening.DARK_MAX),
                      (bright, screening.BRIGHT_MIN + 1, 256)):
    idx = idx[(idx >= start) & (idx < start + m)] - start
    if len(idx):
      images[idx] = plant_rng.integers(lo, hi, (len(idx),) + IMAGE_SHAPE,
                                       dtype=np.uint8)
      labels[idx] = 0
  return images, labels


def make_images(n: int, seed: int = 0, split: str = "train"
                ) -> tuple[np.ndarray, np.ndarray]:
  """Generates a split in memory: exactly the pixels write_workspace writes.

  Args:
    n: number of images.
    seed: the workspace seed.
    split: "train" or "test".

  Returns:
    (images uint8 [n, 96, 96, 3], labels int64 [n]).
  """
  if n == 0:
    return np.zeros((0,) + IMAGE_SHAPE, np.uint8), np.zeros(0, np.int64)
  parts = [make_chunk(seed, split, c, n) for c in range(_num_chunks(n))]
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]))


def image_id(image: np.ndarray) -> str:
  """The Kaggle id of an image: SHA-1 hex of its raw pixel bytes."""
  return screening.pixel_sha1(np.ascontiguousarray(image))


@functools.lru_cache(maxsize=1)
def _tiff_template() -> tuple[bytes, bytes]:
  """(header, trailer) around the pixel bytes of a tifffile-written TIFF.

  tifffile writes one contiguous uncompressed strip for a 96x96x3 image, so
  every file is the same header, the pixels, and the same trailer; encoding
  once and splicing pixels in is ~10x faster than calling tifffile per file.
  """
  import tifffile  # pylint: disable=g-import-not-at-top
  from hcd.data.decode import encode_tiff  # pylint: disable=g-import-not-at-top
  probe = np.arange(IMAGE_BYTES, dtype=np.uint32).astype(np.uint8).reshape(
      IMAGE_SHAPE)
  data = encode_tiff(probe)
  with tifffile.TiffFile(io.BytesIO(data)) as tif:
    page = tif.pages[0]
    offsets, counts = page.dataoffsets, page.databytecounts
  if page.compression != 1 or sum(counts) != IMAGE_BYTES or any(
      o2 != o1 + c1 for o1, c1, o2 in zip(offsets, counts, offsets[1:])):
    raise RuntimeError("tifffile no longer writes one contiguous "
                       "uncompressed strip; update synthetic._tiff_template")
  off = offsets[0]
  if data[off:off + IMAGE_BYTES] != probe.tobytes():
    raise RuntimeError("TIFF template self-check failed")
  return data[:off], data[off + IMAGE_BYTES:]


def tiff_bytes(image: np.ndarray) -> bytes:
  """Encodes one uint8 [96, 96, 3] image as an uncompressed RGB TIFF."""
  header, trailer = _tiff_template()
  return header + np.ascontiguousarray(image).tobytes() + trailer


def _num_chunks(n: int) -> int:
  return -(-n // CHUNK_SIZE)


def _write_chunk(task: tuple[str, int, str, int, int]
                 ) -> tuple[list[str], np.ndarray]:
  """Worker: generates one chunk and writes its TIFFs; returns ids, labels."""
  out_dir, seed, split, chunk, n = task
  images, labels = make_chunk(seed, split, chunk, n)
  split_dir = os.path.join(out_dir, split)
  ids = []
  for img in images:
    i = image_id(img)
    # Content-addressed names: a rerun rewrites identical bytes, so writing
    # in place is safe; completeness is marked by the CSVs and the marker.
    with open(os.path.join(split_dir, i + ".tif"), "wb") as f:
      f.write(tiff_bytes(img))
    ids.append(i)
  return ids, labels


def _csv(ids: list[str], labels) -> str:
  return "id,label\n" + "".join(f"{i},{int(l)}\n" for i, l in zip(ids, labels))


def _read_marker(out_dir: str) -> dict | None:
  path = os.path.join(out_dir, MARKER)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkspaceError(f"{path}: unreadable synthetic-workspace marker: "
                         f"{e}; delete {out_dir} and rerun") from None


def write_workspace(out_dir: str, num_train: int, num_test: int, seed: int = 0,
                    workers: int | None = None, progress: bool = True) -> dict:
  """Writes (or confirms) a synthetic Kaggle-layout workspace.

  Layout: `train/<id>.tif`, `test/<id>.tif`, `train_labels.csv`,
  `sample_submission.csv` (test ids in generation order, label 0), and, since
  the data is synthetic, the test answers in `synthetic_test_labels.csv`.
  The CSVs are renamed into place after all images are written, and the
  marker `hcd_synthetic.json` records the parameters and completion last.

  Over 60 lines only for documenting each argument.

  Args:
    out_dir: the workspace directory (created if missing).
    num_train: number of training images (0 to 220,025 or more).
    num_test: number of test images.
    seed: the seed; the same arguments give byte-identical files.
    workers: worker processes (default: all CPUs); never changes the output.
    progress: show a tqdm progress bar.

  Returns:
    The marker dict: parameters, counts, `complete: True`, plus
    `already_complete` when nothing had to be done.

  Raises:
    WorkspaceError: out_dir holds something that is not a synthetic
      workspace, or a complete one made with other parameters.
  """
  if num_train < 0 or num_test < 0:
    raise WorkspaceError(f"{out_dir}: image counts must be >= 0, got "
                         f"num_train={num_train} num_test={num_test}")
  params = {"num_train": int(num_train), "num_test": int(num_test),
            "seed": int(seed), "generator": "hcd.data.synthetic v1"}
  marker = _read_marker(out_dir)
  if _matches_complete(out_dir, marker, params):
    return dict(marker, already_complete=True)
  for split in SPLITS:
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
  atomic_write_text(os.path.join(out_dir, MARKER),
                    json.dumps(dict(params, complete=False), indent=1) + "\n")
  sizes = {"train": num_train, "test": num_test}
  ids, labels = _write_images(out_dir, seed, sizes, workers, progress)

  # Files left by an interrupted run with other parameters would otherwise
  # show up as images without labels.
  for split in SPLITS:
    keep = {i + ".tif" for i in ids[split]}
    split_dir = os.path.join(out_dir, split)
    for name in os.listdir(split_dir):
      if name not in keep:
        os.remove(os.path.join(split_dir, name))

  atomic_write_text(os.path.join(out_dir, "train_labels.csv"),
                    _csv(ids["train"], labels["train"]))
  atomic_write_text(os.path.join(out_dir, TEST_LABELS_CSV),
                    _csv(ids["test"], labels["test"]))
  atomic_write_text(os.path.join(out_dir, "sample_submission.csv"),
                    _csv(ids["test"], np.zeros(num_test, np.int64)))
  done = dict(params, complete=True,
              num_positive={s: int(labels[s].sum()) for s in SPLITS},
              num_planted={s: num_planted(sizes[s]) for s in SPLITS})
  atomic_write_text(os.path.join(out_dir, MARKER),
                    json.dumps(done, indent=1) + "\n")
  return done


def _matches_complete(out_dir: str, marker: dict | None,
                      params: dict) -> bool:
  """Whether out_dir already holds this complete workspace.

  Raises:
    WorkspaceError: out_dir holds another complete synthetic workspace, or
      something that is not one.
  """
  if marker is None:
    if os.path.isdir(out_dir) and os.listdir(out_dir):
      raise WorkspaceError(f"{out_dir}: exists, is not empty and is not a "
                           f"synthetic workspace; refusing to write into it")
    return False
  same = all(marker.get(k) == v for k, v in params.items())
  if same and marker.get("complete"):
    return True
  if not same and marker.get("complete"):
    theirs = {k: marker.get(k) for k in params}
    raise WorkspaceError(
        f"{out_dir}: already holds a synthetic workspace made with "
        f"{theirs}; delete it or choose another --out_dir")
  return False


def _write_images(out_dir: str, seed: int, sizes: dict[str, int],
                  workers: int | None, progress: bool):
  """Writes every split's images in chunks; returns (ids, labels) by split."""
  tasks = [(out_dir, seed, s, c, sizes[s]) for s in SPLITS
           for c in range(_num_chunks(sizes[s]))]
  workers = workers or os.cpu_count() or 1
  ids = {s: [] for s in SPLITS}
  labels = {s: [] for s in SPLITS}
  with progress_lib.bar(total=sum(sizes.values()), unit="img",
                        enabled=progress, desc="make_synthetic",
                        smoothing=0.1) as bar:
    for task, (chunk_ids, chunk_labels) in zip(
        tasks, parallel.imap(_write_chunk, tasks, workers)):
      ids[task[2]] += chunk_ids
      labels[task[2]].append(chunk_labels)
      bar.update(len(chunk_ids))
  labels = {s: np.concatenate(v) if v else np.zeros(0, np.int64)
            for s, v in labels.items()}
  return ids, labels
