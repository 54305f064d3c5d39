"""Image screening: the one place that decides what is wrong with an image.

Both the quality scanner (`hcd.data.quality`, tools/scan_quality) and the
shard writer (`hcd.data.writer`, tools/make_shards) screen images by these
rules, so a scan report and a manifest always agree on what a flag means and
word its reason the same way (an unreadable or badly shaped file is
hcd.data.decode's ImageError, whose `reason` reads the same way):

  unreadable     the file cannot be read or decoded (empty, truncated, ...)
  bad_shape      it decodes, but not to 96x96 RGB uint8 (an opaque alpha
                 channel is dropped, not a fault)
  dark           max over all pixels and channels < DARK_MAX (10)
  bright         min over all pixels and channels > BRIGHT_MIN (245)
  sha1_mismatch  a Kaggle id (40 lowercase hex digits) that is not the SHA-1
                 of the pixel bytes: the file is not the image its name (and
                 so its label) claims
  duplicate      the same pixels as another image of the split that is the
                 canonical copy (see `duplicate_of`)

A pixel is near-white background when all its channels are >=
BACKGROUND_MIN (220). Reasons read `<flag>: <detail>`, e.g.
`dark: max 7 < 10` or `duplicate: same pixels as <id>` (WORKSPACE.md lists
them). TensorFlow-free: the scanner's and the writer's worker processes
import this.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np

from hcd.data import decode

DARK_MAX = 10
BRIGHT_MIN = 245
BACKGROUND_MIN = 220

# An unusable file: decode.ImageError carries one of these two flags.
UNREADABLE = decode.UNREADABLE
BAD_SHAPE = decode.BAD_SHAPE
DARK = "dark"
BRIGHT = "bright"
SHA1_MISMATCH = "sha1_mismatch"
DUPLICATE = "duplicate"
# Every flag, in the order a report lists them.
FLAGS = (UNREADABLE, BAD_SHAPE, DARK, BRIGHT, SHA1_MISMATCH, DUPLICATE)
# Which ids are checked against the SHA-1 of their pixels, as a manifest
# records it.
SHA1_CHECK = "ids of 40 hex digits"

_KAGGLE_ID = re.compile(r"[0-9a-f]{40}")


def reason(flag: str, detail: str) -> str:
  """Words a flag's reason.

  Args:
    flag: one of FLAGS.
    detail: what is wrong.

  Returns:
    "<flag>: <detail>".
  """
  return f"{flag}: {detail}"


def dark_reason(image_max: int, dark_max: int = DARK_MAX) -> str:
  """The reason of a dark image.

  Args:
    image_max: the image's max over all pixels and channels.
    dark_max: the threshold it is below.

  Returns:
    e.g. "dark: max 7 < 10".
  """
  return reason(DARK, f"max {image_max} < {dark_max}")


def bright_reason(image_min: int, bright_min: int = BRIGHT_MIN) -> str:
  """The reason of a bright image.

  Args:
    image_min: the image's min over all pixels and channels.
    bright_min: the threshold it is above.

  Returns:
    e.g. "bright: min 250 > 245".
  """
  return reason(BRIGHT, f"min {image_min} > {bright_min}")


def sha1_mismatch_reason(digest: str) -> str:
  """The reason of an id that is not its pixels' SHA-1.

  Args:
    digest: the hex SHA-1 of the pixels.

  Returns:
    "sha1_mismatch: pixels hash to <digest>".
  """
  return reason(SHA1_MISMATCH, f"pixels hash to {digest}")


def duplicate_reason(canonical_id: str) -> str:
  """The reason of a duplicate.

  Args:
    canonical_id: the id of the image it duplicates (`duplicate_of`).

  Returns:
    "duplicate: same pixels as <canonical_id>".
  """
  return reason(DUPLICATE, f"same pixels as {canonical_id}")


def is_dark(image_max, dark_max: int = DARK_MAX):
  """Whether an image (or each of an array of images) is dark.

  Args:
    image_max: max over all pixels and channels (a number or an array).
    dark_max: dark below this.

  Returns:
    bool, or a bool array.
  """
  return image_max < dark_max


def is_bright(image_min, bright_min: int = BRIGHT_MIN):
  """Whether an image (or each of an array of images) is bright.

  Args:
    image_min: min over all pixels and channels (a number or an array).
    bright_min: bright above this.

  Returns:
    bool, or a bool array.
  """
  return image_min > bright_min


def dark_bright_reason(image_min: int, image_max: int,
                       dark_max: int = DARK_MAX,
                       bright_min: int = BRIGHT_MIN) -> str | None:
  """The dark or bright reason of one image.

  An image can only be both with dark_max > bright_min; it is then reported
  dark.

  Args:
    image_min: its min over all pixels and channels.
    image_max: its max.
    dark_max: see `is_dark`.
    bright_min: see `is_bright`.

  Returns:
    The reason, or None if the image is neither.
  """
  if is_dark(image_max, dark_max):
    return dark_reason(image_max, dark_max)
  if is_bright(image_min, bright_min):
    return bright_reason(image_min, bright_min)
  return None


def is_kaggle_id(image_id: str) -> bool:
  """Whether an id looks like Kaggle's: 40 lowercase hex digits (a SHA-1).

  Args:
    image_id: the id.

  Returns:
    True for a Kaggle id (then checked against its pixels).
  """
  return _KAGGLE_ID.fullmatch(image_id) is not None


def pixel_sha1(pixels) -> str:
  """The hex SHA-1 of raw pixel bytes: a Kaggle image's id.

  Equal to `hashlib.sha1(pixels.tobytes()).hexdigest()` without the copy.

  Args:
    pixels: a C-contiguous uint8 array or a buffer.

  Returns:
    40 lowercase hex digits.
  """
  return hashlib.sha1(pixels).hexdigest()


def sha1_matches(image_id: str, digest: str) -> bool | None:
  """Whether an id is the SHA-1 `digest` of its pixels.

  Args:
    image_id: the id.
    digest: the hex SHA-1 of its pixels (`pixel_sha1`).

  Returns:
    None for ids that are not Kaggle ids (class folders: "<label>/<stem>"),
    which are never checked; else whether the id equals the digest.
  """
  return digest == image_id if is_kaggle_id(image_id) else None


def check_sha1(image_id: str, pixels) -> str | None:
  """Checks a Kaggle id against its pixels (hashing only Kaggle ids).

  Args:
    image_id: the image's id.
    pixels: its uint8 pixels, C-contiguous.

  Returns:
    The sha1_mismatch reason, or None when the id matches or is not a Kaggle
    id.
  """
  if not is_kaggle_id(image_id):
    return None
  digest = pixel_sha1(pixels)
  return None if digest == image_id else sha1_mismatch_reason(digest)


def duplicate_of(ids: Sequence[str], digests: Sequence) -> dict[int, int]:
  """Finds the duplicates among images by the SHA-1 of their pixels.

  Within a group of images with identical pixels, the canonical image is the
  one whose id IS the SHA-1 of its pixels (the genuine Kaggle file); if none
  is, the first in the given order. Every other member is a duplicate of the
  canonical one, so a genuine file is never dropped for a copy of it filed
  under another id, whichever sorts first.

  Args:
    ids: the images' ids, in record order.
    digests: their pixels' SHA-1s, as hex str or bytes (one type throughout).

  Returns:
    {index of a duplicate: index of its canonical image}; empty when all
    pixels are distinct.
  """
  digests = np.asarray(digests)
  if len(digests) < 2:
    return {}
  order = np.argsort(digests, kind="stable")
  sorted_digests = digests[order]
  same = sorted_digests[1:] == sorted_digests[:-1]
  if not same.any():
    return {}
  # Start of each run of equal digests; runs of one are not groups.
  starts = np.flatnonzero(np.concatenate(([True], ~same)))
  ends = np.append(starts[1:], len(order))
  out: dict[int, int] = {}
  for s, e in zip(starts.tolist(), ends.tolist()):
    if e - s < 2:
      continue
    members = order[s:e].tolist()  # In record order (a stable sort).
    digest = sorted_digests[s]
    hex_digest = digest.decode() if isinstance(digest, bytes) else str(digest)
    canonical = next((k for k in members if ids[k] == hex_digest), members[0])
    out.update((k, canonical) for k in members if k != canonical)
  return out
