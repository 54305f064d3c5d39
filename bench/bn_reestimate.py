"""Does re-estimating BatchNorm statistics after training lift valid AUC?

SWA re-estimates the BatchNorm statistics of its averaged weights
(`torch.optim.swa_utils.update_bn`) because statistics gathered during
training belong to other weights. hcd's weight EMA averages the statistics
along with the weights, so this probe checks whether re-estimating still
helps a trained run's final model, two ways:

- `train`: population statistics of the final weights over N train images,
  each in a random D4 view (the training geometry, no colour jitter);
- `valid`: the same over N unlabelled valid images (AdaBN-style test-time
  adaptation to the valid slides; it uses no labels, but it does look at the
  images it is scored on, so it is reported apart from the recipe's AUC).

Each variant is scored like `hcd_evaluate --model=final`: scikit-learn ROC
AUC on the whole valid split, without and with 8x dihedral TTA. The first
line re-scores the stored model, which must match the run's recorded AUC.

  python bench/bn_reestimate.py --run_dir=runs/pcam_cpu --shards_dir=shards

Results: BENCHMARKS.md, "Batch 256, 72 px re-planned, and BatchNorm
re-estimation".
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
# Before TensorFlow: its oneDNN default (hcd/__init__.py).
import hcd  # pylint: disable=unused-import
import keras
import numpy as np
import tensorflow as tf

from hcd import metrics
from hcd.eval import inputs
from hcd.eval import predict
from hcd.models import augment

_RUN_DIR = flags.DEFINE_string("run_dir", None, "A finished hcd_train run "
                               "directory (holds model.keras).")
_SHARDS_DIR = flags.DEFINE_string("shards_dir", "shards", "Shards of the "
                                  "train and valid splits.")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "Split to "
                                   "re-estimate from (variant `train`).")
_VAL_SPLIT = flags.DEFINE_string("val_split", "valid", "Split to score on.")
_IMAGES = flags.DEFINE_integer("images", 2048, "Images per re-estimation, "
                               "in one forward pass (exact statistics).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and D4-view seed.")
flags.mark_flag_as_required("run_dir")


def _read_split(shards_dir: str, split: str):
  """Returns (uint8 images [n, 96, 96, 3], labels [n]) of one split."""
  images, _, labels = inputs.take_arrays(
      inputs.shards_source(shards_dir, split, batch_size=256))
  return images, labels


def _score(model, images, labels, tta: int) -> float:
  """ROC AUC of the mean probability over `tta` D4 views (hcd_predict's)."""
  predict_fn = predict.make_predict_fn([model], tta)
  probs = np.concatenate([predict_fn(images[i:i + 256]).numpy()
                          for i in range(0, len(images), 256)])
  return metrics.binary_metrics(labels, probs)["roc_auc"]


def _reestimate(model, bns, images) -> None:
  """Sets every BatchNorm's moving statistics to those of `images`."""
  momenta = [layer.momentum for layer in bns]
  # Momentum 0 makes the moving statistics the batch's; one batch of all the
  # images gives their population statistics, layer after layer.
  for layer in bns:
    layer.momentum = 0.0
  model(tf.constant(images), training=True)
  for layer, momentum in zip(bns, momenta):
    layer.momentum = momentum


def main(argv):
  del argv
  model = keras.models.load_model(
      os.path.join(_RUN_DIR.value, "model.keras"), compile=False)
  bns = [layer for layer in model.layers
         if isinstance(layer, keras.layers.BatchNormalization)]
  stored = [(layer.moving_mean.numpy(), layer.moving_variance.numpy())
            for layer in bns]
  val_images, val_labels = _read_split(_SHARDS_DIR.value, _VAL_SPLIT.value)
  train_images, _ = _read_split(_SHARDS_DIR.value, _TRAIN_SPLIT.value)
  rng = np.random.RandomState(_SEED.value)
  pick = rng.permutation(len(train_images))[:_IMAGES.value]
  train_views = np.stack([
      augment.d4_transform(tf.constant(train_images[i:i + 1]),
                           int(rng.randint(augment.d4_count))).numpy()[0]
      for i in pick])
  val_pick = val_images[rng.permutation(len(val_images))[:_IMAGES.value]]

  rows = []
  for name, images in (("stored", None), ("train", train_views),
                       ("valid", val_pick)):
    for layer, (mean, var) in zip(bns, stored):
      layer.moving_mean.assign(mean)
      layer.moving_variance.assign(var)
    if images is not None:
      _reestimate(model, bns, images)
    row = {"statistics": name,
           "val_auc": _score(model, val_images, val_labels, 1),
           "val_auc_tta8": _score(model, val_images, val_labels, 8)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
