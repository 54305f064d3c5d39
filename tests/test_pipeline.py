"""Tests of hcd.data.pipeline on tiny shards written with writer.write_arrays.

Image ids are the SHA-1 of the pixels (as Kaggle's are), so every image the
pipeline emits can be traced back to its id and checked against the subset
it should (or should not) belong to.
"""

import hashlib
import json

import numpy as np
import pytest
import tensorflow as tf

from hcd.data import features
from hcd.data import manifest as manifest_lib
from hcd.data import pipeline
from hcd.data import shard_reader
from hcd.data import subsets
from hcd.data import writer


def _sha1(img):
  return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def make_images(n, seed=0, pos_frac=0.4):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n,) + features.IMAGE_SHAPE, dtype=np.uint8)
  ids = [_sha1(im) for im in images]
  labels = (rng.random(n) < pos_frac).astype(np.int64)
  return images, ids, labels


def write(tmp_path, n=300, seed=0, split="train", num_shards=3, block_size=32,
          name="shards", pos_frac=0.4):
  images, ids, labels = make_images(n, seed, pos_frac)
  out = str(tmp_path / name)
  writer.write_arrays(images, ids, labels, out, split, num_shards,
                      block_size=block_size)
  return out, dict(zip(ids, labels.tolist()))


def subset_ids(plan):
  """Every id the selection of `plan` keeps, read with select_blocks."""
  records = shard_reader.read_blocks(plan.files, shuffle=False, seed=0,
                                     repeat=False)
  ids, labels, weights = [], [], []
  for b in pipeline.select_blocks(records, plan, with_ids=True):
    ids += [i.decode() for i in b["id"].numpy()]
    labels += b["label"].numpy().tolist()
    weights += b["weight"].numpy().tolist()
  return ids, labels, weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pipe")
  shards_dir, by_id = write(tmp)
  return shards_dir, by_id


def test_split_counts_disjoint_and_complete(data):
  shards_dir, by_id = data
  plan = subsets.make_plan(shards_dir, balance="none",
                           split_spec=subsets.SplitSpec(0.25, seed=7))
  train_ids, train_labels, _ = subset_ids(plan.train)
  val_ids, val_labels, _ = subset_ids(plan.val)
  assert not set(train_ids) & set(val_ids)
  assert sorted(train_ids + val_ids) == sorted(by_id)
  assert len(train_ids) == plan.train.num_examples
  assert len(val_ids) == plan.val.num_examples
  assert 0.15 < len(val_ids) / len(by_id) < 0.35
  # Labels travel with their images.
  assert [by_id[i] for i in train_ids] == train_labels
  assert plan.val.label_counts == {
      "0": val_labels.count(0), "1": val_labels.count(1)}


def test_split_is_stable_by_id(data, tmp_path):
  shards_dir, by_id = data
  spec = subsets.SplitSpec(0.2, seed=3)
  val1 = set(subset_ids(subsets.plan_subset(shards_dir, "train", "val",
                                            spec))[0])
  # Same images, another shard layout, plus 100 new images: the val subset
  # of the old ids does not move.
  images, ids, labels = make_images(300, seed=0)
  more_images, more_ids, more_labels = make_images(100, seed=1)
  other = str(tmp_path / "other")
  writer.write_arrays(np.concatenate([images, more_images]), ids + more_ids,
                      np.concatenate([labels, more_labels]), other, "train",
                      num_shards=5, block_size=17)
  val2 = set(subset_ids(subsets.plan_subset(other, "train", "val", spec))[0])
  assert val2 & set(by_id) == val1
  assert val2 - set(by_id)  # Some of the new ids are in val too.
  # Another seed gives another split.
  val3 = set(subset_ids(subsets.plan_subset(
      shards_dir, "train", "val", subsets.SplitSpec(0.2, seed=4)))[0])
  assert val3 != val1


def test_group_split_keeps_groups_together(data, tmp_path):
  shards_dir, by_id = data
  ids = sorted(by_id)
  groups = {i: f"slide{k % 12}" for k, i in enumerate(ids[:-5])}
  csv_path = tmp_path / "groups.csv"
  csv_path.write_text("id,group\n" + "".join(
      f"{i},{g}\n" for i, g in groups.items()))
  spec = subsets.SplitSpec(0.3, seed=1,
                           groups=subsets.read_groups_csv(str(csv_path)))
  plan = subsets.make_plan(shards_dir, split_spec=spec, balance="none")
  train_ids = set(subset_ids(plan.train)[0])
  val_ids = set(subset_ids(plan.val)[0])
  assert train_ids | val_ids == set(by_id)
  train_groups = {groups[i] for i in train_ids if i in groups}
  val_groups = {groups[i] for i in val_ids if i in groups}
  assert train_groups and val_groups
  assert not train_groups & val_groups


def test_group_csv_errors_name_file_and_row(tmp_path):
  bad = tmp_path / "g.csv"
  bad.write_text("id,slide\na,1\n")
  with pytest.raises(shard_reader.PipelineError, match="g.csv.*'id' and 'group'"):
    subsets.read_groups_csv(str(bad))
  bad.write_text("id,group\na,s1\nb,s2\na,s3\n")
  with pytest.raises(shard_reader.PipelineError, match=r"g.csv:4: id a"):
    subsets.read_groups_csv(str(bad))


def test_group_csv_with_byte_order_mark_and_blank_line(tmp_path):
  p = tmp_path / "g.csv"
  # A spreadsheet's byte-order mark and padded header; line 4 is blank, so
  # the conflict is on line 5 as an editor numbers it.
  p.write_text("\ufeff id , group \na,s1\nb,s2\n\nb,s3\n", encoding="utf-8")
  with pytest.raises(shard_reader.PipelineError, match=r"g.csv:5: id b"):
    subsets.read_groups_csv(str(p))
  p.write_text("\ufeffid,group\na,s1\n\nb,s2\n", encoding="utf-8")
  assert subsets.read_groups_csv(str(p)) == {"a": "s1", "b": "s2"}


def test_undersample_gives_equal_class_counts(data):
  shards_dir, by_id = data
  plan = subsets.make_plan(shards_dir, balance="undersample",
                           split_spec=subsets.SplitSpec(0.2, seed=7))
  ids, labels, weights = subset_ids(plan.train)
  unbalanced = subsets.plan_subset(shards_dir, "train", "train",
                                   subsets.SplitSpec(0.2, seed=7))
  n_min = min(unbalanced.label_counts.values())
  assert labels.count(0) == labels.count(1) == n_min
  assert plan.train.label_counts == {"0": n_min, "1": n_min}
  assert set(ids) <= set(subset_ids(unbalanced)[0])
  assert set(weights) == {1.0}
  # Validation is never rebalanced.
  assert plan.val.balance == "none"
  assert plan.val.label_counts["0"] != plan.val.label_counts["1"]


def test_reweight_weights_balance_the_classes(data):
  shards_dir, _ = data
  plan = subsets.make_plan(shards_dir, balance="reweight")
  _, labels, weights = subset_ids(plan.train)
  labels, weights = np.array(labels), np.array(weights)
  assert weights[labels == 0].sum() == pytest.approx(weights[labels == 1].sum())
  assert weights.sum() == pytest.approx(len(labels))


def test_train_batches_are_static_uint8_from_the_train_subset(data):
  shards_dir, by_id = data
  plan = subsets.make_plan(shards_dir, balance="undersample")
  train_ids = set(subset_ids(plan.train)[0])
  ds = pipeline.train_dataset(plan.train, 16, seed=5, cache=False,
                              mix_size=64)
  spec = ds.element_spec
  assert spec["image"].shape.as_list() == [16, 96, 96, 3]
  assert spec["image"].dtype == tf.uint8
  assert spec["label"].shape.as_list() == [16]
  seen = []
  for b in ds.take(3 * plan.train.num_examples // 16):  # 3 passes.
    for img, lab in zip(b["image"].numpy(), b["label"].numpy()):
      i = _sha1(img)
      assert i in train_ids
      assert by_id[i] == lab
      seen.append(i)
  assert set(seen) == train_ids  # Every training image shows up.


def test_train_stream_is_deterministic_given_the_seed(data):
  shards_dir, _ = data
  plan = subsets.make_plan(shards_dir, balance="none")

  def first(seed, cache):
    ds = pipeline.train_dataset(plan.train, 8, seed=seed, cache=cache,
                                mix_size=32, shuffle_blocks=4)
    return [_sha1(im) for b in ds.take(20) for im in b["image"].numpy()]

  a, b, c = first(1, False), first(1, False), first(2, False)
  assert a == b
  assert a != c
  assert first(1, True) == first(1, True)


def test_multi_pipeline_training_reads_disjoint_files(data):
  shards_dir, _ = data
  plan = subsets.make_plan(shards_dir, balance="none")
  seen = []
  for index in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2,
                                     input_pipeline_id=index,
                                     num_replicas_in_sync=2)
    ds = pipeline.train_dataset(plan.train, 8, seed=1, input_context=ctx,
                                cache=False)
    seen.append({_sha1(im) for b in ds.take(60) for im in b["image"].numpy()})
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def _eval_ids(ds):
  ids, real = [], 0
  for b in ds:
    assert b["image"].shape[0] == 16
    w = b["weight"].numpy()
    real += int((w > 0).sum())
    ids += [_sha1(im) for im, wt in zip(b["image"].numpy(), w) if wt > 0]
  return ids, real


def test_eval_dataset_covers_every_image_once_with_padding(data):
  shards_dir, by_id = data
  plan = subsets.make_plan(shards_dir, balance="undersample")
  val_ids = sorted(subset_ids(plan.val)[0])
  ids, real = _eval_ids(pipeline.eval_dataset(plan.val, 16))
  assert sorted(ids) == val_ids and real == len(val_ids)
  # With `steps`, every pipeline emits exactly steps * local replicas
  # batches, the extra ones all padding.
  steps = pipeline.eval_steps(plan.val, 32)
  per_pipeline = []
  for index in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2,
                                     input_pipeline_id=index,
                                     num_replicas_in_sync=2)
    ds = pipeline.eval_dataset(plan.val, 16, steps=steps, input_context=ctx)
    assert sum(1 for _ in ds) == steps
    per_pipeline.append(_eval_ids(ds)[0])
  assert sorted(per_pipeline[0] + per_pipeline[1]) == val_ids


def test_separate_val_split_and_no_validation(tmp_path):
  shards_dir, train_ids = write(tmp_path, n=120, seed=0)
  _, valid_ids = write(tmp_path, n=40, seed=9, split="valid")
  plan = subsets.make_plan(shards_dir, val_split="valid", balance="none")
  assert plan.train.num_examples == 120 and plan.val.num_examples == 40
  assert sorted(subset_ids(plan.val)[0]) == sorted(valid_ids)
  plan = subsets.make_plan(shards_dir, balance="none",
                           split_spec=subsets.SplitSpec(0.0))
  assert plan.val is None and plan.train.num_examples == 120


def test_missing_manifest_and_unlabelled_shards_are_clear_errors(tmp_path):
  with pytest.raises(manifest_lib.ManifestError, match="hcd-train.manifest.json"):
    subsets.make_plan(str(tmp_path / "nowhere"))
  images, ids, _ = make_images(20)
  out = str(tmp_path / "test_shards")
  writer.write_arrays(images, ids, [-1] * 20, out, "train", 1)
  with pytest.raises(shard_reader.PipelineError, match="unlabelled"):
    subsets.make_plan(out)
  with pytest.raises(shard_reader.PipelineError, match="unknown balance"):
    subsets.make_plan(out, balance="oversample")


def test_folds_partition_the_split_and_keep_groups(data, tmp_path):
  shards_dir, by_id = data
  ids = sorted(by_id)
  groups = {i: f"slide{k % 13}" for k, i in enumerate(ids)}
  for g in (None, groups):
    seen = []
    for fold in range(4):
      spec = subsets.SplitSpec(seed=5, groups=g, num_folds=4, fold=fold)
      plan = subsets.make_plan(shards_dir, split_spec=spec, balance="none")
      val, _, _ = subset_ids(plan.val)
      train, _, _ = subset_ids(plan.train)
      assert set(val).isdisjoint(train) and set(val) | set(train) == set(ids)
      if g:
        assert {g[i] for i in val}.isdisjoint({g[i] for i in train})
      seen.append(set(val))
    assert all(a.isdisjoint(b) for k, a in enumerate(seen)
               for b in seen[k + 1:])
    assert set().union(*seen) == set(ids)
    assert min(len(s) for s in seen) > 0.1 * len(ids)


def test_run_plan_reads_a_config_dict_like_a_train_config(data, tmp_path):
  from hcd.train.config import TrainConfig  # pylint: disable=g-import-not-at-top
  shards_dir, _ = data
  config = TrainConfig(shards_dir=shards_dir, num_folds=3, fold=1,
                       split_seed=9, balance="none")
  from_config = subsets.run_plan(config.data_settings())
  from_dict = subsets.run_validation_plan(
      TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
      .data_settings())
  assert subset_ids(from_config.val)[0] == subset_ids(from_dict)[0]
  unsplit = TrainConfig.from_dict(
      dict(config.to_dict(), num_folds=0, val_fraction=0.0))
  assert subsets.run_validation_plan(unsplit.data_settings()) is None


def test_evaluation_rebuilds_validation_with_the_training_defaults(data):
  # A config.json without the split settings (an older hcd wrote it) means
  # hcd_train's defaults (val_fraction 0.2, split_seed 123), not none.
  from hcd.eval import inputs  # pylint: disable=g-import-not-at-top
  from hcd.train.config import TrainConfig  # pylint: disable=g-import-not-at-top
  shards_dir, _ = data
  trained = subsets.run_plan(
      TrainConfig(shards_dir=shards_dir).data_settings()).val
  saved = {k: v for k, v in TrainConfig(shards_dir=shards_dir).to_dict()
           .items() if k not in ("val_fraction", "split_seed", "seed")}
  source = inputs.run_validation_source(saved, shards_dir, batch_size=16)
  assert source is not None
  ids = [i.decode() for b in source.dataset for i in b["id"].numpy()]
  assert sorted(set(ids)) == sorted(subset_ids(trained)[0])
