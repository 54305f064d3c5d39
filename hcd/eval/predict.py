"""Batched prediction with dihedral test-time augmentation and ensembles.

TTA averages a model's probabilities over `tta` elements of the dihedral
group D4 (`hcd.models.augment.d4_transform`, element k = 4*transpose +
2*flip_rows + flip_cols). The first 1, 2, 4 or 8 elements are each a
subgroup: {id}, {id, mirror}, {id, the two mirrors, 180-degree rotation},
all of D4. Averaging over a subgroup makes the prediction exactly invariant
under that subgroup, so the result does not depend on the orientation the
scanner happened to give a patch.

Models are loaded with `keras.saving.load_model(safe_mode=True)`: hcd models
contain only standard Keras layers, so nothing arbitrary is deserialised
(`load_model`; which file of a run to load is hcd.rundir's business).

An ensemble averages the (TTA-averaged) probabilities of several models.
All transforms and models run in one `tf.function` per batch, so the only
Python work per batch is bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Sequence

from absl import logging
import numpy as np

from hcd import progress as progress_lib
from hcd import rundir
from hcd.data.features import IMAGE_SHAPE
from hcd.eval import submission
from hcd import fileio

TTA_CHOICES = (1, 2, 4, 8)


@dataclasses.dataclass
class Predictions:
  """Per-image outputs, in input order.

  Attributes:
    ids: image ids.
    probs: float64 [n] probability of tumour.
    labels: int64 [n] true labels (-1 where unknown).
  """
  ids: list[str]
  probs: np.ndarray
  labels: np.ndarray


def tta_transforms(tta: int) -> list[int]:
  """Returns the D4 elements used for `tta` views.

  Raises:
    ValueError: tta not in 1, 2, 4, 8.
  """
  if tta not in TTA_CHOICES:
    raise ValueError(f"--tta must be one of {TTA_CHOICES} (subgroups of the "
                     f"8 dihedral transforms), got {tta!r}")
  return list(range(tta))


def check_skipped_prob(prob: float) -> float:
  """Checks the probability written for skipped images (--skipped_prob).

  Args:
    prob: the probability.

  Returns:
    prob as a float.

  Raises:
    ValueError: prob is not a finite number in [0, 1] (a submission row
      must be a probability; NaN is refused too).
  """
  try:
    p = float(prob)
  except (TypeError, ValueError):
    p = math.nan
  if not (math.isfinite(p) and 0.0 <= p <= 1.0):
    raise ValueError(f"--skipped_prob must be a probability in [0, 1], got "
                     f"{prob!r}")
  return p


def check_model(model, name: str = "model") -> None:
  """Checks a model maps uint8 [B, 96, 96, 3] to probabilities [B, 1].

  Raises:
    hcd.rundir.RunError: naming the model and the mismatching input or
      output.
  """
  inputs = getattr(model, "inputs", None) or []
  if len(inputs) != 1:
    raise rundir.RunError(f"{name}: expected one input, found {len(inputs)}")
  shape = tuple(inputs[0].shape[1:])
  dtype = str(getattr(inputs[0], "dtype", ""))
  if shape != IMAGE_SHAPE or "uint8" not in dtype:
    raise rundir.RunError(
        f"{name}: input is {dtype} {shape}; hcd models take uint8 "
        f"{IMAGE_SHAPE} (raw pixels, rescaled inside the model)")
  out = tuple(model.outputs[0].shape[1:]) if getattr(model, "outputs",
                                                       None) else None
  if out != (1,):
    raise rundir.RunError(f"{name}: output shape {out}; expected (1,), the "
                          f"probability of tumour")


def load_model(path: str):
  """Loads a .keras model in safe mode and checks its signature.

  Args:
    path: a .keras file (e.g. from hcd.rundir.resolve_model_paths).

  Returns:
    The keras.Model (not compiled); a mixed-precision model whose compute
    type this machine has no native support for runs in float32
    (hcd.models.float32_copy).

  Raises:
    hcd.rundir.RunError: missing file, a file Keras cannot load (or that
      needs unsafe deserialisation), or a model that is not uint8 ->
      probability.
  """
  import keras  # pylint: disable=g-import-not-at-top
  # Registers hcd's one layer without a standard equivalent (models trained
  # with stain_norm), so such models load in safe mode too.
  from hcd.models import stain  # pylint: disable=g-import-not-at-top,unused-import
  if not os.path.isfile(path):
    raise rundir.RunError(f"{path}: model file does not exist")
  try:
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
  except Exception as e:  # Keras raises many types for a bad archive.
    raise rundir.RunError(f"{path}: cannot load model in Keras safe mode: "
                          f"{type(e).__name__}: {e}") from None
  check_model(model, path)
  from hcd import models  # pylint: disable=g-import-not-at-top
  from hcd.train import runtime  # pylint: disable=g-import-not-at-top
  precision = models.compute_precision(model)
  if precision not in ("none", runtime.resolve_mixed_precision("auto")):
    # E.g. trained in bf16 on a GPU or an AMX CPU, predicting on a CPU
    # without bf16: emulated bf16 would be several times slower.
    logging.info("%s computes in %s, which this machine runs only by "
                 "emulation: predicting in float32", path, precision)
    model = models.float32_copy(model)
  return model


def make_predict_fn(models: Sequence, tta: int = 1, jit_compile: bool = False):
  """Builds images -> mean probability over models and TTA views.

  Args:
    models: keras models, uint8 [B, 96, 96, 3] -> [B, 1].
    tta: views per model (1, 2, 4 or 8).
    jit_compile: compile the whole step with XLA.

  Returns:
    A tf.function mapping a uint8 batch to float32 [B].

  Raises:
    ValueError: no models or a bad tta.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from hcd.models import augment  # pylint: disable=g-import-not-at-top
  if not models:
    raise ValueError("no models to predict with")
  ks = tta_transforms(tta)
  models = list(models)

  @tf.function(input_signature=[tf.TensorSpec((None,) + IMAGE_SHAPE,
                                              tf.uint8)],
               jit_compile=jit_compile)
  def predict_fn(images):
    total = tf.zeros(tf.shape(images)[:1], tf.float32)
    # One view at a time. Independent views would otherwise run
    # concurrently (inter-op parallelism), each with its full activations
    # live: measured 30-40% slower at TTA 8 on CPU than this chain.
    for model in models:
      for k in ks:
        with tf.control_dependencies([total]):
          view = tf.identity(augment.d4_transform(images, k))
        p = model(view, training=False)
        total += tf.cast(tf.reshape(p, [-1]), tf.float32)
    return total / float(len(models) * len(ks))

  return predict_fn


def predict(models: Sequence, dataset, tta: int = 1,
            num_examples: int | None = None, progress: bool = True,
            jit_compile: bool = False, desc: str = "predict",
            predict_fn=None) -> Predictions:
  """Predicts every batch of a dataset.

  Args:
    models: keras models (their probabilities are averaged).
    dataset: tf.data.Dataset of hcd.data.batches batches with ids
      (hcd.eval.inputs), unpadded.
    tta: test-time views per model (1, 2, 4 or 8).
    num_examples: images expected, for the progress bar.
    progress: show a tqdm bar.
    jit_compile: compile the prediction step with XLA.
    desc: progress bar label.
    predict_fn: a function from `make_predict_fn` to reuse (saves tracing
      when predicting several datasets with the same models).

  Returns:
    Predictions in dataset order.

  Raises:
    ValueError: bad tta or no models.
    RuntimeError: the input pipeline failed (e.g. a file that changed after
      it was checked); the message names the file when the decoder refused
      one.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  fn = predict_fn or make_predict_fn(models, tta, jit_compile)
  ids: list[str] = []
  probs, labels = [], []
  with progress_lib.bar(total=num_examples, unit="img", desc=desc,
                        enabled=progress) as bar:
    try:
      for batch in dataset:
        p = fn(batch["image"]).numpy()
        probs.append(p.astype(np.float64))
        labels.append(batch["label"].numpy())
        ids += [i.decode("utf-8") for i in batch["id"].numpy()]
        bar.update(len(p))
    except tf.errors.OpError as e:
      raise RuntimeError(
          f"input pipeline failed after {len(ids)} images: "
          f"{pipeline_error_cause(e.message)} (a file that changed or vanished after the "
          f"up-front check? rerun; --skip_unreadable leaves out files that "
          f"cannot be decoded)") from None
  if not probs:
    return Predictions([], np.zeros(0), np.zeros(0, np.int64))
  return Predictions(ids, np.concatenate(probs), np.concatenate(labels))


def pipeline_error_cause(message: str, error: str = "ImageError") -> str:
  """A reader's one-line error inside a tf.data error, else its first line.

  `tf.numpy_function` wraps a Python exception as "...: <error>: <path>:
  <fault>" followed by a traceback; that line names the file.

  Args:
    message: the tf.errors.OpError message.
    error: the exception's class name (ImageError for hcd's decoder,
      OpenSlideError for slide reads).
  """
  for line in message.splitlines():
    if f"{error}: " in line:
      return line.split(f"{error}: ", 1)[1]
  return message.strip().splitlines()[0] if message.strip() else message


def write_skipped(path: str, skipped) -> str:
  """Writes the skipped images (id,path,reason) atomically; returns path."""
  fileio.atomic_write_csv(path, [("id", "path", "reason")] + [
      (p.id, p.path, p.reason) for p in skipped])
  return path


def predict_submission(model_paths: Sequence[str], source, out: str,
                       tta: int = 1, sample_ids: Sequence[str] | None = None,
                       skipped_prob: float = 0.5, progress: bool = True,
                       jit_compile: bool = False) -> dict:
  """Predicts a source and writes a validated Kaggle submission.

  Over 60 lines only for documenting each argument.

  Args:
    model_paths: .keras files; several are ensembled by averaging.
    source: hcd.eval.inputs.Source (its `skipped` images are listed in
      `<out>.skipped.csv`).
    out: the submission CSV (written atomically).
    tta: dihedral test-time views per model (1, 2, 4, 8).
    sample_ids: ids of sample_submission.csv: the output has exactly these,
      in this order. None: every predicted id, in input order.
    skipped_prob: the probability written for skipped (unreadable) images
      that the sample submission requires (Kaggle rejects a submission
      with missing rows; 0.5 carries no information).
    progress: show progress bars.
    jit_compile: XLA-compile the prediction step.

  Returns:
    A summary dict (rows, models, tta, seconds, images/s, skipped, paths).

  Raises:
    hcd.eval.submission.SubmissionError: missing/extra/duplicate ids (all
      listed) or invalid probabilities; nothing is written.
    hcd.rundir.RunError: a model that does not load.
    hcd.data.shard_reader.ShardFileError: an unreadable shard (named).
    ValueError: a bad tta or skipped_prob (before any model is loaded).
  """
  tta_transforms(tta)
  skipped_prob = check_skipped_prob(skipped_prob)
  models = [load_model(p) for p in model_paths]
  t0 = time.perf_counter()
  with source.naming_bad_shard():
    preds = predict(models, source.dataset, tta, source.num_examples,
                    progress, jit_compile)
  seconds = time.perf_counter() - t0
  ids, probs = list(preds.ids), preds.probs
  filled = []
  if source.skipped and sample_ids is not None:
    want = set(sample_ids)
    filled = [p.id for p in source.skipped if p.id in want]
    ids += filled
    probs = np.concatenate([probs, np.full(len(filled), skipped_prob)])
  submission.write_submission(out, ids, probs, sample_ids)
  summary = {
      "out": os.path.abspath(out),
      "rows": len(sample_ids) if sample_ids is not None else len(ids),
      "predicted": len(preds.ids),
      "models": [os.path.abspath(p) for p in model_paths],
      "tta": tta,
      "seconds": seconds,
      "images_per_s": len(preds.ids) / seconds if seconds > 0 else None,
      "skipped": len(source.skipped),
      "filled_with": skipped_prob if filled else None,
  }
  if source.skipped:
    summary["skipped_file"] = write_skipped(f"{out}.skipped.csv",
                                            source.skipped)
  return summary
