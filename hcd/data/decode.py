"""Image decoding: the decoder of record, and its form inside tf.data.

imagecodecs is the decoder of record (tifffile reads the tags that say how
a TIFF's decoded axes are laid out): every path that turns an image file into
pixels gives exactly the pixels `decode_bytes` gives, or refuses the file by
name.
  * numpy (`decode_bytes`, `read_image`): imagecodecs, used by the scanner,
    the shard writer and the up-front check of prediction from a folder, in
    worker processes or threads that never need TensorFlow.
  * graph (`tf_decode_images`): inside tf.data, for prediction and
    evaluation straight from an image folder. A TIFF whose layout
    `TiffLayoutCache` proved to be one plain strip of HWC pixels (see there)
    is sliced from the file's bytes (`tf.strings.substr` + `tf.io.decode_raw`),
    after the graph re-checks that proof on the bytes it read; every other
    file goes through `decode_bytes` itself via `tf.numpy_function`. Both
    give `decode_bytes`' pixels by construction, so no second decoder can
    disagree with the shards.

A TIFF Orientation tag is not applied: pixels are always returned in stored
order, as imagecodecs' strip and tile reader gives them (the few TIFFs it
would rotate, JPEG, YCbCr or CMYK ones with an Orientation tag, are refused).
A Kaggle id is the SHA-1 of the stored pixel bytes, the scanner hashes and the
shard writer stores those bytes, and prediction's dihedral TTA averages over
orientations anyway; so one order, the stored one, is used everywhere.

Planar-configuration TIFFs are returned with their samples last like all
others (`_TiffTags`); LZW and other compressed TIFFs, and RGBA with an
opaque alpha channel (dropped), are decoded; a non-opaque alpha channel,
grayscale, anything but 3 samples of 8 bits, or another size is refused
(`validate`), naming the file.
"""

from __future__ import annotations

import os
from typing import Sequence

import imagecodecs
import numpy as np

from hcd.data.features import IMAGE_SHAPE

TIFF_EXTS = (".tif", ".tiff")
IMAGE_EXTS = TIFF_EXTS + (".png", ".jpg", ".jpeg")


# The two ways an image file is unusable (hcd.data.screening words every
# flag's reason, these two included, as "<flag>: <detail>").
UNREADABLE = "unreadable"
BAD_SHAPE = "bad_shape"


class ImageError(ValueError):
  """An image file that cannot be used: the one error of reading an image.

  str(e) is "<file>: <detail>"; the attributes hold the same in parts, so
  that scan.csv, the shard manifest and prediction's skipped list word the
  reason without the path ("unreadable: empty file (0 bytes)").

  Attributes:
    name: the file (or "<bytes>").
    detail: what is wrong, without the file's name.
    flag: UNREADABLE (cannot read or decode) or BAD_SHAPE (decoded, or
      declared by its header, to something else than 96x96 RGB uint8).
    shape, dtype: what the file decoded to or declares (None if unknown).
  """

  def __init__(self, name: str, detail: str, flag: str = UNREADABLE,
               shape: tuple | None = None, dtype: str | None = None):
    super().__init__(f"{name}: {detail}")
    self.name = name
    self.detail = detail
    self.flag = flag
    self.shape = shape
    self.dtype = dtype

  def __reduce__(self):  # Crosses process pools whole.
    return (ImageError, (self.name, self.detail, self.flag, self.shape,
                         self.dtype))

  @property
  def reason(self) -> str:
    """"<flag>: <detail>", e.g. "unreadable: empty file (0 bytes)"."""
    return f"{self.flag}: {self.detail}"


def read_error(path: str, e: OSError) -> ImageError:
  """The ImageError of a file that cannot be read (missing, permissions)."""
  return ImageError(path, f"cannot read: {e.strerror or e}")


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

  Axes are always (height, width[, samples]), planar TIFFs included.

  The quality scanner uses this to report what a bad image actually is.

  Args:
    data: the encoded file contents.
    name: the file name used in error messages.

  Returns:
    The decoded array, whatever its shape and dtype.

  Raises:
    ImageError: empty or undecodable data (UNREADABLE), or a header that
      declares another size than 96x96 (BAD_SHAPE, with the declared shape;
      refused before decoding: a small file can declare gigabytes of
      pixels).
  """
  if not data:
    raise ImageError(name, "empty file (0 bytes)")
  kind = _sniff(data)
  try:
    if kind == "tiff":
      tags = _TiffTags(data)
      _check_declared(tags.shape, tags.dtype, name)
      return tags.as_stored(imagecodecs.tiff_decode(data), name)
    if kind in ("jpeg", "png"):
      declared = _declared_image(data, kind)
      if declared is not None:
        _check_declared(*declared, name)
    if kind == "jpeg":
      return imagecodecs.jpeg8_decode(data)
    if kind == "png":
      return imagecodecs.png_decode(data)
  except ImageError:
    raise
  except Exception as e:  # imagecodecs raises several codec-specific types.
    raise ImageError(name, f"cannot decode {kind}: "
                     f"{type(e).__name__}: {e}") from None
  raise ImageError(name, f"not a TIFF, JPEG or PNG file "
                   f"(first bytes {data[:8]!r})")


def _declared_image(data: bytes, kind: str) -> tuple[tuple, str] | None:
  """The shape and pixel type a JPEG or PNG header declares.

  Pillow's format reader parses the header only (pixels would load on
  demand). Called on it directly, not through `Image.open`, which first
  tries other formats: this check runs before every JPEG and PNG decode.

  Returns:
    (shape, dtype) as `decode_raw` would return them, or None when the
    header cannot be read (the decoder then names the fault).
  """
  import io  # pylint: disable=g-import-not-at-top
  from PIL import JpegImagePlugin  # pylint: disable=g-import-not-at-top
  from PIL import PngImagePlugin  # pylint: disable=g-import-not-at-top
  reader = (JpegImagePlugin.JpegImageFile if kind == "jpeg" else
            PngImagePlugin.PngImageFile)
  try:
    with reader(io.BytesIO(data)) as im:
      (width, height), bands, mode = im.size, len(im.getbands()), im.mode
  except Exception:  # pylint: disable=broad-except
    return None
  dtype = "uint16" if mode.startswith("I;16") else "uint8"
  return ((height, width) if bands == 1 else (height, width, bands)), dtype


def _check_declared(shape: tuple | None, dtype: str, name: str) -> None:
  """Refuses a header that declares another size than 96x96, undecoded.

  Raises:
    ImageError: BAD_SHAPE, naming the file and the declared shape (as the
      decoder would return it: (height, width) for one sample per pixel,
      else (height, width, samples)) and pixel type.
  """
  if shape is not None and shape[:2] != IMAGE_SHAPE[:2]:
    raise ImageError(name, f"{_shape_fault(shape, dtype)} (declared by "
                     f"the file's header; not decoded)", BAD_SHAPE, shape,
                     dtype)


def _shape_fault(shape: tuple, dtype: str) -> str:
  """What `validate` says of an image of this shape and type."""
  if dtype != "uint8":
    return f"pixel type {dtype}, expected uint8 (8 bits per channel)"
  if len(shape) == 2 or (len(shape) == 3 and shape[-1] == 1):
    return f"grayscale image {shape}, expected RGB {IMAGE_SHAPE}"
  return f"shape {shape}, expected {IMAGE_SHAPE}"


# TIFF pages that libtiff converts to RGB through its RGBA interface, which
# imagecodecs reads with the Orientation tag applied (compression 6 and 7:
# JPEG; photometric 5 and 6: CMYK, YCbCr).
_RGBA_INTERFACE_COMPRESSIONS = (6, 7)
_RGBA_INTERFACE_PHOTOMETRICS = (5, 6)


class _TiffTags:
  """What a TIFF's first page declares, read by tifffile before decoding.

  imagecodecs returns a PlanarConfiguration=2 ("separate") TIFF sample-major,
  (samples, height, width), and drops axes of length 1, so its shape alone
  cannot tell a planar 96-sample image 3 pixels wide from a 96x96 RGB image:
  the tags can. imagecodecs also applies an Orientation tag to the pages it
  converts through libtiff's RGBA interface (JPEG, YCbCr, CMYK) and to no
  other: such a page with an Orientation tag is refused rather than given in
  another order than every other file.

  Attributes:
    shape: as `decode_raw` returns it ((height, width) for one sample per
      pixel), or None when the tags cannot be read (the decoder then names
      the fault).
    dtype: the pixel type's name.
  """

  def __init__(self, data: bytes):
    import io  # pylint: disable=g-import-not-at-top
    import tifffile  # pylint: disable=g-import-not-at-top
    self.shape, self.dtype = None, "unknown"
    try:
      with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        samples = page.samplesperpixel
        self.shape = ((page.imagelength, page.imagewidth) if samples == 1
                      else (page.imagelength, page.imagewidth, samples))
        self.dtype = str(page.dtype) if page.dtype is not None else "unknown"
        self._planar = page.planarconfig == 2 and samples > 1
        self._samples = samples
        self._orientation = page.tags.valueof(274, 1)
        self._compression, self._photometric = (page.compression,
                                                page.photometric)
    except Exception:  # pylint: disable=broad-except
      self.shape = None

  def as_stored(self, img: np.ndarray, name: str) -> np.ndarray:
    """imagecodecs' pixels in stored order with the samples last.

    Raises:
      ImageError: an Orientation tag on a page read through the RGBA
        interface.
    """
    if self.shape is None:
      return img
    converted = (self._compression in _RGBA_INTERFACE_COMPRESSIONS or
                 self._photometric in _RGBA_INTERFACE_PHOTOMETRICS)
    if self._orientation != 1 and converted:
      raise ImageError(
          name, f"Orientation tag {int(self._orientation)} on a TIFF the "
          f"decoder would rotate ({self._compression.name} compression, "
          f"{self._photometric.name} colour), while every other file keeps "
          f"its stored order; re-save it without the Orientation tag")
    if self._planar and img.ndim == 3 and img.shape[0] == self._samples:
      return np.moveaxis(img, 0, -1)
    return img


def validate(img: np.ndarray, name: str) -> np.ndarray:
  """Checks that a decoded image is 96x96 RGB uint8; drops an opaque alpha.

  Raises:
    ImageError: BAD_SHAPE, naming the file, what is wrong, and the decoded
      shape and type.
  """
  def bad(detail):
    return ImageError(name, detail, BAD_SHAPE, img.shape, str(img.dtype))
  if img.dtype != np.uint8 or img.ndim == 2 or (
      img.ndim == 3 and img.shape[-1] == 1):
    raise bad(_shape_fault(img.shape, str(img.dtype)))
  if img.ndim == 3 and img.shape[-1] == 4:
    # A transparent pixel has no defined colour: refuse rather than guess.
    if img.shape[:2] == IMAGE_SHAPE[:2] and img[..., 3].min() != 255:
      raise bad(f"RGBA image with a non-opaque alpha channel (min alpha "
                f"{img[..., 3].min()}), expected RGB")
    img = img[..., :3]
  if img.shape != IMAGE_SHAPE:
    raise bad(_shape_fault(img.shape, str(img.dtype)))
  return np.ascontiguousarray(img)


def read_bytes(path: str, chunk: int = 1 << 16) -> bytes:
  """Reads a whole (small) image file.

  os.open + os.read skip the fstat/lseek/isatty calls of open(): per-file
  system calls are a visible share of 100k+ reads of 28 KB files.

  Args:
    path: the file.
    chunk: bytes per read.

  Returns:
    Its bytes.

  Raises:
    ImageError: UNREADABLE, the file cannot be read (read_error).
  """
  try:
    fd = os.open(path, os.O_RDONLY)
    try:
      data = os.read(fd, chunk)
      if len(data) < chunk:
        return data
      parts = [data]
      while data:
        data = os.read(fd, chunk)
        parts.append(data)
      return b"".join(parts)
    finally:
      os.close(fd)
  except OSError as e:
    raise read_error(path, e) from None


def read_image(path: str, layouts: TiffLayoutCache | None = None
               ) -> np.ndarray:
  """Reads, decodes and validates one image file: the one image reader.

  The scanner (hcd.data.quality) keeps a faster path of its own for whole
  splits, reading into shared batch buffers; it decodes with `decode_raw`
  and `validate` like this.

  Args:
    path: the file.
    layouts: a layout cache: a TIFF laid out like one it has seen is not
      decoded again, its pixels are its strip's bytes (see
      TiffLayoutCache), which skips the decoder for nearly every Kaggle
      file.

  Returns:
    uint8 [96, 96, 3] (C-contiguous, or a read-only view of the file's bytes
    from the layout cache).

  Raises:
    ImageError: UNREADABLE (cannot read or decode) or BAD_SHAPE, naming the
      file.
  """
  data = read_bytes(path)
  if layouts is not None:
    known = layouts.lookup(data)
    if known is not None:
      return known
  img = validate(decode_raw(data, path), path)
  if layouts is not None:
    layouts.learn(data, img)
  return img


def check_image(path: str, layouts: TiffLayoutCache):
  """Reads and validates one image file as `read_image` does, for a reader
  that slices the pixels itself (hcd_evaluate/hcd_predict's tf.data path).

  Args:
    path: the file.
    layouts: the layout cache to consult and teach.

  Returns:
    The file's plain-strip layout (`TiffLayoutCache.layout`), or None
    when its pixels need the decoder.

  Raises:
    ImageError: UNREADABLE or BAD_SHAPE, worded as in scan.csv and the
      manifest.
  """
  data = read_bytes(path)
  known = layouts.layout(data)
  if known is None:
    layouts.learn(data, validate(decode_raw(data, path), path))
    known = layouts.layout(data)
  return known


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
  takes the normal path (`decode_raw` + `validate`). `layout` returns the
  proof itself (size, offset, non-pixel bytes), which prediction carries into
  tf.data so the graph can slice the pixels instead of decoding them
  (`tf_decode_images`).
  """

  def __init__(self, max_layouts: int = 4096):
    self._known: dict[tuple[int, int], set[bytes]] = {}
    self._count = 0
    self._max = max_layouts

  def layout(self, data) -> tuple[int, int, bytes] | None:
    """The proof that data is a known plain layout, or None.

    Args:
      data: the file's bytes (bytes, bytearray or memoryview).

    Returns:
      (file size, offset of the raw HWC pixels, every byte outside them) when
      data has the size and non-pixel bytes of a learned file; `tf_decode_images`
      re-checks this triple on the bytes tf.data reads. None otherwise.
    """
    n = len(data)
    for (size, off), keys in self._known.items():
      if n == size:
        key = _outside(data, off)
        if key in keys:
          return size, off, key
    return None

  def pixel_offset(self, data) -> int | None:
    """Where data's raw HWC pixels start if it has a known layout, or None.

    Args:
      data: the file's bytes (bytes, bytearray or memoryview).
    """
    known = self.layout(data)
    return None if known is None else known[1]

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


def _numpy_decode(contents: np.ndarray, names: np.ndarray) -> np.ndarray:
  """decode_bytes over a batch (tf.numpy_function hands over object arrays).
  """
  out = np.empty((len(contents),) + IMAGE_SHAPE, np.uint8)
  for k, (data, name) in enumerate(zip(contents, names)):
    out[k] = decode_bytes(data, os.fsdecode(name))
  return out


def tf_decode_images(contents, names, layouts_of,
                     layouts: Sequence[tuple[int, int, bytes]] = ()):
  """Decodes a batch of image files inside a TensorFlow graph, as decode_bytes.

  A file whose `layouts_of` entry names a proof from `TiffLayoutCache.layout`
  and whose bytes still satisfy it (same size, same bytes outside the pixel
  run) gets that run of bytes, sliced in the graph: exactly what
  `decode_bytes` returns for such a file. Every other file (no proof, or one
  that changed since it was checked) goes through `decode_bytes` itself, via
  one `tf.numpy_function` call for the batch. The whole batch is handled by
  a few vectorised ops, not a few ops per file: per-op overhead, not bytes,
  is what a per-file graph spends its time on.

  Args:
    contents: tf.string [B], the files' bytes.
    names: tf.string [B], their paths, for error messages.
    layouts_of: int [B], each file's index in `layouts`, or -1.
    layouts: the distinct proofs, (size, pixel offset, non-pixel bytes).

  Returns:
    uint8 tensor [B, 96, 96, 3]. A file `decode_bytes` refuses fails the
    graph at run time with its ImageError message (naming the file) inside
    a tf.errors.OpError.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  contents = tf.convert_to_tensor(contents, tf.string)
  names = tf.convert_to_tensor(names, tf.string)
  layouts_of = tf.cast(layouts_of, tf.int32)
  if layouts:
    sizes = tf.constant([s for s, _, _ in layouts], tf.int32)
    offsets = tf.constant([o for _, o, _ in layouts], tf.int32)
    # The bytes before and after the pixel run, apart.
    heads = tf.constant([k[:o] for _, o, k in layouts], tf.string)
    tails = tf.constant([k[o:] for _, o, k in layouts], tf.string)
    k = tf.maximum(layouts_of, 0)
    off = tf.gather(offsets, k)
    length = tf.strings.length(contents)
    # Every substr start is clipped to the file's length (a start past the
    # end is substr's only error; lengths are clipped by substr itself).
    tail_at = tf.minimum(off + _IMAGE_BYTES, length)
    proven = ((layouts_of >= 0) & (length == tf.gather(sizes, k)) &
              (tf.strings.substr(contents, tf.zeros_like(off), off) ==
               tf.gather(heads, k)) &
              (tf.strings.substr(contents, tail_at, length) ==
               tf.gather(tails, k)))
    pixels = tf.io.decode_raw(
        tf.strings.substr(contents, tf.minimum(off, length),
                          tf.fill(tf.shape(off), _IMAGE_BYTES)),
        tf.uint8, fixed_length=_IMAGE_BYTES)
    pixels = tf.reshape(pixels, (-1,) + IMAGE_SHAPE)
  else:
    proven = tf.zeros(tf.shape(contents), tf.bool)
    pixels = tf.zeros(tf.concat([tf.shape(contents), IMAGE_SHAPE], 0),
                      tf.uint8)
  rest = tf.where(tf.logical_not(proven))
  decoded = tf.numpy_function(
      _numpy_decode, [tf.gather_nd(contents, rest), tf.gather_nd(names, rest)],
      tf.uint8, stateful=False)
  decoded = tf.ensure_shape(decoded, (None,) + IMAGE_SHAPE)
  return tf.tensor_scatter_nd_update(pixels, rest, decoded)


def encode_tiff(img: np.ndarray) -> bytes:
  """Encodes a uint8 image as an uncompressed TIFF, as Kaggle's files are."""
  import io  # pylint: disable=g-import-not-at-top
  import tifffile  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  tifffile.imwrite(buf, img, photometric="rgb" if img.ndim == 3 else None)
  return buf.getvalue()
