"""Tests for hcd.data.decode: bad inputs, real Kaggle/PCam files, TF paths."""

import glob
import hashlib
import io
import os
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

from hcd.data import decode
from hcd.data import synthetic

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KAGGLE = SHARED / "kaggle_tif"
PCAM = SHARED / "pcam96_jpeg"
needs_shared = pytest.mark.skipif(
    not KAGGLE.is_dir(), reason=f"real data not present at {SHARED} "
    "(../shared/data relative to the repository)")


def _sha(img):
  return hashlib.sha1(np.ascontiguousarray(img)).hexdigest()


@pytest.fixture(scope="module")
def img():
  return synthetic.make_images(1, seed=0)[0][0]


def _tiff(arr, **kw):
  buf = io.BytesIO()
  tifffile.imwrite(buf, arr, **kw)
  return buf.getvalue()


def _bad_inputs(img):
  good = decode.encode_tiff(img)
  return {
      "corrupt.tif": (b"II*\x00" + bytes(range(256)) * 4, "cannot decode tiff"),
      "truncated.tif": (good[:len(good) // 2], "cannot decode tiff"),
      "small.tif": (decode.encode_tiff(img[:48]), "shape (48, 96, 3)"),
      "gray.tif": (decode.encode_tiff(img[..., 1]), "grayscale"),
      "gray1.tif": (_tiff(img[..., :1]), "grayscale"),
      "deep.tif": (decode.encode_tiff(img.astype(np.uint16)),
                   "pixel type uint16"),
      "empty.tif": (b"", "empty file (0 bytes)"),
      "notes.txt.tif": (b"hello world", "not a TIFF, JPEG or PNG"),
      "alpha.tif": (_tiff(np.dstack([img, np.full(img.shape[:2], 7,
                                                  np.uint8)]),
                          photometric="rgb", extrasamples=[2]),
                    "non-opaque alpha"),
  }


@pytest.mark.parametrize("name", sorted(_bad_inputs(np.zeros((96, 96, 3),
                                                             np.uint8))))
def test_bad_inputs_raise_image_error_naming_the_file(name, img, tmp_path):
  data, expected = _bad_inputs(img)[name]
  path = tmp_path / name
  path.write_bytes(data)
  with pytest.raises(decode.ImageError) as e:
    decode.read_image(str(path))
  assert str(e.value).startswith(f"{path}: ")
  assert expected in str(e.value)


def test_missing_file_names_the_path(tmp_path):
  path = str(tmp_path / "nope.tif")
  with pytest.raises(decode.ImageError, match=f"{path}: cannot read"):
    decode.read_image(path)


def test_formats_round_trip(img):
  np.testing.assert_array_equal(decode.decode_bytes(decode.encode_tiff(img)),
                                img)
  np.testing.assert_array_equal(
      decode.decode_bytes(imagecodecs.png_encode(img)), img)
  opaque = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
  np.testing.assert_array_equal(
      decode.decode_bytes(_tiff(opaque, photometric="rgb", extrasamples=[2])),
      img)
  lzw = _tiff(img, photometric="rgb", compression="lzw")
  np.testing.assert_array_equal(decode.decode_bytes(lzw), img)
  jpeg = decode.decode_bytes(imagecodecs.jpeg8_encode(img, level=95))
  assert jpeg.shape == (96, 96, 3) and jpeg.dtype == np.uint8
  assert np.abs(jpeg.astype(int) - img).mean() < 8  # Lossy, but close.


def test_decode_raw_keeps_what_the_file_holds(img):
  raw = decode.decode_raw(decode.encode_tiff(img.astype(np.uint16)))
  assert raw.dtype == np.uint16 and raw.shape == (96, 96, 3)
  with pytest.raises(decode.ImageError, match="x.tif: empty"):
    decode.decode_raw(b"", "x.tif")


def test_tiff_layout_cache_only_skips_identical_layouts(img):
  cache = decode.TiffLayoutCache()
  first = decode.encode_tiff(img)
  assert cache.lookup(first) is None
  cache.learn(first, decode.decode_bytes(first))
  other = img[::-1, ::-1].copy()
  data = decode.encode_tiff(other)
  hit = cache.lookup(data)
  assert hit is not None
  np.testing.assert_array_equal(hit, other)
  # Any change outside the pixels (here the image description), another
  # compression or a truncated file takes the decoder's path.
  described = _tiff(other, photometric="rgb", description="x")
  assert cache.lookup(described) is None
  lzw = _tiff(other, photometric="rgb", compression="lzw")
  cache.learn(lzw, decode.decode_bytes(lzw))
  assert cache.lookup(lzw) is None
  assert cache.lookup(data[:-1]) is None
  # Planar (RRR...GGG...BBB) files are not raw HWC bytes: never learned.
  planar = _tiff(np.moveaxis(other, -1, 0), photometric="rgb",
                 planarconfig="separate")
  cache.learn(planar, decode.decode_bytes(planar))
  assert cache.lookup(planar) is None


def test_planar_tiff_decodes_samples_last(img):
  planar = _tiff(np.moveaxis(img, -1, 0), photometric="rgb",
                 planarconfig="separate")
  np.testing.assert_array_equal(decode.decode_bytes(planar), img)
  rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
  np.testing.assert_array_equal(decode.decode_bytes(_tiff(
      np.moveaxis(rgba, -1, 0), photometric="rgb", planarconfig="separate",
      extrasamples=[2])), img)
  # An HWC array written planar is 96 samples of a 96x3 image, whatever its
  # raw bytes look like: refused, not read as RGB.
  wide = _tiff(img, photometric="rgb", planarconfig="separate")
  with pytest.raises(decode.ImageError) as e:  # From the tags, undecoded.
    decode.decode_raw(wide)
  assert e.value.flag == decode.BAD_SHAPE and e.value.shape == (96, 3, 96)
  with pytest.raises(decode.ImageError, match=r"shape \(96, 3, 96\)"):
    decode.decode_bytes(wide, "wide.tif")


def test_orientation_tag_keeps_stored_order_or_is_refused(img):
  for value in (3, 6, 8):
    tagged = _tiff(img, photometric="rgb", extratags=[(274, "H", 1, value,
                                                       True)])
    np.testing.assert_array_equal(decode.decode_bytes(tagged), img)
  # libtiff's RGBA interface (here for JPEG) would rotate the pixels:
  # refused, naming the file and the remedy, never returned rotated.
  jpeg = _tiff(img, photometric="rgb", compression="jpeg")
  assert np.abs(decode.decode_bytes(jpeg).astype(int) - img).mean() < 40
  rotated = _tiff(img, photometric="rgb", compression="jpeg",
                  extratags=[(274, "H", 1, 3, True)])
  with pytest.raises(decode.ImageError,
                     match=r"^x.tif: Orientation tag 3 .*JPEG.*re-save"):
    decode.decode_bytes(rotated, "x.tif")


@needs_shared
def test_real_kaggle_originals_hash_to_their_ids():
  files = sorted(glob.glob(str(KAGGLE / "train" / "*.tif")) +
                 glob.glob(str(KAGGLE / "test" / "*.tif")))
  assert len(files) == 45
  cache = decode.TiffLayoutCache()
  hits = 0
  for f in files:
    data = Path(f).read_bytes()
    assert len(data) == 27935
    pixels = decode.decode_bytes(data, f)
    assert _sha(pixels) == Path(f).stem
    fast = cache.lookup(data)
    if fast is None:
      cache.learn(data, pixels)
    else:
      hits += 1
      np.testing.assert_array_equal(fast, pixels)
  assert hits > 0  # The originals share layouts (they differ in DateTime).


@needs_shared
def test_real_lzw_resaves_decode_losslessly():
  files = sorted(glob.glob(str(KAGGLE / "lzw_resaved" / "*.tif")))
  assert len(files) == 2
  for f in files:
    pixels = decode.read_image(f)
    assert _sha(pixels) == Path(f).stem


@needs_shared
def test_real_pcam_jpegs_decode():
  if not PCAM.is_dir():
    pytest.skip(f"{PCAM} not present")
  files = sorted(glob.glob(str(PCAM / "valid" / "1" / "*.jpg")))[:20]
  assert files
  for f in files:
    pixels = decode.read_image(f)
    assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
    assert 20 < pixels.mean() < 250


def _tf_files():
  files = sorted(glob.glob(str(KAGGLE / "train" / "*.tif")))[:4]
  return files + sorted(glob.glob(str(KAGGLE / "lzw_resaved" / "*.tif")))


@needs_shared
@pytest.mark.parametrize("sliced", [True, False])
def test_tf_decode_image_matches_decode_bytes(sliced):
  """Both graph paths (proven plain strip sliced, or imagecodecs) agree."""
  tf = pytest.importorskip("tensorflow")
  files = _tf_files()
  cache = decode.TiffLayoutCache()
  proofs = [decode.check_image(f, cache) for f in files]
  # The 4 originals have a plain strip, the 2 LZW re-saves do not.
  assert [p is not None for p in proofs] == [True] * 4 + [False] * 2
  layouts = sorted({p for p in proofs if p is not None}) if sliced else []
  index = [layouts.index(p) if p in layouts else -1 for p in proofs]
  contents = [Path(f).read_bytes() for f in files]
  got = decode.tf_decode_images(contents, files, index, layouts)
  assert got.shape == (6, 96, 96, 3) and got.dtype == tf.uint8
  for f, img in zip(files, got.numpy()):
    np.testing.assert_array_equal(img, decode.read_image(f))
