"""The one batch structure of hcd's tf.data input, defined once.

Every dataset that feeds a model (training, validation during training,
evaluation and prediction, from shards or from an image folder; all built
by hcd/data/pipeline.py) yields dicts of

  image   uint8   [B, 96, 96, 3]  raw pixels
  label   int64   [B]             0 or 1; UNKNOWN_LABEL (-1) where unknown
                                  (Kaggle test, a plain folder of images)
  weight  float32 [B]             per-image loss and metric weight (the
                                  class weight of a reweighted training
                                  subset, else 1; 0 for padding)
  id      string  [B]             optional: the image id ("" for padding)

Why these dtypes: pixels stay uint8 to the accelerator (4x fewer bytes; the
train step casts, scales and augments there). Labels are int64 because
that is what shards store (hcd/data/features.py), where -1 marks unknown;
the train step casts them to float32 for the loss (0 and 1 are exact, so
the numerics are those of float labels). Ids are optional because strings
cannot go to an accelerator: the training stream never has them. Weights
are always there (4 bytes an image), so no consumer has to ask whether a
batch may hold padding, and validation with ids, shard evaluation and
folder evaluation yield exactly the same structure.

Padding (the last validation batch, filled to a static size) has weight 0,
label 0, id "" and black pixels; every consumer that can see padding drops
weight-0 images.

This module imports TensorFlow only inside its functions, so its names can
be imported without it.
"""

from __future__ import annotations

from hcd.data import features

IMAGE = "image"
LABEL = "label"
WEIGHT = "weight"
ID = "id"
UNKNOWN_LABEL = features.UNKNOWN_LABEL

# dtype names (tf.as_dtype takes them); TensorFlow is imported lazily.
DTYPES = {IMAGE: "uint8", LABEL: "int64", WEIGHT: "float32", ID: "string"}


def keys(with_ids: bool = False) -> tuple[str, ...]:
  """The keys of a batch, in a fixed order.

  Args:
    with_ids: the batch has "id".

  Returns:
    ("image", "label", "weight"[, "id"]).
  """
  return (IMAGE, LABEL, WEIGHT) + ((ID,) if with_ids else ())


def element_spec(batch_size: int | None = None, *,
                 with_ids: bool = False) -> dict:
  """The tf.TypeSpec of one batch (what `Dataset.element_spec` must equal).

  Args:
    batch_size: the static batch size, or None for a variable one.
    with_ids: include "id".

  Returns:
    dict key -> tf.TensorSpec.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shapes = {IMAGE: [batch_size, *features.IMAGE_SHAPE]}
  return {k: tf.TensorSpec(shapes.get(k, [batch_size]), tf.as_dtype(DTYPES[k]))
          for k in keys(with_ids)}


def make(image, label, *, weight=None, ids=None) -> dict:
  """A batch (or block) in the one structure, from its tensors (graph-safe).

  Labels of any integer dtype are cast to int64; a missing weight is 1 for
  every image.

  Args:
    image: uint8 [n, 96, 96, 3].
    label: integer [n] (0, 1 or UNKNOWN_LABEL).
    weight: float32 [n], or None for all ones.
    ids: string [n], or None for a batch without ids.

  Returns:
    dict {"image", "label", "weight"(, "id")}.

  Raises:
    TypeError: image not uint8, or label not an integer tensor (a float
      label would silently lose the UNKNOWN_LABEL convention).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = tf.convert_to_tensor(image)
  label = tf.convert_to_tensor(label)
  if image.dtype != tf.uint8:
    raise TypeError(f"batch images must be uint8, got {image.dtype.name}")
  if not label.dtype.is_integer:
    raise TypeError(f"batch labels must be integers, got {label.dtype.name}")
  batch = {IMAGE: image, LABEL: tf.cast(label, tf.int64),
           WEIGHT: (tf.ones_like(label, tf.float32) if weight is None
                    else tf.cast(weight, tf.float32))}
  if ids is not None:
    batch[ID] = ids
  return batch


def padding(batch_size: int, *, with_ids: bool = False) -> dict:
  """A batch of `batch_size` padding images (weight 0, label 0, id "").

  Args:
    batch_size: images in the batch.
    with_ids: include "id".

  Returns:
    dict of tensors in the structure of `element_spec(batch_size, ...)`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {k: tf.zeros(s.shape, s.dtype) for k, s in element_spec(
      batch_size, with_ids=with_ids).items()}
