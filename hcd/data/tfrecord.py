"""TFRecord framing and tf.Example block encoding without TensorFlow.

The shard writer runs in worker processes that never import TensorFlow:
`import tensorflow` costs 3.5-4 s of CPU per process, as long as the whole
conversion of 100k images on 2 cores. The only parts of TensorFlow a writer
needs are

  * the tf.Example wire format of one block (three length-delimited protobuf
    fields; `encode_block_head`), with the keys of the one schema in
    `hcd.data.features`, and
  * TFRecord framing with masked CRC-32C (`RecordWriter`, CRC from
    google-crc32c at ~13 GB/s).

The pixels are written straight from the caller's buffer, never copied into
a protobuf, and the file's sha256 is computed on the way out. Without the C
implementation of google-crc32c, `RecordWriter` falls back to TensorFlow's
writer (same bytes). Shard verification reads everything back with
TensorFlow's own reader and parser, so a bug here cannot hide.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from typing import Sequence

from hcd.data import features

try:
  import google_crc32c  # pylint: disable=g-import-not-at-top
  if google_crc32c.implementation != "c":  # Its pure-Python CRC is too slow.
    google_crc32c = None
except ImportError:  # Slower fallback: TensorFlow's writer (see RecordWriter).
  google_crc32c = None

# Protobuf wire format: a tag byte (field << 3 | wire type 2 = length-
# delimited), a varint length, then the payload.
_F1, _F2, _F3 = 0x0A, 0x12, 0x1A


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
  """Returns the hex sha256 of a file, read in 4 MiB chunks.

  Args:
    path: the file.
    chunk: bytes per read.

  Returns:
    The hex digest.

  Raises:
    OSError: the file cannot be read.
  """
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      b = f.read(chunk)
      if not b:
        break
      h.update(b)
  return h.hexdigest()


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _field(tag: int, length: int) -> bytes:
  return bytes((tag,)) + _varint(length)


def _int64_varint(v: int) -> bytes:
  # int64 varints encode negatives as their 64-bit two's complement.
  return _varint(int(v) & 0xFFFFFFFFFFFFFFFF)


def _map_entry_prefix(key: str, feature_len: int) -> bytes:
  """A Features map entry {key, value: Feature} up to the Feature's bytes."""
  k = key.encode()
  body = _field(_F1, len(k)) + k + _field(_F2, feature_len)
  return _field(_F1, len(body) + feature_len) + body


def encode_block_head(num_pixel_bytes: int, ids: Sequence[str],
                      labels: Sequence[int]) -> bytes:
  """Encodes a block's tf.Example up to its pixels (features.py's schema).

  `head + pixels` is a serialized tf.Example equal, field for field, to
  `features.serialize_block(images, ids, labels)`; the pixels follow the
  head directly so the writer need not copy them.

  Args:
    num_pixel_bytes: len(images.tobytes()), n * 96 * 96 * 3.
    ids: n ids.
    labels: n labels.

  Returns:
    The head bytes.

  Raises:
    ValueError: pixel bytes, ids and labels disagree on n.
  """
  n = len(ids)
  if num_pixel_bytes != n * features.IMAGE_BYTES or len(labels) != n:
    raise ValueError(f"block has {num_pixel_bytes} pixel bytes, {n} ids and "
                     f"{len(labels)} labels")
  id_list = b"".join(_field(_F1, len(b)) + b
                     for b in (i.encode("utf-8") for i in ids))
  ids_feature = _field(_F1, len(id_list)) + id_list
  packed = b"".join(_int64_varint(v) for v in labels)
  int_list = _field(_F1, len(packed)) + packed
  labels_feature = _field(_F3, len(int_list)) + int_list
  # images: Feature{bytes_list: BytesList{value: [pixels]}}.
  pixel_prefix = _field(_F1, num_pixel_bytes)
  images_prefix = _field(_F1, len(pixel_prefix) + num_pixel_bytes) + (
      pixel_prefix)
  body = (_map_entry_prefix(features.KEY_IDS, len(ids_feature)) +
          ids_feature +
          _map_entry_prefix(features.KEY_LABELS, len(labels_feature)) +
          labels_feature +
          _map_entry_prefix(features.KEY_IMAGES,
                            len(images_prefix) + num_pixel_bytes) +
          images_prefix)
  return _field(_F1, len(body) + num_pixel_bytes) + body


def _masked_crc(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class RecordWriter:
  """Writes a TFRecord file, computing its size and sha256 on the way out.

  A record is framed as TensorFlow's writer frames it: uint64 length,
  masked CRC-32C of the length, data, masked CRC-32C of the data.
  """

  def __init__(self, path: str):
    """Opens (truncates) `path` for writing.

    Raises:
      OSError: the file cannot be created.
    """
    self.path = path
    self.num_records = 0
    self.num_bytes = 0
    self._sha = hashlib.sha256()
    self._tf_writer = None
    if google_crc32c is None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf_writer = tf.io.TFRecordWriter(path)
      self._f = None
    else:
      self._f = open(path, "wb")

  def write(self, *pieces) -> None:
    """Writes one record whose data is the concatenation of `pieces`.

    Args:
      *pieces: bytes or C-contiguous numpy arrays.
    """
    self.num_records += 1
    if self._tf_writer is not None:
      self._tf_writer.write(b"".join(bytes(memoryview(p)) for p in pieces))
      return
    length = struct.pack("<Q", sum(memoryview(p).nbytes for p in pieces))
    crc = 0
    for p in pieces:
      crc = google_crc32c.extend(crc, p)
    frame = (length, struct.pack("<I", _masked_crc(google_crc32c.value(
        length))), *pieces, struct.pack("<I", _masked_crc(crc)))
    for p in frame:
      self._f.write(p)
      self._sha.update(p)
      self.num_bytes += memoryview(p).nbytes

  def close(self) -> tuple[int, str]:
    """Closes the file.

    Returns:
      (size in bytes, hex sha256).
    """
    if self._tf_writer is not None:
      self._tf_writer.close()
      return os.path.getsize(self.path), sha256_file(self.path)
    self._f.close()
    return self.num_bytes, self._sha.hexdigest()

  def abort(self) -> None:
    """Closes and deletes the partial file."""
    with contextlib.suppress(Exception):
      if self._tf_writer is not None:
        self._tf_writer.close()
      else:
        self._f.close()
    with contextlib.suppress(OSError):
      os.remove(self.path)
