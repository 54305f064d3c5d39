"""Shared helpers of the evaluate/predict/report tests: tiny runs and data.

Everything is built in the test's temporary directory: a run directory is a
small Keras model saved as best.keras/model.keras plus hand-written
config.json, history.csv and metrics.json, as hcd_train writes them.
"""

import csv
import io
import json
import os
import pathlib

import keras
import numpy as np
import tifffile

from hcd import models
from hcd.data import decode

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
KAGGLE_TIF = SHARED_DATA / "kaggle_tif"
NO_SHARED = (f"real data not found at {SHARED_DATA} (the ../shared/data "
             f"folder beside the repository)")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
# Ids (file names) that a hand-formatted CSV row would break.
ODD_IDS = ["a,b", 'say "hi"', "two\nlines", "carriage\rreturn", "plain",
           ",", '"', "tab\there"]


def images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3),
                                              dtype=np.uint8)


def tiny_model(seed=0):
  """hcd's test model (strided convs: not invariant to flips/rotations)."""
  from hcd import models  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(seed)
  return models.build_model("tiny")


def invariant_model(seed=0):
  """A model invariant to the 8 dihedral transforms by construction.

  Pixelwise ops (1x1 conv) followed by a global average cannot see where a
  pixel is, so any permutation of pixels, D4 included, leaves the output
  unchanged (up to float summation order).
  """
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((96, 96, 3), dtype="uint8")
  x = keras.layers.Rescaling(1 / 255)(inputs)
  x = keras.layers.Conv2D(8, 1, activation="relu")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  out = keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x)
  return keras.Model(inputs, out)


def make_run(workdir, model=None, name="tiny", lr=1e-3, history=None,
             metrics=None, num_params=None):
  """Writes a run directory as hcd_train does. Returns its path."""
  os.makedirs(workdir, exist_ok=True)
  if model is not None:
    # As hcd_train saves: hcd's own layers swapped for standard ones.
    saved = models.standard_model(model)
    saved.save(os.path.join(workdir, "best.keras"))
    saved.save(os.path.join(workdir, "model.keras"))
    num_params = num_params or model.count_params()
  history = history or []
  config = {"model": name, "learning_rate": lr, "batch_size": 32,
            "epochs": len(history) or 1, "num_params": num_params}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  if history:
    with open(os.path.join(workdir, "history.csv"), "w", newline="") as f:
      w = csv.DictWriter(f, list(history[0]))
      w.writeheader()
      w.writerows(history)
  if metrics is not None:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f)
  return str(workdir)


def write_tiffs(folder, imgs, ids):
  """Writes uncompressed Kaggle-style TIFFs <folder>/<id>.tif."""
  os.makedirs(folder, exist_ok=True)
  for img, i in zip(imgs, ids):
    with open(os.path.join(folder, f"{i}.tif"), "wb") as f:
      f.write(decode.encode_tiff(img))


def tiff(arr, **kw):
  """tifffile.imwrite's bytes."""
  buf = io.BytesIO()
  tifffile.imwrite(buf, arr, **kw)
  return buf.getvalue()


# Tag 274 (Orientation) as tifffile's extratags: (code, dtype, count, value,
# write once).
def _orientation(value):
  return [(274, "H", 1, value, True)]


def edge_case_tiffs(seed=0):
  """TIFF variants the decoder of record accepts or refuses.

  Returns:
    {file name: (bytes, pixels, refusal)}: pixels are the RGB pixels stored
    (None when refused), refusal the words of the refusal (None when
    accepted). Each accepted file holds different pixels, so a mix-up shows.
  """
  imgs = images(7, seed)
  opaque = np.full((96, 96), 255, np.uint8)
  return {
      "plain.tif": (decode.encode_tiff(imgs[0]), imgs[0], None),
      "planar.tif": (tiff(np.moveaxis(imgs[1], -1, 0), photometric="rgb",
                          planarconfig="separate"), imgs[1], None),
      "orientation3.tif": (tiff(imgs[2], photometric="rgb",
                                 extratags=_orientation(3)), imgs[2], None),
      "orientation6.tif": (tiff(imgs[3], photometric="rgb",
                                 extratags=_orientation(6)), imgs[3], None),
      "lzw.tif": (tiff(imgs[4], photometric="rgb", compression="lzw"),
                  imgs[4], None),
      "opaque_rgba.tif": (tiff(np.dstack([imgs[5], opaque]),
                                photometric="rgb", extrasamples=[2]),
                          imgs[5], None),
      "tiled_bigendian.tif": (tiff(imgs[6], photometric="rgb",
                                    tile=(32, 32), byteorder=">"),
                              imgs[6], None),
      "transparent_rgba.tif": (tiff(np.dstack([imgs[0], opaque // 2]),
                                     photometric="rgb", extrasamples=[2]),
                               None, "non-opaque alpha"),
      # tifffile writes an HWC array with planarconfig="separate" as 96
      # samples of a 96x3 image (tensorflow-io decoded it as [96, 3, 3]).
      "planar_96_samples.tif": (tiff(imgs[3], photometric="rgb",
                                     planarconfig="separate"),
                                None, "shape (96, 3, 96)"),
      "jpeg_orientation3.tif": (tiff(imgs[4], photometric="rgb",
                                     compression="jpeg",
                                     extratags=_orientation(3)),
                                None, "Orientation tag 3"),
      "gray.tif": (decode.encode_tiff(imgs[1][..., 0]), None, "grayscale"),
      "deep.tif": (decode.encode_tiff(imgs[2].astype(np.uint16) * 257), None,
                   "pixel type uint16"),
  }


def write_edge_cases(folder, seed=0):
  """Writes `edge_case_tiffs` into folder. Returns their dict."""
  cases = edge_case_tiffs(seed)
  os.makedirs(folder, exist_ok=True)
  for name, (data, _, _) in cases.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)
  return cases


def write_sample_submission(path, ids):
  with open(path, "w", newline="", encoding="utf-8") as f:
    csv.writer(f, lineterminator="\n").writerows(
        [("id", "label")] + [(i, 0) for i in ids])
  return str(path)
