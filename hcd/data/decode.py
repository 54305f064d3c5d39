"""Image decoding: the one module that knows imagecodecs and tensorflow-io.

Two paths:
  * numpy (`decode_bytes`, `read_image`): imagecodecs, used by the scanner and
    the shard writer in worker processes that never import TensorFlow.
  * graph (`tf_decode_tiff`): inside tf.data for prediction straight from a
    TIFF folder. tensorflow-io's `decode_tiff` when it loads (it is abandoned
    upstream and breaks with TF >= 2.18), else an imagecodecs fallback through
    `tf.numpy_function`, so tensorflow-io can be dropped by editing this file.
"""

from __future__ import annotations

import functools
import os

import imagecodecs
import numpy as np

from hcd.data.features import IMAGE_SHAPE

TIFF_EXTS = (".tif", ".tiff")
IMAGE_EXTS = TIFF_EXTS + (".png", ".jpg", ".jpeg")


class ImageError(ValueError):
  """An image that cannot be used; the message names the file and the fault."""


def _sniff(data: bytes) -> str:
  if data[:4] in (b"II*\x00", b"MM\x00*"):
    return "tiff"
  if data[:3] == b"\xff\xd8\xff":
    return "jpeg"
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "png"
  return "unknown"


def decode_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Decodes TIFF/JPEG/PNG bytes to a validated uint8 [96, 96, 3] array.

  Args:
    data: the encoded file contents.
    name: the file name used in error messages.

  Returns:
    uint8 array of shape IMAGE_SHAPE.

  Raises:
    ImageError: empty, undecodable, or not a 96x96 RGB uint8 image.
  """
  return validate(decode_raw(data, name), name)


def decode_raw(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Decodes TIFF/JPEG/PNG bytes as stored, without checking shape or type.

  The quality scanner uses this to report what a bad image actually is.

  Args:
    data: the encoded file contents.
    name: the file name used in error messages.

  Returns:
    The decoded array, whatever its shape and dtype.

  Raises:
    ImageError: empty or undecodable data.
  """
  if not data:
    raise ImageError(f"{name}: empty file (0 bytes)")
  kind = _sniff(data)
  try:
    if kind == "tiff":
      return imagecodecs.tiff_decode(data)
    if kind == "jpeg":
      return imagecodecs.jpeg8_decode(data)
    if kind == "png":
      return imagecodecs.png_decode(data)
  except Exception as e:  # imagecodecs raises several codec-specific types.
    raise ImageError(f"{name}: cannot decode {kind}: "
                     f"{type(e).__name__}: {e}") from None
  raise ImageError(f"{name}: not a TIFF, JPEG or PNG file "
                   f"(first bytes {data[:8]!r})")


def validate(img: np.ndarray, name: str) -> np.ndarray:
  """Checks that a decoded image is 96x96 RGB uint8; drops an opaque alpha.

  Raises:
    ImageError: naming the file and what is wrong.
  """
  if img.dtype != np.uint8:
    raise ImageError(f"{name}: pixel type {img.dtype}, expected uint8 "
                     f"(8 bits per channel)")
  if img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 1):
    raise ImageError(f"{name}: grayscale image {img.shape}, expected RGB "
                     f"{IMAGE_SHAPE}")
  if img.ndim == 3 and img.shape[-1] == 4:
    # A transparent pixel has no defined colour: refuse rather than guess.
    if img.shape[:2] == IMAGE_SHAPE[:2] and img[..., 3].min() != 255:
      raise ImageError(f"{name}: RGBA image with a non-opaque alpha channel "
                       f"(min alpha {img[..., 3].min()}), expected RGB")
    img = img[..., :3]
  if img.shape != IMAGE_SHAPE:
    raise ImageError(f"{name}: shape {img.shape}, expected {IMAGE_SHAPE}")
  return np.ascontiguousarray(img)


def read_image(path: str) -> np.ndarray:
  """Reads and decodes one image file; see `decode_bytes`.

  Raises:
    ImageError: unreadable or invalid file, naming the path.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ImageError(f"{path}: cannot read: {e.strerror}") from None
  return decode_bytes(data, path)


_IMAGE_BYTES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]


def _outside(data, off: int) -> bytes:
  """Every byte of data except the pixel run at [off, off + 96*96*3)."""
  return bytes(data[:off]) + bytes(data[off + _IMAGE_BYTES:])


class TiffLayoutCache:
  """Skips the TIFF decoder for files laid out like one already decoded.

  Kaggle's 277k TIFFs differ only in their pixels and a DateTime tag, and
  libtiff's interpretation of a file depends only on its non-pixel bytes. So
  once a file has been decoded by imagecodecs, checked by tifffile to hold
  one contiguous, uncompressed, 8-bit RGB strip that no tag overlaps, and its
  decoded pixels equal the strip's bytes, every later file with the same size
  and byte-identical non-pixel bytes decodes to its strip's bytes. `lookup`
  checks that (a ~300-byte comparison) instead of running the decoder, which
  is ~13 us of the scanner's ~60 us per image. Anything else returns None and
  takes the normal path (`decode_raw` + `validate`).
  """

  def __init__(self, max_layouts: int = 4096):
    self._known: dict[tuple[int, int], set[bytes]] = {}
    self._count = 0
    self._max = max_layouts

  def pixel_offset(self, data) -> int | None:
    """Where data's raw HWC pixels start if it has a known layout, or None.

    Args:
      data: the file's bytes (bytes, bytearray or memoryview).
    """
    n = len(data)
    for (size, off), keys in self._known.items():
      if n == size and _outside(data, off) in keys:
        return off
    return None

  def lookup(self, data) -> np.ndarray | None:
    """The pixels (a read-only view of data) if data has a known layout."""
    off = self.pixel_offset(data)
    if off is None:
      return None
    return np.frombuffer(data, np.uint8, _IMAGE_BYTES, off).reshape(
        IMAGE_SHAPE)

  def learn(self, data: bytes, img: np.ndarray) -> None:
    """Remembers data's layout if it qualifies; img = decode_bytes(data)."""
    data = bytes(data)
    if self._count >= self._max or _sniff(data) != "tiff":
      return
    off = _plain_strip_offset(data)
    if off is None or img.shape != IMAGE_SHAPE or not np.array_equal(
        np.frombuffer(data, np.uint8, _IMAGE_BYTES, off).reshape(IMAGE_SHAPE),
        img):
      return
    keys = self._known.setdefault((len(data), off), set())
    key = _outside(data, off)
    if key not in keys:
      keys.add(key)
      self._count += 1


def _plain_strip_offset(data: bytes) -> int | None:
  """Where the pixels of a plain one-strip RGB TIFF start, else None.

  Plain: one page of 96x96 RGB uint8, uncompressed, interleaved, stored as
  one contiguous run of bytes that neither the IFD nor any tag value overlaps.
  """
  import io  # pylint: disable=g-import-not-at-top
  import tifffile  # pylint: disable=g-import-not-at-top
  try:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
      if len(tif.pages) != 1:
        return None
      page = tif.pages[0]
      offsets, counts = page.dataoffsets, page.databytecounts
      if (page.compression != 1 or page.planarconfig != 1 or
          page.dtype != np.uint8 or page.shape != IMAGE_SHAPE or
          page.fillorder != 1 or sum(counts) != _IMAGE_BYTES or
          any(o2 != o1 + c1
              for o1, c1, o2 in zip(offsets, counts, offsets[1:]))):
        return None
      start, end = offsets[0], offsets[0] + _IMAGE_BYTES
      ifd_size = 2 + 12 * len(page.tags) + 4
      spans = [(page.offset, page.offset + ifd_size)] + [
          (t.valueoffset, t.valueoffset + t.valuebytecount)
          for t in page.tags.values()]
      if any(a < end and b > start for a, b in spans):
        return None
      return start
  except Exception:  # pylint: disable=broad-except
    return None


@functools.lru_cache(maxsize=1)
def tensorflow_io_available() -> bool:
  """True when tensorflow-io's TIFF op loads with the installed TensorFlow."""
  if os.environ.get("HCD_DISABLE_TFIO"):
    return False
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_io as tfio  # pylint: disable=g-import-not-at-top
    # Ops fail at first use, not at import, when the .so mismatches TF.
    tfio.experimental.image.decode_tiff(
        tf.constant(encode_tiff(np.zeros((2, 2, 3), np.uint8))))
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _numpy_decode(data) -> np.ndarray:
  # numpy_function hands a scalar string over as a 0-d object array.
  if isinstance(data, np.ndarray):
    data = data.item()
  return decode_bytes(data)


def tf_decode_image(contents, use_tfio: bool | None = None):
  """Decodes one encoded image inside a TensorFlow graph to uint8 [96,96,3].

  TIFF goes through tensorflow-io's `decode_tiff` (RGBA: the alpha channel is
  dropped) when available; anything else, or TIFF without tensorflow-io, goes
  through imagecodecs via `tf.numpy_function`.

  Args:
    contents: scalar tf.string with the file bytes.
    use_tfio: force the tensorflow-io path on/off; None picks automatically.

  Returns:
    uint8 tensor of static shape [96, 96, 3].
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if use_tfio is None:
    use_tfio = tensorflow_io_available()
  fallback = lambda: tf.numpy_function(_numpy_decode, [contents], tf.uint8)
  if use_tfio:
    import tensorflow_io as tfio  # pylint: disable=g-import-not-at-top
    is_tiff = tf.strings.substr(contents, 0, 4) == b"II*\x00"
    img = tf.cond(
        is_tiff,
        lambda: tfio.experimental.image.decode_tiff(contents)[..., :3],
        fallback)
  else:
    img = fallback()
  img = tf.ensure_shape(img, IMAGE_SHAPE)
  return img


def encode_tiff(img: np.ndarray) -> bytes:
  """Encodes a uint8 image as an uncompressed TIFF, as Kaggle's files are."""
  import io  # pylint: disable=g-import-not-at-top
  import tifffile  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  tifffile.imwrite(buf, img, photometric="rgb" if img.ndim == 3 else None)
  return buf.getvalue()
