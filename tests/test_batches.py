"""One batch structure (hcd.data.batches) from the one builder (pipeline).

Training, validation during training, evaluation of shards and evaluation
of an image folder must yield the same keys and dtypes, as
`batches.element_spec` defines them; only the optional ids and the static
batch size differ.
"""

import numpy as np
import pytest
import tensorflow as tf

from hcd.data import batches
from hcd.data import pipeline
from hcd.data import subsets
from hcd.data import writer
from hcd.eval import inputs

import evalutil


def _ids(n, prefix):
  return [f"{prefix}{k:03d}" for k in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("batches")
  shards_dir = str(tmp / "shards")
  writer.write_arrays(evalutil.images(60, seed=1), _ids(60, "s"),
                      np.arange(60) % 2, shards_dir, "train", 3,
                      block_size=16)
  # A Kaggle test folder: no labels.
  evalutil.write_tiffs(tmp / "folder" / "test", evalutil.images(7, seed=2),
                       _ids(7, "f"))
  return shards_dir, str(tmp / "folder")


def _spec(ds):
  return {k: (s.dtype, s.shape.as_list()) for k, s in ds.element_spec.items()}


def _want(batch_size=None, with_ids=False):
  return {k: (s.dtype, s.shape.as_list())
          for k, s in batches.element_spec(batch_size,
                                           with_ids=with_ids).items()}


def test_every_dataset_yields_the_one_structure(data):
  shards_dir, folder = data
  plan = subsets.make_plan(shards_dir, balance="reweight",
                           split_spec=subsets.SplitSpec(0.3, seed=2))
  training = pipeline.train_dataset(plan.train, 8, seed=1, mix_size=16)
  validation = pipeline.eval_dataset(plan.val, 8, steps=5)
  validation_ids = pipeline.eval_dataset(plan.val, 8, with_ids=True)
  shard_eval = inputs.shards_source(shards_dir, "train", 8).dataset
  val_eval = inputs.plan_source(plan.val, 8).dataset
  folder_eval = inputs.folder_source(folder, "test", 4,
                                     progress=False).dataset
  assert _spec(training) == _spec(validation) == _want(8)
  assert _spec(validation_ids) == _want(8, with_ids=True)
  for ds in (shard_eval, val_eval, folder_eval):
    assert _spec(ds) == _want(None, with_ids=True)
  # The same keys and dtypes everywhere; ids only where asked for.
  dtypes = {k: s.dtype for k, s in batches.element_spec(
      with_ids=True).items()}
  for ds in (training, validation, validation_ids, shard_eval, val_eval,
             folder_eval):
    assert {k: s.dtype for k, s in ds.element_spec.items()} == {
        k: dtypes[k] for k in ds.element_spec}
  assert set(training.element_spec) == set(batches.keys())
  assert tuple(folder_eval.element_spec) == batches.keys(with_ids=True)


def test_labels_weights_and_padding_follow_the_conventions(data):
  shards_dir, folder = data
  plan = subsets.make_plan(shards_dir, balance="reweight",
                           split_spec=subsets.SplitSpec(0.3, seed=2))
  # Training: the reweighted subset's class weights, labels 0/1.
  b = next(iter(pipeline.train_dataset(plan.train, 8, seed=1, mix_size=16)))
  labels, weights = b["label"].numpy(), b["weight"].numpy()
  assert set(labels.tolist()) <= {0, 1}
  np.testing.assert_allclose(weights,
                             np.asarray(plan.train.class_weights)[labels])
  # Validation: padding is weight 0, label 0, id "".
  steps = pipeline.eval_steps(plan.val, 8) + 1
  rows = [(i, l, w) for b in pipeline.eval_dataset(
      plan.val, 8, steps=steps, with_ids=True)
          for i, l, w in zip(b["id"].numpy(), b["label"].numpy(),
                             b["weight"].numpy())]
  real = [r for r in rows if r[2] > 0]
  pad = [r for r in rows if r[2] == 0]
  assert len(real) == plan.val.num_examples and len(rows) == 8 * steps
  assert all(w == 1 for _, _, w in real)
  assert set(pad) == {(b"", 0, 0.0)}
  # A folder without labels: UNKNOWN_LABEL, weight 1.
  src = inputs.folder_source(folder, "test", 4, progress=False)
  got = [(l, w) for b in src.dataset
         for l, w in zip(b["label"].numpy(), b["weight"].numpy())]
  assert got == [(batches.UNKNOWN_LABEL, 1.0)] * 7
  # Shards of a whole split: the stored labels, weight 1.
  _, ids, labels = inputs.take_arrays(inputs.shards_source(shards_dir,
                                                           "train", 8))
  assert dict(zip(ids, labels.tolist())) == {
      i: k % 2 for k, i in enumerate(_ids(60, "s"))}


def test_make_refuses_float_labels_and_other_pixels():
  image = tf.zeros([2, 96, 96, 3], tf.uint8)
  with pytest.raises(TypeError, match="labels must be integers"):
    batches.make(image, tf.constant([0.0, 1.0]))
  with pytest.raises(TypeError, match="images must be uint8"):
    batches.make(tf.zeros([2, 96, 96, 3]), tf.constant([0, 1]))
  b = batches.make(image, tf.constant([0, -1], tf.int32))
  assert b["label"].dtype == tf.int64 and b["weight"].numpy().tolist() == [
      1.0, 1.0]


def test_batch_blocks_refuses_unknown_remainders(data):
  shards_dir, _ = data
  blocks = pipeline.subset_blocks(subsets.whole_split(shards_dir, "train"))
  with pytest.raises(ValueError, match="remainder"):
    pipeline.batch_blocks(blocks, 8, remainder="truncate")
  with pytest.raises(ValueError, match="num_batches"):
    pipeline.batch_blocks(blocks, 8, remainder="keep", num_batches=3)
  with pytest.raises(ValueError, match="steps needs pad"):
    pipeline.eval_dataset(subsets.whole_split(shards_dir, "train"), 8,
                          steps=3, pad=False)
