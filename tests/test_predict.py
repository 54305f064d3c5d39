"""Tests for prediction: folder vs shards, TTA, ensembles, errors, CLI, export.

Models are tiny and data is a few dozen patches, so everything runs in
seconds on a CPU. The real Kaggle TIFFs (../shared/data/kaggle_tif) are used
when present.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hcd import rundir
from hcd.data import decode
from hcd.data import sources
from hcd.data import writer
from hcd.eval import export
from hcd.eval import inputs
from hcd.eval import predict
from hcd.eval import submission

import evalutil


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("run")
  return evalutil.make_run(str(d / "tiny"), evalutil.tiny_model())


@pytest.fixture(scope="module")
def tiny(tiny_run):
  return predict.load_model(rundir.model_file(tiny_run))


def _predict(models, source, tta=1):
  return predict.predict(models, source.dataset, tta, source.num_examples,
                         progress=False)


@pytest.mark.skipif(not evalutil.KAGGLE_TIF.is_dir(), reason=evalutil.NO_SHARED)
@pytest.mark.parametrize("split", ["test", "train", "lzw_resaved"])
def test_real_tiffs_direct_match_shards(tmp_path, tiny, split):
  """TIFFs decoded in tf.data == shards of the same pixels."""
  root = str(evalutil.KAGGLE_TIF)
  folder = inputs.open_source(data_dir=root, split=split, batch_size=8,
                              progress=False)
  records, _, _ = sources.list_records(root, split)
  want = {"test": 29, "train": 16, "lzw_resaved": 2}[split]
  assert folder.num_examples == len(records) == want
  # Kaggle's originals are plain strips, sliced in the graph; the LZW
  # re-saves go through imagecodecs.
  sliced = 0 if split == "lzw_resaved" else want
  assert f"imagecodecs: {sliced} plain TIFFs sliced" in folder.description
  # The graph decode gives exactly imagecodecs' pixels.
  imgs, ids, labels = inputs.take_arrays(folder)
  ref = np.stack([decode.read_image(r.path) for r in records])
  np.testing.assert_array_equal(imgs, ref)
  assert ids == [r.id for r in records]
  if split == "train":  # Labels joined from train_labels.csv.
    assert sorted(set(labels.tolist())) == [0, 1]
  # Predictions from the folder match predictions from shards.
  writer.write_arrays(ref, ids, [r.label for r in records],
                      str(tmp_path / "sh"), split, num_shards=2)
  sharded = inputs.open_source(shards_dir=str(tmp_path / "sh"), split=split,
                               batch_size=5)
  for tta in (1, 8):
    a = _predict([tiny], inputs.open_source(
        data_dir=root, split=split, batch_size=8, progress=False), tta)
    b = _predict([tiny], sharded, tta)
    assert sorted(a.ids) == sorted(b.ids) == sorted(ids)
    pb = dict(zip(b.ids, b.probs))
    np.testing.assert_allclose(a.probs, [pb[i] for i in a.ids], atol=1e-6)
    assert np.all((a.probs >= 0) & (a.probs <= 1))


def test_imagecodecs_fallback_gives_same_pixels(tmp_path):
  imgs = evalutil.images(6)
  ids = [f"im{k}" for k in range(6)]
  evalutil.write_tiffs(tmp_path / "test", imgs, ids)
  # check=False: no layout proofs, every file decoded by imagecodecs.
  for check in (True, False):
    src = inputs.folder_source(str(tmp_path), "test", 4, check=check,
                               progress=False)
    got, got_ids, labels = inputs.take_arrays(src)
    np.testing.assert_array_equal(got, imgs)
    assert got_ids == ids and set(labels.tolist()) == {-1}


def test_tta_on_invariant_model_changes_nothing():
  model = evalutil.invariant_model()
  x = evalutil.images(16, seed=1)
  base = predict.make_predict_fn([model], 1)(x).numpy()
  for tta in (2, 4, 8):
    got = predict.make_predict_fn([model], tta)(x).numpy()
    np.testing.assert_allclose(got, base, atol=1e-6)


def test_tta_averages_the_dihedral_views(tiny):
  from hcd.models import augment  # pylint: disable=g-import-not-at-top
  x = evalutil.images(8, seed=2)
  views = np.stack([tiny(augment.d4_transform(x, k), training=False).numpy()
                    [:, 0] for k in range(8)])
  assert np.abs(views - views[0]).max() > 1e-5  # Not invariant...
  for tta in (1, 2, 4, 8):
    got = predict.make_predict_fn([tiny], tta)(x).numpy()
    np.testing.assert_allclose(got, views[:tta].mean(0), atol=1e-6)
  # ...but 8x TTA is: a rotated batch gives the same averaged prediction.
  full = predict.make_predict_fn([tiny], 8)
  np.testing.assert_allclose(full(np.rot90(x, axes=(1, 2)).copy()).numpy(),
                             full(x).numpy(), atol=1e-6)


def test_bad_tta_refused(tiny):
  with pytest.raises(ValueError, match="1, 2, 4, 8"):
    predict.make_predict_fn([tiny], 3)


def test_ensemble_is_the_mean(tiny):
  other = evalutil.invariant_model(seed=3)
  x = evalutil.images(8, seed=4)
  a = predict.make_predict_fn([tiny], 2)(x).numpy()
  b = predict.make_predict_fn([other], 2)(x).numpy()
  both = predict.make_predict_fn([tiny, other], 2)(x).numpy()
  np.testing.assert_allclose(both, (a + b) / 2, atol=1e-6)


def test_missing_run_or_model_is_a_clear_error(tmp_path, tiny_run):
  with pytest.raises(rundir.RunError, match="run directory does not exist"):
    rundir.resolve_model_paths([str(tmp_path / "nope")])
  empty = tmp_path / "empty_run"
  empty.mkdir()
  with pytest.raises(rundir.RunError, match="no .keras model"):
    rundir.model_file(str(empty))
  only_best = tmp_path / "only_best"
  only_best.mkdir()
  shutil.copy(os.path.join(tiny_run, "best.keras"), only_best)
  with pytest.raises(rundir.RunError, match="try --model=best"):
    rundir.model_file(str(only_best), "final")
  assert rundir.model_file(str(only_best), "best").endswith("best.keras")
  with pytest.raises(rundir.RunError, match="unknown model choice"):
    rundir.model_file(tiny_run, "last")
  with pytest.raises(rundir.RunError, match="model file does not exist"):
    rundir.resolve_model_paths([], [str(tmp_path / "x.keras")])
  with pytest.raises(rundir.RunError, match="no model given"):
    rundir.resolve_model_paths([], [])
  bad = tmp_path / "bad.keras"
  bad.write_bytes(b"not a zip")
  with pytest.raises(rundir.RunError, match="cannot load model"):
    predict.load_model(str(bad))


def test_model_with_wrong_input_refused(tmp_path):
  import keras  # pylint: disable=g-import-not-at-top
  inputs_ = keras.Input((96, 96, 3), dtype="float32")
  m = keras.Model(inputs_, keras.layers.Dense(1)(
      keras.layers.GlobalAveragePooling2D()(inputs_)))
  path = str(tmp_path / "f.keras")
  m.save(path)
  with pytest.raises(rundir.RunError, match="hcd models take uint8"):
    predict.load_model(path)


def test_unreadable_file_refused_or_skipped_and_listed(tmp_path, tiny_run):
  ids = [f"{k:040x}" for k in range(6)]
  evalutil.write_tiffs(tmp_path / "data" / "test", evalutil.images(6), ids)
  bad = tmp_path / "data" / "test" / "badbadbad.tif"
  bad.write_bytes(b"II*\x00garbage")
  empty = tmp_path / "data" / "test" / "empty.tif"
  empty.write_bytes(b"")
  data = str(tmp_path / "data")
  with pytest.raises(inputs.InputError) as e:
    inputs.open_source(data_dir=data, split="test", progress=False)
  msg = str(e.value)
  assert "2 of 8 images" in msg and str(bad) in msg and str(empty) in msg
  assert "--skip_unreadable" in msg

  src = inputs.open_source(data_dir=data, split="test", progress=False,
                           skip_unreadable=True)
  assert src.num_examples == 6
  assert sorted(p.id for p in src.skipped) == ["badbadbad", "empty"]
  sample = evalutil.write_sample_submission(tmp_path / "sample.csv",
                                            ids + ["badbadbad", "empty"])
  out = str(tmp_path / "sub.csv")
  summary = predict.predict_submission(
      [rundir.model_file(tiny_run)], src, out, tta=2,
      sample_ids=submission.read_sample_ids(sample), progress=False)
  got_ids, probs = submission.read_submission(out)
  assert got_ids == ids + ["badbadbad", "empty"]
  assert probs[-1] == probs[-2] == 0.5 and summary["skipped"] == 2
  with open(summary["skipped_file"]) as f:
    listed = f.read()
  assert "badbadbad" in listed and "empty file" in listed


def test_file_names_with_comma_quote_newline_round_trip(tmp_path, tiny_run):
  ids = list(evalutil.ODD_IDS)
  evalutil.write_tiffs(tmp_path / "data" / "test",
                       evalutil.images(len(ids)), ids)
  src = inputs.open_source(data_dir=str(tmp_path / "data"), split="test",
                           progress=False)
  out = str(tmp_path / "sub.csv")
  order = list(reversed(ids))
  predict.predict_submission([rundir.model_file(tiny_run)], src, out,
                             sample_ids=order, progress=False)
  got_ids, probs = submission.read_submission(out)
  assert got_ids == order and len(probs) == len(ids)


def test_predict_submission_refuses_id_mismatch(tmp_path, tiny_run):
  ids = [f"{k:040x}" for k in range(5)]
  writer.write_arrays(evalutil.images(5), ids, [-1] * 5, str(tmp_path / "sh"),
                      "test", 1)
  src = inputs.open_source(shards_dir=str(tmp_path / "sh"), split="test")
  out = tmp_path / "sub.csv"
  with pytest.raises(submission.SubmissionError, match="1 missing.*ffff"):
    predict.predict_submission([rundir.model_file(tiny_run)], src, str(out),
                               sample_ids=ids + ["ffff"], progress=False)
  assert not out.exists()


def _cli(name, *args):
  code = f"from hcd.cli.{name}_main import run; run()"
  return subprocess.run([sys.executable, "-c", code, *args],
                        capture_output=True, text=True, env=evalutil.ENV,
                        cwd=str(evalutil.REPO), timeout=240)


def test_cli_predict_tiff_folder_with_sample_submission(tmp_path, tiny_run):
  ids = [f"{k:040x}" for k in range(12)]
  evalutil.write_tiffs(tmp_path / "data" / "test", evalutil.images(12), ids)
  order = list(reversed(ids))
  sample = evalutil.write_sample_submission(tmp_path / "sample.csv", order)
  out = tmp_path / "subs" / "s.csv"
  r = _cli("predict", f"--workdir={tiny_run}",
           f"--data_dir={tmp_path / 'data'}", "--split=test", f"--out={out}",
           "--tta=4", f"--sample_submission={sample}", "--batch_size=5",
           "--noprogress")
  assert r.returncode == 0, r.stderr
  summary = submission.validate_submission(str(out), order)
  assert summary["num_rows"] == 12 and not summary["rounded"]
  assert 0 <= summary["min"] <= summary["max"] <= 1
  # A run that does not exist: exit 1 and a message naming it.
  r = _cli("predict", f"--workdir={tmp_path / 'no_such_run'}",
           f"--data_dir={tmp_path / 'data'}", f"--out={out}.2")
  assert r.returncode == 1
  assert "no_such_run: run directory does not exist" in r.stderr
  assert not os.path.exists(f"{out}.2")


def test_cli_predict_folder_with_planar_tiff(tmp_path, tiny_run):
  """A planar TIFF is predicted from its own pixels; a refused one is named."""
  folder = tmp_path / "data" / "test"
  cases = evalutil.write_edge_cases(folder)
  keep = {"plain.tif", "planar.tif", "orientation6.tif", "lzw.tif",
          "transparent_rgba.tif"}
  for name in set(cases) - keep:
    os.remove(folder / name)
  out = tmp_path / "s.csv"
  args = (f"--workdir={tiny_run}", f"--data_dir={tmp_path / 'data'}",
          f"--out={out}", "--noprogress")
  r = _cli("predict", *args)
  assert r.returncode == 1 and not out.exists()
  assert (f"{folder / 'transparent_rgba.tif'}: bad_shape: RGBA image with a "
          f"non-opaque") in r.stderr
  assert "failed after" not in r.stderr and "planar" not in r.stderr
  r = _cli("predict", *args, "--skip_unreadable")
  assert r.returncode == 0, r.stderr
  ids, probs = submission.read_submission(str(out))
  assert sorted(ids) == ["lzw", "orientation6", "plain", "planar"]
  with open(f"{out}.skipped.csv", encoding="utf-8") as f:
    assert "transparent_rgba" in f.read()
  # The CLI scored the very pixels the shard writer stores for each file.
  model = predict.load_model(rundir.model_file(tiny_run))
  want = predict.make_predict_fn([model])(np.stack(
      [decode.read_image(str(folder / f"{i}.tif")) for i in ids])).numpy()
  np.testing.assert_allclose(probs, want, atol=1e-6)


def test_cli_predict_uses_the_kaggle_sample_submission(tmp_path, tiny_run):
  ids = [f"{k:040x}" for k in range(6)]
  evalutil.write_tiffs(tmp_path / "data" / "test", evalutil.images(6), ids)
  sample = evalutil.write_sample_submission(
      tmp_path / "data" / "sample_submission.csv", ids[::-1])
  out = tmp_path / "s.csv"
  r = _cli("predict", f"--workdir={tiny_run}",
           f"--data_dir={tmp_path / 'data'}", f"--out={out}", "--noprogress")
  assert r.returncode == 0, r.stderr
  assert f"using {sample} for the submission's ids and order" in r.stderr
  submission.validate_submission(str(out), ids[::-1])


def test_cli_ensemble_pattern_takes_every_fold_run(tmp_path):
  """--ensemble='runs/fold*' averages every matching run's best.keras."""
  folds = [evalutil.make_run(str(tmp_path / "cv" / f"fold{k}"),
                             evalutil.tiny_model(seed=k)) for k in range(3)]
  ids = [f"{k:040x}" for k in range(5)]
  evalutil.write_tiffs(tmp_path / "data" / "test", evalutil.images(5), ids)
  out = tmp_path / "s.csv"
  r = _cli("predict", f"--ensemble={tmp_path / 'cv' / 'fold*'}",
           f"--data_dir={tmp_path / 'data'}", f"--out={out}", "--noprogress",
           "--sample_submission=")
  assert r.returncode == 0, r.stderr
  got_ids, probs = submission.read_submission(str(out))
  models = [predict.load_model(rundir.model_file(f)) for f in folds]
  images = np.stack([decode.read_image(str(tmp_path / "data" / "test" /
                                           f"{i}.tif")) for i in got_ids])
  want = np.mean([predict.make_predict_fn([m])(images).numpy()
                  for m in models], axis=0)
  np.testing.assert_allclose(probs, want, atol=1e-6)
  assert np.ptp([predict.make_predict_fn([m])(images).numpy()[0]
                 for m in models]) > 0  # The three folds differ.
  r = _cli("predict", f"--ensemble={tmp_path / 'nope*'}",
           f"--data_dir={tmp_path / 'data'}", f"--out={out}.2")
  assert r.returncode == 1 and "matches no run directory" in r.stderr


def test_export_loads_without_hcd_in_safe_mode(tmp_path, tiny_run):
  info = export.export_model(rundir.model_file(tiny_run), str(tmp_path / "exp"))
  want = np.asarray(info["check_outputs"])
  script = textwrap.dedent(f"""
      import importlib.abc, sys
      class NoHcd(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name == "hcd" or name.startswith("hcd."):
            raise ImportError("hcd is blocked in this test")
      sys.meta_path.insert(0, NoHcd())
      try:
        import hcd
        sys.exit("hcd was importable")
      except ImportError:
        pass
      import json
      import numpy as np, keras, tensorflow as tf
      x = np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3),
                                            dtype=np.uint8)
      m = keras.saving.load_model({info['keras']!r}, safe_mode=True)
      sm = tf.saved_model.load({info['saved_model']!r})
      print(json.dumps([m(x, training=False).numpy().ravel().tolist(),
                        sm.serve(tf.constant(x)).numpy().ravel().tolist(),
                        str(m.inputs[0].dtype)]))
  """)
  r = subprocess.run([sys.executable, "-c", script], capture_output=True,
                     text=True, env=evalutil.ENV, cwd=str(tmp_path),
                     timeout=240)
  assert r.returncode == 0, r.stderr
  import json  # pylint: disable=g-import-not-at-top
  keras_out, sm_out, dtype = json.loads(r.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(keras_out, want, atol=1e-5)
  np.testing.assert_allclose(sm_out, want, atol=1e-5)
  assert "uint8" in dtype
  assert np.all((np.array(keras_out) >= 0) & (np.array(keras_out) <= 1))


def test_bf16_model_runs_in_float32_where_bf16_is_not_native(
    tmp_path, monkeypatch):
  import keras  # pylint: disable=g-import-not-at-top
  from hcd import models  # pylint: disable=g-import-not-at-top
  from hcd.train import runtime  # pylint: disable=g-import-not-at-top
  try:
    runtime.set_mixed_precision("bf16")
    keras.utils.set_random_seed(3)
    trained = models.build_model("tiny")
  finally:
    runtime.set_mixed_precision("none")
  path = str(tmp_path / "bf16.keras")
  models.standard_model(trained).save(path)
  images = evalutil.images(16)
  reference = models.build_model("tiny")  # float32, the same weights
  reference.set_weights(trained.get_weights())
  want = reference.predict(images, verbose=0)

  monkeypatch.setattr(runtime, "_gpu_compute_capability", lambda: None)
  monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2"})
  plain = predict.load_model(path)
  assert models.compute_precision(plain) == "none"
  assert all(l.dtype_policy.name == "float32" for l in plain.layers[1:])
  np.testing.assert_allclose(plain.predict(images, verbose=0), want,
                             atol=1e-6)

  monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"amx_bf16"})
  native = predict.load_model(path)
  assert models.compute_precision(native) == "bf16"
  got = native.predict(images, verbose=0)
  assert not np.array_equal(got, want)  # bf16 rounding: it did run in bf16
  np.testing.assert_allclose(got, want, atol=0.05)


@pytest.mark.parametrize("flag,value", [("tta", "3"), ("batch_size", "0"),
                                        ("skipped_prob", "1.5"),
                                        ("skipped_prob", "nan")])
def test_cli_predict_checks_flags_before_reading_data(tmp_path, tiny_run,
                                                      flag, value):
  """A bad value is a usage error naming the flag; no data is looked at."""
  out = tmp_path / "s.csv"
  r = _cli("predict", f"--workdir={tiny_run}",
           f"--data_dir={tmp_path / 'no_data'}", f"--out={out}",
           f"--{flag}={value}", "--noprogress")
  assert r.returncode == 1, r.stderr
  # One line, not absl's usage text.
  assert r.stderr.strip().splitlines() == [
      f"hcd_predict: error: {r.stderr.split('error: ', 1)[1].strip()}"]
  assert r.stderr.split("error: ", 1)[1].startswith(f"--{flag} must be"), (
      r.stderr[-2000:])
  assert "no_data" not in r.stderr and not out.exists()


def test_predict_submission_refuses_a_bad_skipped_prob(tmp_path, tiny_run):
  """The library checks it too, before loading a model."""
  ids = [f"{k:040x}" for k in range(3)]
  writer.write_arrays(evalutil.images(3), ids, [-1] * 3, str(tmp_path / "sh"),
                      "test", 1)
  src = inputs.open_source(shards_dir=str(tmp_path / "sh"), split="test")
  with pytest.raises(ValueError, match="--skipped_prob must be a probability"):
    predict.predict_submission([str(tmp_path / "no_model.keras")], src,
                               str(tmp_path / "s.csv"), skipped_prob=-0.5,
                               progress=False)
  assert not (tmp_path / "s.csv").exists()
