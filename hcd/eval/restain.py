"""Stain shift: a labelled split re-stained to the H&E stain of another source.

A model that earns its keep on slides from other labs must survive their
stain. `hcd_evaluate --restain_to=SOURCE` scores a split twice: as it is,
and re-stained to the stain of SOURCE (a whole-slide image, e.g. an Aperio
.svs from another lab and scanner, or a folder of patches), by one mapping
for the whole split:

  macenko   Macenko et al. 2009: the H&E stain vectors and the 99th
            percentile of each stain's concentration, estimated (by
            torchstain) once from the tissue pixels of SOURCE and once from
            the tissue pixels of the whole split. Every image is unmixed
            with the split's vectors, its concentrations scaled by the ratio
            of the two percentiles and mixed again with SOURCE's vectors:
            in optical density a fixed 3x3 linear map.
  reinhard  Reinhard et al. 2001: each LAB channel's mean and standard
            deviation (torchstain's LAB conversion), of SOURCE's tissue and
            of the whole split's tissue; every pixel's LAB values are moved
            from the split's statistics to SOURCE's.

One mapping for the split (not one per patch, torchstain's own use) keeps
the differences between patches: a pale patch stays paler than a dark one,
as it would on a slide from that lab. "Tissue" is the pixels whose optical
density reaches Macenko's beta (0.15) in some channel; white background is
left out of every estimate. Neither family is hcd's training augmentation
(an HED jitter per image), so a good score here is not learned by heart.

Pixels for the estimates are a fixed random sample (at most
`MAX_FIT_PIXELS`), so any size of split or slide costs the same.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from hcd.data import decode

METHODS = ("macenko", "reinhard")
# Transmitted light and the optical density below which a pixel is
# background: torchstain's (and Macenko's) defaults.
_IO = 240.0
_BETA = 0.15
MAX_FIT_PIXELS = 2_000_000
# A slide level read for the estimate holds at most this many pixels (the
# level of the pyramid closest to it; colour statistics need no detail).
_MAX_SLIDE_PIXELS = 40_000_000


class RestainError(ValueError):
  """A stain source that cannot be used; the message names it."""


def check_methods(methods: Sequence[str]) -> list[str]:
  """The methods asked for, checked.

  Raises:
    ValueError: an unknown method or none, naming the known ones.
  """
  methods = [m.strip() for m in methods if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f"--restain_method must be one or more of "
                     f"{list(METHODS)}, got {unknown or methods}")
  return list(dict.fromkeys(methods))


def tissue_pixels(pixels: np.ndarray) -> np.ndarray:
  """The pixels (N, 3 uint8) dark enough to be stained tissue."""
  od = -np.log((pixels.astype(np.float32) + 1) / _IO)
  return pixels[(od >= _BETA).any(axis=1)]


def _sample(pixels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
  if len(pixels) <= limit:
    return pixels
  idx = np.random.default_rng(seed).choice(len(pixels), limit, replace=False)
  return pixels[np.sort(idx)]


def _read_slide(path: str) -> np.ndarray:
  """RGB pixels of a whole-slide image, from a level of modest size."""
  import tifffile  # pylint: disable=g-import-not-at-top
  try:
    with tifffile.TiffFile(path) as tif:
      levels = tif.series[0].levels
      # The most detailed level that is not too large to read whole.
      fits = [lv for lv in levels if np.prod(lv.shape[:2]) <= _MAX_SLIDE_PIXELS]
      level = fits[0] if fits else levels[-1]
      if np.prod(level.shape[:2]) > 4 * _MAX_SLIDE_PIXELS:
        raise RestainError(
            f"{path}: its smallest level is {level.shape[1]} x "
            f"{level.shape[0]} px; give a slide with a pyramid, a smaller "
            f"region or a folder of patches")
      img = level.asarray()
  except RestainError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise RestainError(f"{path}: cannot read it as a slide: "
                       f"{type(e).__name__}: {e}") from None
  if img.ndim != 3 or img.shape[-1] not in (3, 4) or img.dtype != np.uint8:
    raise RestainError(f"{path}: {img.shape} {img.dtype} pixels, expected "
                       f"8-bit RGB")
  return img[..., :3].reshape(-1, 3)


def _read_folder(path: str) -> np.ndarray:
  """RGB pixels of every image under a folder (any depth)."""
  files = sorted(
      os.path.join(root, name) for root, _, names in os.walk(path)
      for name in names if name.lower().endswith(decode.IMAGE_EXTS))
  if not files:
    raise RestainError(f"{path}: no images ({', '.join(decode.IMAGE_EXTS)}) "
                       f"in it")
  # An even spread of at most 4096 patches is plenty for six statistics.
  step = max(1, len(files) // 4096)
  try:
    return np.concatenate([decode.read_image(f).reshape(-1, 3)
                           for f in files[::step]])
  except decode.ImageError as e:
    raise RestainError(str(e)) from None


def source_pixels(path: str) -> np.ndarray:
  """The tissue pixels (N, 3 uint8) of a stain source: a slide or a folder.

  Raises:
    RestainError: missing, unreadable, or without tissue; named.
  """
  if os.path.isdir(path):
    pixels = _read_folder(path)
  elif os.path.isfile(path):
    pixels = _read_slide(path)
  else:
    raise RestainError(f"{path}: no such slide or folder (--restain_to)")
  tissue = tissue_pixels(pixels)
  if len(tissue) < 1000:
    raise RestainError(f"{path}: only {len(tissue)} tissue pixels (optical "
                       f"density >= {_BETA}); is it an H&E image?")
  return _sample(tissue, MAX_FIT_PIXELS)


@dataclasses.dataclass
class StainMapping:
  """One re-staining of a split: fitted once, applied to every image.

  Attributes:
    method: "macenko" or "reinhard".
    params: the fitted numbers (JSON-able), for metrics.json.
  """
  method: str
  params: dict

  @classmethod
  def fit(cls, method: str, split_tissue: np.ndarray,
          target_tissue: np.ndarray) -> "StainMapping":
    """Fits the mapping from the split's stain to the target's.

    Args:
      method: "macenko" or "reinhard".
      split_tissue: tissue pixels (N, 3 uint8) pooled over the split.
      target_tissue: tissue pixels (M, 3 uint8) of the stain source.

    Returns:
      The mapping.

    Raises:
      RestainError: the stain cannot be estimated (e.g. one colour only).
    """
    import torchstain  # pylint: disable=g-import-not-at-top
    if method == "macenko":
      fitted = []
      for pixels in (split_tissue, target_tissue):
        n = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        try:
          n.fit(pixels[None], Io=_IO, beta=_BETA)
        except (np.linalg.LinAlgError, ValueError, IndexError) as e:
          raise RestainError(f"Macenko stain estimate failed: {e}") from None
        fitted.append((np.asarray(n.HERef, np.float64),
                       np.asarray(n.maxCRef, np.float64)))
      (he_s, max_s), (he_t, max_t) = fitted
      if not (np.all(np.isfinite(he_s)) and np.all(max_s > 0)):
        raise RestainError("Macenko stain estimate of the split failed "
                           "(too few stained pixels)")
      # OD_target = HE_t diag(maxC_t / maxC_s) pinv(HE_s) OD_split.
      matrix = he_t @ np.diag(max_t / max_s) @ np.linalg.pinv(he_s)
      return cls(method, {"matrix": matrix.tolist(),
                          "split_stain_vectors": he_s.tolist(),
                          "split_max_concentrations": max_s.tolist(),
                          "target_stain_vectors": he_t.tolist(),
                          "target_max_concentrations": max_t.tolist()})
    if method == "reinhard":
      stats = []
      for pixels in (split_tissue, target_tissue):
        n = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
        n.fit(pixels[None])
        stats.append((np.asarray(n.target_means, np.float64),
                      np.asarray(n.target_stds, np.float64)))
      (mu_s, sd_s), (mu_t, sd_t) = stats
      if not np.all(sd_s > 0):
        raise RestainError("the split's LAB statistics have no spread")
      return cls(method, {"split_lab_mean": mu_s.tolist(),
                          "split_lab_std": sd_s.tolist(),
                          "target_lab_mean": mu_t.tolist(),
                          "target_lab_std": sd_t.tolist()})
    raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")

  def apply(self, images: np.ndarray) -> np.ndarray:
    """Re-stains uint8 images [..., 3]; returns uint8 of the same shape."""
    x = images.astype(np.float32)
    if self.method == "macenko":
      od = -np.log((x + 1) / _IO)
      m = np.asarray(self.params["matrix"], np.float32)
      out = _IO * np.exp(-(od @ m.T))
      return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    from torchstain.numpy.utils.lab2rgb import lab2rgb  # pylint: disable=g-import-not-at-top
    from torchstain.numpy.utils.rgb2lab import rgb2lab  # pylint: disable=g-import-not-at-top
    from torchstain.numpy.utils.split import lab_merge  # pylint: disable=g-import-not-at-top
    from torchstain.numpy.utils.split import lab_split  # pylint: disable=g-import-not-at-top
    p = {k: np.asarray(v, np.float32) for k, v in self.params.items()}
    labs = lab_split(rgb2lab(x / 255))
    moved = [(c - p["split_lab_mean"][i]) / p["split_lab_std"][i] *
             p["target_lab_std"][i] + p["target_lab_mean"][i]
             for i, c in enumerate(labs)]
    rgb = lab2rgb(lab_merge(*moved))
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def split_tissue(dataset, num_examples: int | None,
                 limit: int = MAX_FIT_PIXELS) -> np.ndarray:
  """Tissue pixels pooled over a split: an even random sample of each batch.

  Args:
    dataset: {"image", ...} batches (hcd.eval.inputs.Source.dataset).
    num_examples: images in it (None: take every tissue pixel, capped).
    limit: pixels to keep at most.

  Returns:
    (N, 3) uint8 tissue pixels.
  """
  per_image = max(64, limit // max(num_examples or 1, 1))
  rng = np.random.default_rng(0)
  parts = []
  for batch in dataset:
    images = batch["image"].numpy()
    pixels = images.reshape(len(images), -1, 3)
    pick = rng.integers(0, pixels.shape[1], (len(images), per_image))
    taken = np.take_along_axis(pixels, pick[..., None], axis=1)
    parts.append(tissue_pixels(taken.reshape(-1, 3)))
  tissue = np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)
  if len(tissue) < 1000:
    raise RestainError(f"only {len(tissue)} tissue pixels in the split: "
                       f"nothing to re-stain")
  return _sample(tissue, limit)


def restained_dataset(dataset, mapping: StainMapping):
  """The dataset with every image batch re-stained (shapes kept)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def restain(batch):
    images = tf.numpy_function(mapping.apply, [batch["image"]], tf.uint8,
                               stateful=False)
    images.set_shape(batch["image"].shape)
    return {**batch, "image": images}

  return dataset.map(restain, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True)


def example_grid(images: np.ndarray, labels: Sequence[int],
                 restained: dict[str, np.ndarray], path: str,
                 title: str) -> str:
  """A PNG: a row of patches as they are, then a row per re-staining.

  Args:
    images: uint8 [n, 96, 96, 3].
    labels: their n labels.
    restained: method -> the same images re-stained.
    path: the PNG to write.
    title: the figure's title.

  Returns:
    path.
  """
  from hcd import plots  # pylint: disable=g-import-not-at-top
  rows = [("as is", images)] + list(restained.items())
  n = len(images)
  return plots.sample_grid(
      np.concatenate([imgs for _, imgs in rows]), path,
      labels=list(labels) * len(rows),
      captions=[name for name, _ in rows for _ in range(n)], ncols=n,
      title=title)
