"""In-process tests of hcd.train.loop with an injected strategy.

The `tiny` model on ~200 random images in temp dirs: each run takes a few
seconds. The real CLI, 2-replica XLA runs, kill -9 resume and multi-worker
runs are in test_train_cli.py and test_multiworker.py.
"""

import csv
import json
import logging
import math
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from hcd import rundir
from hcd.data import features
from hcd.data import manifest as manifest_lib
from hcd.data import pipeline
from hcd.data import subsets
from hcd.data import writer
from hcd.train import artifacts
from hcd.train import budget
from hcd.train import loop
from hcd.train import runtime
from hcd.train import steps
from hcd.train.config import ConfigError
from hcd.train.config import TrainConfig

import test_pipeline  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
  out, _ = test_pipeline.write(tmp_path_factory.mktemp("loop"), n=240,
                               block_size=32)
  return out


@pytest.fixture(autouse=True)
def float32_policy():
  yield
  runtime.set_mixed_precision("none")


def _config(shards_dir, workdir, **kw):
  base = dict(model="tiny", shards_dir=shards_dir, workdir=str(workdir),
              batch_size=16, epochs=2, steps_per_epoch=4, steps_per_loop=2,
              jit_compile="false", tensorboard=True, seed=1)
  base.update(kw)
  return TrainConfig(**base)


def _strategy():
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_run_directory_contract(shards_dir, tmp_path):
  workdir = tmp_path / "run"
  config = _config(shards_dir, workdir)
  result = loop.train_and_evaluate(config, strategy=_strategy(),
                                   flags_text="--model=tiny\n")
  run = rundir.RunDir(str(workdir))
  for path in (run.flags, run.config, run.history_csv, run.history_json,
               run.model, run.best_model, run.metrics_plot,
               run.confusion_plot, run.val_predictions, run.metrics):
    assert os.path.getsize(path) > 0, path
  assert os.listdir(run.tensorboard)
  assert tf.train.latest_checkpoint(run.checkpoints)
  assert tf.train.latest_checkpoint(run.best_checkpoints)
  leftovers = [f for _, _, fs in os.walk(workdir) for f in fs if ".tmp-" in f]
  assert not leftovers

  cfg = json.load(open(run.config))
  assert cfg["model"] == "tiny" and cfg["num_params"] > 0
  assert cfg["steps_per_epoch"] == 4 and cfg["image_shape"] == [96, 96, 3]

  history = _read_csv(run.history_csv)
  assert [int(r["epoch"]) for r in history] == [1, 2]
  assert list(history[0]) == list(rundir.HISTORY_COLUMNS)
  for r in history:
    assert 0 < float(r["loss"]) and 0 <= float(r["val_auc"]) <= 1
    assert float(r["images_per_s"]) > 0

  # Predictions: every validation image once, labels from the shards, and
  # the saved model reproduces the probabilities (safe mode, no hcd code).
  plan = subsets.make_plan(shards_dir, split_spec=subsets.SplitSpec(
      0.2, 123), balance="undersample", seed=1)
  val_ids, val_labels, _ = test_pipeline.subset_ids(plan.val)
  rows = _read_csv(run.val_predictions)
  assert sorted(r["id"] for r in rows) == sorted(val_ids)
  label_of = dict(zip(val_ids, val_labels))
  assert all(int(r["label"]) == label_of[r["id"]] for r in rows)
  metrics = json.load(open(run.metrics))
  assert metrics["num_examples"] == len(val_ids)
  assert metrics["roc_auc"] == result["roc_auc"]
  assert 1 <= metrics["best_epoch"] <= 2 and metrics["epochs"] == 2

  model = keras.saving.load_model(run.model, safe_mode=True)
  manifest = manifest_lib.load_manifest(shards_dir, "train")
  images, ids, _ = zip(*[
      (im, i, l) for path in manifest_lib.shard_paths(shards_dir, manifest)
      for rec in tf.data.TFRecordDataset(path).as_numpy_iterator()
      for im, i, l in zip(*features.parse_block_numpy(rec))])
  index = {i: k for k, i in enumerate(ids)}
  some = rows[:8]
  batch = np.stack([images[index[r["id"]]] for r in some])
  probs = model.predict_on_batch(batch)[:, 0]
  np.testing.assert_allclose(probs, [float(r["prob"]) for r in some],
                             rtol=1e-5, atol=1e-6)


def test_resume_continues_to_the_same_epoch_count(shards_dir, tmp_path):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(_config(shards_dir, workdir, epochs=1),
                          strategy=_strategy())
  first = json.load(open(workdir / "history.json"))
  loop.train_and_evaluate(_config(shards_dir, workdir, epochs=3),
                          strategy=_strategy())
  history = json.load(open(workdir / "history.json"))
  assert [r["epoch"] for r in history] == [1, 2, 3]
  assert history[0] == first[0]  # Kept, not retrained.
  ckpt = tf.train.load_checkpoint(tf.train.latest_checkpoint(
      str(workdir / "checkpoints")))
  assert ckpt.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 12
  assert ckpt.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == 3
  # A finished run started again trains nothing and keeps its history.
  loop.train_and_evaluate(_config(shards_dir, workdir, epochs=3),
                          strategy=_strategy())
  assert json.load(open(workdir / "history.json")) == history


def test_resume_refuses_another_runs_checkpoint(shards_dir, tmp_path):
  # The same --workdir with another fold would otherwise resume fold 0's
  # model, score it on images it trained on and overwrite its results.
  workdir = tmp_path / "run"
  loop.train_and_evaluate(
      _config(shards_dir, workdir, epochs=1, num_folds=2, fold=0),
      strategy=_strategy())
  run = rundir.RunDir(str(workdir))
  before = {p: open(p, "rb").read() for p in (run.config, run.metrics,
                                               run.val_predictions)}
  with pytest.raises(ConfigError) as e:
    loop.train_and_evaluate(
        _config(shards_dir, workdir, epochs=1, num_folds=2, fold=1,
                learning_rate=0.01),
        strategy=_strategy())
  message = str(e.value)
  assert str(workdir) in message and "fold: 0 there, 1 now" in message
  assert "learning_rate" in message and "new --workdir" in message
  assert {p: open(p, "rb").read() for p in before} == before
  # Where and how it logs may change: the same run resumes (and, being
  # finished, trains nothing more).
  loop.train_and_evaluate(
      _config(shards_dir, workdir, epochs=1, num_folds=2, fold=0,
              log_every_steps=1, tensorboard=False),
      strategy=_strategy())
  assert len(json.load(open(workdir / "history.json"))) == 1


def _damage_index(checkpoints, damage):
  """Damages a run's checkpoint index (or its whole checkpoints/)."""
  index = checkpoints / "checkpoint"
  if damage == "garbage":
    index.write_text("garbage {{{")
  elif damage == "empty":
    index.write_bytes(b"")
  elif damage == "missing":
    index.unlink()
  elif damage == "no_checkpoints":
    shutil.rmtree(checkpoints)
  else:
    raise ValueError(damage)


@pytest.mark.parametrize("damage", ["garbage", "empty", "missing"])
def test_a_damaged_index_resumes_from_the_checkpoint_files(shards_dir,
                                                           tmp_path, damage):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(_config(shards_dir, workdir, epochs=2),
                          strategy=_strategy())
  first = json.load(open(workdir / "history.json"))
  _damage_index(workdir / "checkpoints", damage)
  loop.train_and_evaluate(_config(shards_dir, workdir, epochs=3),
                          strategy=_strategy())
  history = json.load(open(workdir / "history.json"))
  assert [r["epoch"] for r in history] == [1, 2, 3]
  assert history[:2] == first  # Resumed, not retrained from epoch 1.
  # The index was written again, so the old checkpoints are pruned as usual.
  state = tf.train.get_checkpoint_state(str(workdir / "checkpoints"))
  assert os.path.basename(state.model_checkpoint_path) == "ckpt-12"
  assert sorted(p.name for p in (workdir / "checkpoints").glob("*.index")) == [
      "ckpt-12.index", "ckpt-8.index"]


@pytest.mark.parametrize("damage", ["garbage", "empty", "missing",
                                    "no_checkpoints"])
def test_another_run_never_overwrites_a_run_directory(shards_dir, tmp_path,
                                                      damage):
  """Whatever state checkpoints/ is in, config.json says whose run it is."""
  workdir = tmp_path / "run"
  loop.train_and_evaluate(_config(shards_dir, workdir, epochs=1),
                          strategy=_strategy())
  _damage_index(workdir / "checkpoints", damage)
  run = rundir.RunDir(str(workdir))
  before = {p: open(p, "rb").read() for p in (
      run.config, run.metrics, run.val_predictions, run.model,
      run.history_json)}
  with pytest.raises(ConfigError) as e:
    loop.train_and_evaluate(
        _config(shards_dir, workdir, epochs=1, learning_rate=0.01),
        strategy=_strategy())
  message = str(e.value)
  assert str(workdir) in message and "learning_rate" in message
  assert "new --workdir" in message
  assert {p: open(p, "rb").read() for p in before} == before


def test_unreadable_index_and_checkpoints_stop_naming_them(shards_dir,
                                                           tmp_path):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(_config(shards_dir, workdir, epochs=2),
                          strategy=_strategy())
  checkpoints = workdir / "checkpoints"
  _damage_index(checkpoints, "garbage")
  for data in checkpoints.glob("ckpt-*.data-*"):
    data.write_bytes(data.read_bytes()[:10])
  config_before = (workdir / "config.json").read_bytes()
  with pytest.raises(ConfigError) as e:
    loop.train_and_evaluate(_config(shards_dir, workdir, epochs=3),
                            strategy=_strategy())
  message = str(e.value)
  assert f"{checkpoints}: its index" in message
  assert "no checkpoint restores" in message and "delete" in message
  assert (workdir / "config.json").read_bytes() == config_before


def test_fewer_epochs_than_a_run_has_trained_are_refused(shards_dir,
                                                         tmp_path):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(_config(shards_dir, workdir, epochs=2),
                          strategy=_strategy())
  run = rundir.RunDir(str(workdir))
  before = {p: open(p, "rb").read() for p in (
      run.config, run.metrics, run.model, run.history_json)}
  with pytest.raises(ConfigError, match=r"has trained 2 epoch\(s\).*"
                     r"--epochs=2 or more"):
    loop.train_and_evaluate(_config(shards_dir, workdir, epochs=1),
                            strategy=_strategy())
  assert {p: open(p, "rb").read() for p in before} == before
  assert json.load(open(run.config))["epochs"] == 2


def test_same_seed_same_weights(shards_dir, tmp_path):
  digests = [loop.train_and_evaluate(
      _config(shards_dir, tmp_path / f"r{k}", epochs=1, rot90=True,
              color_jitter=0.1), strategy=_strategy())["weights_sha256"]
             for k in range(2)]
  assert digests[0] == digests[1]
  other = loop.train_and_evaluate(
      _config(shards_dir, tmp_path / "r2", epochs=1, seed=2, rot90=True,
              color_jitter=0.1), strategy=_strategy())["weights_sha256"]
  assert other != digests[0]


def test_without_validation_and_with_mixed_precision(shards_dir, tmp_path):
  workdir = tmp_path / "run"
  result = loop.train_and_evaluate(
      _config(shards_dir, workdir, epochs=1, val_fraction=0.0,
              balance="reweight", mixed_precision="bf16",
              lr_schedule="cosine", warmup_epochs=0.5),
      strategy=_strategy())
  assert "roc_auc" not in result and result["best_epoch"] == 1
  assert os.path.exists(workdir / "best.keras")
  assert not os.path.exists(workdir / "val_predictions.csv")
  history = json.load(open(workdir / "history.json"))
  assert history[0]["val_auc"] is None and np.isfinite(history[0]["loss"])


def test_fp16_uses_loss_scaling(shards_dir, tmp_path):
  workdir = tmp_path / "run"
  result = loop.train_and_evaluate(
      _config(shards_dir, workdir, epochs=1, mixed_precision="fp16"),
      strategy=_strategy())
  assert np.isfinite(json.load(open(workdir / "history.json"))[0]["loss"])
  assert result["num_params"] > 0


def test_config_errors_are_clear(shards_dir, tmp_path):
  with pytest.raises(ConfigError, match="unknown model 'nope'.*model1"):
    loop.train_and_evaluate(_config(shards_dir, tmp_path, model="nope"),
                            strategy=_strategy())
  with pytest.raises(ConfigError, match="val_fraction"):
    loop.train_and_evaluate(_config(shards_dir, tmp_path, val_fraction=1.5),
                            strategy=_strategy())
  with pytest.raises(manifest_lib.ManifestError, match="hcd-train.manifest.json"):
    loop.train_and_evaluate(_config(str(tmp_path / "none"), tmp_path),
                            strategy=_strategy())


def test_divergence_is_reported_as_such(shards_dir, tmp_path):
  # A learning rate of 1e38 sends the weights to inf in one Adam step (the
  # loss becomes inf or nan, by kernel); the run must stop saying so, not
  # fail later on "bad" probabilities.
  workdir = tmp_path / "run"
  with pytest.raises(loop.TrainingDiverged,
                     match=r"epoch 1: the training loss is (nan|inf).*diverged"):
    loop.train_and_evaluate(_config(shards_dir, workdir, epochs=1,
                                    learning_rate=1e38),
                            strategy=_strategy())
  assert not os.path.exists(workdir / "model.keras")


def _val_predictions(workdir):
  rows = _read_csv(os.path.join(workdir, "val_predictions.csv"))
  return (np.array([int(r["label"]) for r in rows]),
          np.array([float(r["prob"]) for r in rows]))


def test_validation_auc_is_exact(shards_dir, tmp_path):
  """The history's val_auc is scikit-learn's AUC of the validation probs."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  loop.train_and_evaluate(_config(shards_dir, workdir, epochs=1),
                          strategy=_strategy())
  labels, probs = _val_predictions(workdir)
  history = json.load(open(workdir / "history.json"))
  assert history[-1]["val_auc"] == pytest.approx(
      roc_auc_score(labels, probs), abs=1e-9)


def test_tightly_clustered_model_is_ranked_by_its_exact_auc(tmp_path):
  """Probabilities within 0.005 of each other: streaming AUC buckets them.

  Selection (best.keras) follows `Trainer.evaluate`; it must report the
  model's real ranking quality, not the 0.5 that a thresholded streaming
  AUC gives when every probability falls between two thresholds.
  """
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  # Positives are brighter, so even an untrained net ranks them (AUC >> 0.5).
  rng = np.random.default_rng(4)
  labels = np.arange(200) % 2
  images = rng.integers(0, 150, (200, 96, 96, 3), dtype=np.uint8)
  images[labels == 1] += 100
  ids = [f"{k:040x}" for k in range(200)]
  writer.write_arrays(images, ids, labels, str(tmp_path), "train", 2)
  config = _config(str(tmp_path), "/unused", val_fraction=0.5)
  strategy = _strategy()
  plan = subsets.run_plan(config.data_settings())
  trainer = steps.Trainer(config, strategy, 1e-3, 4, jit=False)
  head = trainer.model.get_layer("probability")
  kernel, bias = head.get_weights()
  val_with_ids = pipeline.eval_dataset(plan.val, 16, with_ids=True)
  _, y, p = trainer.predict(val_with_ids)
  logits = np.log(p / (1 - p))
  # The head is linear in its weights: squeeze the logits into 0.016 +- 0.01,
  # between two of the streaming metric's thresholds (logit 0 and 0.032),
  # with the sign that ranks positives first.
  scale = 0.01 / np.ptp(logits) * (1 if roc_auc_score(y, p) >= 0.5 else -1)
  head.set_weights([kernel * scale,
                    (bias - logits.mean()) * scale + 0.016])
  val_ds = strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.eval_dataset(plan.val, 16, steps=100,
                                        input_context=ctx))
  val_steps = pipeline.eval_steps(plan.val, 16)
  exact = trainer.evaluate(iter(val_ds), val_steps)["val_auc"]
  ids, labels, probs = trainer.predict(val_with_ids)
  assert np.ptp(probs) < 0.005 and len(np.unique(probs)) > 10
  assert exact == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)
  streaming = steps.Metrics("val_")
  streaming.update(tf.constant(labels, tf.float32),
                   tf.constant(probs[:, None], tf.float32),
                   tf.zeros(len(labels)), tf.ones(len(labels)))
  assert abs(streaming.result()["val_auc"] - 0.5) < 1e-6  # What it replaced.
  assert exact > 0.6  # The ranking the streaming metric could not see.


def test_ema_weights_are_validated_and_saved(shards_dir, tmp_path):
  workdir = tmp_path / "run"
  config = _config(shards_dir, workdir, epochs=2, ema_decay=0.9)
  result = loop.train_and_evaluate(config, strategy=_strategy())
  ckpt = tf.train.load_checkpoint(tf.train.latest_checkpoint(
      str(workdir / "checkpoints")))
  names = [n for n, _ in tf.train.list_variables(
      tf.train.latest_checkpoint(str(workdir / "checkpoints")))]
  ema_names = sorted(n for n in names if n.startswith("ema/"))
  assert ema_names, names
  model = keras.saving.load_model(str(workdir / "model.keras"),
                                  safe_mode=True)
  # model.keras holds the averaged weights, not the live ones.
  saved = {w.path: w.numpy() for w in model.weights}
  first_ema = ckpt.get_tensor("ema/0/.ATTRIBUTES/VARIABLE_VALUE")
  assert any(np.array_equal(first_ema, v) for v in saved.values())
  live = [n for n in names if n.startswith("model/") and "VARIABLE" in n]
  live_values = [ckpt.get_tensor(n) for n in live]
  assert not any(np.array_equal(first_ema, v) for v in live_values)
  # Validation scored those same weights: metrics match val_predictions.
  labels, probs = _val_predictions(workdir)
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  assert result["roc_auc"] == pytest.approx(roc_auc_score(labels, probs))
  # Resuming a finished run restores the average and saves the same model.
  loop.train_and_evaluate(config, strategy=_strategy())
  again = keras.saving.load_model(str(workdir / "model.keras"),
                                  safe_mode=True)
  for a, b in zip(model.weights, again.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_mixing_and_hue_train_deterministically(shards_dir, tmp_path):
  kw = dict(epochs=1, mix="mixup", mix_alpha=0.4, hue_jitter=0.05)
  a = loop.train_and_evaluate(_config(shards_dir, tmp_path / "a", **kw),
                              strategy=_strategy())
  b = loop.train_and_evaluate(_config(shards_dir, tmp_path / "b", **kw),
                              strategy=_strategy())
  plain = loop.train_and_evaluate(
      _config(shards_dir, tmp_path / "c", epochs=1, hue_jitter=0.05),
      strategy=_strategy())
  assert a["weights_sha256"] == b["weights_sha256"]
  assert a["weights_sha256"] != plain["weights_sha256"]
  assert np.isfinite(json.load(open(tmp_path / "a" / "history.json"))[0][
      "loss"])


def test_fold_run_validates_on_its_fold(shards_dir, tmp_path):
  folds = []
  for fold in range(2):
    workdir = tmp_path / f"fold{fold}"
    loop.train_and_evaluate(
        _config(shards_dir, workdir, epochs=1, num_folds=2, fold=fold),
        strategy=_strategy())
    folds.append({r["id"] for r in _read_csv(workdir / "val_predictions.csv")})
    cfg = json.load(open(workdir / "config.json"))
    assert (cfg["num_folds"], cfg["fold"]) == (2, fold)
  manifest = manifest_lib.load_manifest(shards_dir, "train")
  assert not folds[0] & folds[1]
  assert len(folds[0] | folds[1]) == manifest["num_examples"]


def test_fold_settings_are_validated(shards_dir, tmp_path):
  with pytest.raises(ConfigError, match="fold must be in 0..2"):
    _config(shards_dir, tmp_path, num_folds=3, fold=3).validate()
  with pytest.raises(ConfigError, match="exclude each other"):
    _config(shards_dir, tmp_path, num_folds=3, val_split="valid").validate()
  with pytest.raises(ConfigError, match="needs num_folds"):
    _config(shards_dir, tmp_path, fold=1).validate()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_weight_decay_shrinks_kernels_only(tmp_path, optimizer):
  # Zero gradients leave Adam's and momentum SGD's step at zero, so any change
  # is the decay.
  from hcd import models  # pylint: disable=g-import-not-at-top
  config = _config(str(tmp_path), tmp_path / "run", weight_decay=0.5,
                   lr_schedule="constant", optimizer=optimizer)
  model = models.build_model("tiny")
  opt = steps.make_optimizer(config, learning_rate=0.1, steps_per_epoch=4)
  before = {v.path: np.array(v) for v in model.trainable_variables}
  opt.apply_gradients([(tf.zeros_like(v), v)
                       for v in model.trainable_variables])
  names = set()
  for v in model.trainable_variables:
    names.add(v.name)
    if v.name in steps.NO_DECAY_NAMES:
      np.testing.assert_array_equal(np.array(v), before[v.path], v.path)
    else:
      np.testing.assert_allclose(np.array(v), before[v.path] * (1 - 0.1 * 0.5),
                                 rtol=1e-6, err_msg=v.path)
  assert {"kernel", "gamma", "beta", "bias"} <= names


def test_sgd_takes_a_nesterov_momentum_step(tmp_path):
  # Nesterov SGD (Keras): m = mu*m - lr*g; w += mu*m - lr*g. Two steps of a
  # constant gradient g: w1 = w0 - lr*g*(1+mu), w2 = w1 - lr*g*(1+mu+mu^2).
  config = _config(str(tmp_path), tmp_path / "run", optimizer="sgd",
                   momentum=0.5, lr_schedule="constant")
  opt = steps.make_optimizer(config, learning_rate=0.1, steps_per_epoch=4)
  assert isinstance(opt, keras.optimizers.SGD) and opt.nesterov
  w = keras.Variable(np.ones(3, np.float32))
  g = tf.constant([1.0, -2.0, 0.5])
  opt.apply_gradients([(g, w)])
  np.testing.assert_allclose(np.array(w), 1 - 0.1 * np.array(g) * 1.5,
                             rtol=1e-6)
  opt.apply_gradients([(g, w)])
  np.testing.assert_allclose(
      np.array(w), 1 - 0.1 * np.array(g) * (1.5 + 1.75), rtol=1e-6)


def test_eta_skips_the_tracing_epoch_and_ends_at_zero():
  # 300 s first epoch (tracing), then ~100 s: 3 epochs left is 5 minutes.
  assert budget.eta([300.0, 100.0, 102.0, 98.0], 3) == ", eta 0:05:00"
  assert budget.eta([90.0], 2) == ", eta 0:03:00"
  assert budget.eta([100.0, 100.0], 72) == ", eta 2:00:00"
  assert budget.eta([100.0, 100.0], 0) == ""
  assert budget.eta([], 5) == ""


def test_time_budget_sets_the_length_and_anneals_within_it(shards_dir,
                                                           tmp_path):
  # A budget too short for more than the decision epoch (2) and one to
  # anneal in: 3 of the 6 epochs, the peak held through epoch 2, lr 0 at
  # the end.
  workdir = tmp_path / "run"
  config = _config(shards_dir, workdir, epochs=6, lr_schedule="cosine",
                   warmup_epochs=1, time_budget_min=1e-6)
  result = loop.train_and_evaluate(config, strategy=_strategy())
  history = json.load(open(workdir / "history.json"))
  assert [r["epoch"] for r in history] == [1, 2, 3]
  assert history[1]["lr"] == pytest.approx(1e-3)  # tiny's default peak.
  assert history[2]["lr"] == pytest.approx(0.0, abs=1e-9)
  assert result["epochs"] == 3
  assert json.load(open(workdir / "config.json"))["time_budget_min"] == 1e-6
  # Started again, the run keeps its decision: nothing left to train.
  loop.train_and_evaluate(config, strategy=_strategy())
  assert json.load(open(workdir / "history.json")) == history

  # A budget with room for every epoch trains --epochs, annealed to 0.
  workdir = tmp_path / "roomy"
  loop.train_and_evaluate(
      _config(shards_dir, workdir, epochs=4, lr_schedule="cosine",
              warmup_epochs=1, time_budget_min=600.0), strategy=_strategy())
  history = json.load(open(workdir / "history.json"))
  assert [r["epoch"] for r in history] == [1, 2, 3, 4]
  assert history[1]["lr"] == pytest.approx(1e-3)
  assert 0 < history[2]["lr"] < 1e-3
  assert history[3]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_time_budget_can_end_with_a_short_epoch(shards_dir, tmp_path,
                                                monkeypatch):
  # Whatever the timings, say the budget left room for 2 whole epochs and
  # 2 steps after epoch 2: the run trains 4 + 4 + 4 + 4 + 2 steps, the
  # short fifth epoch validated like the others, the cosine at 0 there.
  from hcd.train import schedule  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(schedule, "budget_steps", lambda *a, **k: 18)
  workdir = tmp_path / "run"
  config = _config(shards_dir, workdir, epochs=8, lr_schedule="cosine",
                   warmup_epochs=1, time_budget_min=30)
  loop.train_and_evaluate(config, strategy=_strategy())
  history = json.load(open(workdir / "history.json"))
  assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
  assert history[4]["val_auc"] is not None
  assert history[3]["lr"] > 0
  assert history[4]["lr"] == pytest.approx(0.0, abs=1e-9)
  ckpt = tf.train.load_checkpoint(tf.train.latest_checkpoint(
      str(workdir / "checkpoints")))
  assert ckpt.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 18
  assert ckpt.get_tensor("total_steps/.ATTRIBUTES/VARIABLE_VALUE") == 18


def test_a_budgeted_run_logs_its_plans_eta(shards_dir, tmp_path,
                                          monkeypatch, caplog):
  # Once planned, the ETA on each epoch line is the plan's own projection
  # (here: one hour past the time spent), not a count of epochs times
  # their median time, which once disagreed with the plan by up to an epoch.
  from hcd.train import schedule  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(schedule, "budget_steps", lambda *a, **k: 18)
  monkeypatch.setattr(schedule, "budget_end",
                      lambda elapsed, *a: elapsed + 3600.0)
  config = _config(shards_dir, tmp_path / "run", epochs=8,
                   lr_schedule="cosine", warmup_epochs=1, time_budget_min=30)
  with caplog.at_level(logging.INFO):
    loop.train_and_evaluate(config, strategy=_strategy())
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("epoch ")]
  assert [l.split(":")[0] for l in lines] == [
      "epoch 1/8", "epoch 2/5", "epoch 3/5", "epoch 4/5", "epoch 5/5"]
  for line in lines[1:4]:  # Planned after epochs 2-4.
    assert line.endswith(", eta 1:00:00"), line
  assert "eta" not in lines[4]


def test_time_budget_is_planned_again_after_each_epoch(shards_dir, tmp_path,
                                                      monkeypatch):
  # The budget first allows 7 epochs of 4 steps (28), then, as if the box
  # slowed down, 18 steps from epoch 3 on. The run ends after a 2-step fifth
  # epoch, and the learning rate follows one continuous cosine: at step 12
  # where the first plan put it, then annealed to 0 over the 6 steps left.
  # The run is interrupted after epoch 4 and resumed: the restored schedule
  # carries on where the re-plan left it.
  from hcd.train import schedule  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_budget(*args, min_steps=None):
    calls.append((args[4], min_steps))  # steps done, minimum.
    if len(calls) == 3 and crash:
      raise RuntimeError("killed")
    return 28 if len(calls) == 1 else 18

  monkeypatch.setattr(schedule, "budget_steps", fake_budget)
  workdir = tmp_path / "run"
  config = _config(shards_dir, workdir, epochs=8, lr_schedule="cosine",
                   warmup_epochs=1, time_budget_min=30)
  crash = True
  with pytest.raises(RuntimeError, match="killed"):
    loop.train_and_evaluate(config, strategy=_strategy())
  assert calls == [(8, None), (12, 0), (16, 0)]
  crash = False
  loop.train_and_evaluate(config, strategy=_strategy())
  assert calls[3:] == [(16, 0)]  # Epoch 4 again, then the last epoch.
  history = json.load(open(workdir / "history.json"))
  assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
  lrs = [r["lr"] for r in history]
  cos = lambda p: 1e-3 * 0.5 * (1 + math.cos(math.pi * p))
  assert lrs[1] == pytest.approx(1e-3)
  assert lrs[2] == pytest.approx(cos(4 / 20))  # 4 of the first plan's 20.
  assert lrs[3] == pytest.approx(cos(0.2 + 0.8 * 4 / 6))
  assert lrs[4] == pytest.approx(0.0, abs=1e-9)
  ckpt = tf.train.load_checkpoint(tf.train.latest_checkpoint(
      str(workdir / "checkpoints")))
  assert ckpt.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 18
  assert ckpt.get_tensor("lr_plan/end_step/.ATTRIBUTES/VARIABLE_VALUE") == 18


def test_a_replan_with_no_step_left_ends_the_run_at_once(shards_dir, tmp_path,
                                                        monkeypatch, caplog):
  # The first plan allows 7 epochs of 4 steps; after epoch 3 the box has
  # slowed so much that no step fits (or none would repay a validation
  # pass): epoch 3 is the last, with no 1-step epoch after it, and the run
  # still writes its final model and metrics.
  from hcd.train import schedule  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_budget(*args, min_steps=None):
    calls.append((args[4], min_steps))
    return 28 if len(calls) == 1 else args[4]  # Then: the steps done.

  monkeypatch.setattr(schedule, "budget_steps", fake_budget)
  workdir = tmp_path / "run"
  config = _config(shards_dir, workdir, epochs=8, lr_schedule="cosine",
                   warmup_epochs=1, time_budget_min=30)
  with caplog.at_level(logging.INFO):
    metrics = loop.train_and_evaluate(config, strategy=_strategy())
  assert calls == [(8, None), (12, 0)]
  history = json.load(open(workdir / "history.json"))
  assert [r["epoch"] for r in history] == [1, 2, 3]
  assert metrics["epochs"] == 3
  assert (workdir / "model.keras").exists()
  assert any("re-planned from 28 to 12 steps: 3 epochs in all" in
             r.getMessage() for r in caplog.records)
  ckpt = tf.train.load_checkpoint(tf.train.latest_checkpoint(
      str(workdir / "checkpoints")))
  assert ckpt.get_tensor("total_steps/.ATTRIBUTES/VARIABLE_VALUE") == 12


def test_time_budget_must_not_be_negative(shards_dir, tmp_path):
  with pytest.raises(ConfigError, match="time_budget_min must be >= 0"):
    _config(shards_dir, tmp_path, time_budget_min=-1).validate()
