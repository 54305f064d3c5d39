"""A deployable model: uint8 [B, 96, 96, 3] in, probability of tumour out.

  export_model("runs/resnet/best.keras", "export/resnet")

writes
  model.keras     Keras 3 archive; loads with
                  keras.saving.load_model(path, safe_mode=True) and no hcd
                  (only standard layers: the Rescaling that casts uint8 is
                  the model's first layer, the sigmoid its last; a model
                  trained with --stain_norm needs `import hcd.models.stain`
                  first)
  saved_model/    TensorFlow SavedModel with a `serve` endpoint
                  (tf.saved_model.load(path).serve(uint8_batch)), for
                  TF Serving or anything without Keras
  export.json     input/output spec, source model, and the check below

Both artifacts are reloaded after writing and must reproduce the source
model's outputs on a fixed batch, or the export fails.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

import hcd
from hcd import models
from hcd.data.features import IMAGE_SHAPE
from hcd.eval import predict
from hcd import fileio

CHECK_BATCH = 4
CHECK_ATOL = 1e-5


class ExportError(RuntimeError):
  """An exported artifact does not reproduce the source model."""


def check_batch(seed: int = 0) -> np.ndarray:
  """A fixed uint8 batch used to compare the exports with the source."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (CHECK_BATCH,) + IMAGE_SHAPE, dtype=np.uint8)


def export_model(model_path: str, out_dir: str,
                 saved_model: bool = True) -> dict:
  """Exports a .keras model as a safe-mode .keras and a SavedModel.

  Over 60 lines only for documenting each argument.

  Args:
    model_path: the source .keras (e.g. a run's best.keras).
    out_dir: output directory (created; existing exports are replaced).
    saved_model: also write the TensorFlow SavedModel.

  Returns:
    The export.json dict (paths included).

  Raises:
    hcd.rundir.RunError: the source model is missing or not uint8 ->
      probability.
    ExportError: a reloaded export disagrees with the source model.
  """
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = predict.load_model(model_path)
  os.makedirs(out_dir, exist_ok=True)
  batch = check_batch()
  want = np.asarray(model(batch, training=False), np.float32)
  info = {
      "source": os.path.abspath(model_path),
      "input": {"shape": [None, *IMAGE_SHAPE], "dtype": "uint8",
                "range": "raw pixels 0..255, RGB, HWC"},
      "output": {"shape": [None, 1], "dtype": "float32",
                 "meaning": "probability of tumour in the centre 32x32"},
      "num_params": int(model.count_params()),
      "hcd_version": hcd.__version__,
      "check_outputs": want.reshape(-1).tolist(),
  }

  # Keras insists on the .keras suffix, so the temporary name keeps it.
  keras_path = os.path.join(out_dir, "model.keras")
  tmp = os.path.join(out_dir, f"model.tmp-{os.getpid()}.keras")
  models.standard_model(model).save(tmp)
  got = keras.saving.load_model(tmp, compile=False, safe_mode=True)(
      batch, training=False)
  if not np.allclose(np.asarray(got), want, atol=CHECK_ATOL):
    os.remove(tmp)
    raise ExportError(f"{keras_path}: reloaded model disagrees with "
                      f"{model_path}")
  os.replace(tmp, keras_path)
  info["keras"] = keras_path

  if saved_model:
    sm_path = os.path.join(out_dir, "saved_model")
    tmp_dir = f"{sm_path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.export(tmp_dir, format="tf_saved_model", verbose=False)
    # Keep the loaded object alive while its function runs: it owns the
    # variables the function reads.
    loaded = tf.saved_model.load(tmp_dir)
    got = loaded.serve(tf.constant(batch))
    if not np.allclose(np.asarray(got), want, atol=CHECK_ATOL):
      shutil.rmtree(tmp_dir, ignore_errors=True)
      raise ExportError(f"{sm_path}: reloaded SavedModel disagrees with "
                        f"{model_path}")
    shutil.rmtree(sm_path, ignore_errors=True)
    os.replace(tmp_dir, sm_path)
    info["saved_model"] = sm_path
  fileio.atomic_write_text(os.path.join(out_dir, "export.json"),
                           json.dumps(info, indent=1) + "\n")
  return info
