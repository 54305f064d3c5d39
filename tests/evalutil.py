"""Shared helpers of the evaluate/predict/report tests: tiny runs and data.

Everything is built in the test's temporary directory: a run directory is a
small Keras model saved as best.keras/model.keras plus hand-written
config.json, history.csv and metrics.json, as hcd_train writes them.
"""

import csv
import json
import os
import pathlib

import keras
import numpy as np

from hcd.data import decode

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
KAGGLE_TIF = SHARED_DATA / "kaggle_tif"
NO_SHARED = (f"real data not found at {SHARED_DATA} (the ../shared/data "
             f"folder beside the repository)")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


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
    model.save(os.path.join(workdir, "best.keras"))
    model.save(os.path.join(workdir, "model.keras"))
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


def write_sample_submission(path, ids):
  with open(path, "w") as f:
    f.write("id,label\n" + "".join(f"{i},0\n" for i in ids))
  return str(path)
