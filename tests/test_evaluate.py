"""Tests for hcd.eval.evaluate: metrics.json against sklearn, plots, CLI."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from hcd import rundir
from hcd.data import writer
from hcd.eval import evaluate
from hcd.eval import inputs
from hcd.eval import predict

import evalutil

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
  """Shards where label = 1 iff the image is bright: learnable by a 1x1 net."""
  d = tmp_path_factory.mktemp("eval")
  rng = np.random.default_rng(0)
  labels = np.array([0, 1] * 20)
  imgs = evalutil.images(40, seed=5) // 2
  imgs[labels == 1] += 100
  ids = [f"{k:040x}" for k in range(40)]
  writer.write_arrays(imgs, ids, labels, str(d / "sh"), "valid", 2)
  writer.write_arrays(imgs[:4], ids[:4], [-1] * 4, str(d / "sh"), "test", 1)
  run = evalutil.make_run(str(d / "run"), evalutil.invariant_model(seed=1))
  del rng
  return str(d / "sh"), run


def _read_predictions(path):
  with open(path) as f:
    rows = list(csv.DictReader(f))
  return (np.array([int(r["label"]) for r in rows]),
          np.array([float(r["prob"]) for r in rows]))


def test_evaluate_writes_metrics_matching_sklearn(tmp_path, labelled):
  shards_dir, run = labelled
  src = inputs.open_source(shards_dir=shards_dir, split="valid", batch_size=7)
  out = str(tmp_path / "ev")
  result = evaluate.evaluate([rundir.model_file(run)], src, out, tta=2,
                             threshold=0.5, progress=False)
  with open(os.path.join(out, "metrics.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  y, p = _read_predictions(os.path.join(out, "predictions.csv"))
  assert len(y) == 40 and sorted(y.tolist()) == [0] * 20 + [1] * 20
  assert saved["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
  assert saved["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
  assert saved["accuracy"] == pytest.approx(skm.accuracy_score(y, p >= 0.5))
  assert saved["log_loss"] == pytest.approx(skm.log_loss(y, p), rel=1e-5)
  assert saved["confusion_matrix"] == skm.confusion_matrix(
      y, p >= 0.5).tolist()
  assert saved["tta"] == 2 and saved["threshold_method"] == "fixed"
  for name in ("roc.png", "confusion_matrix.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == PNG


def test_predictions_csv_quotes_odd_ids(tmp_path):
  n = len(evalutil.ODD_IDS)
  preds = predict.Predictions(list(evalutil.ODD_IDS),
                              np.linspace(0.1, 0.9, n),
                              np.arange(n, dtype=np.int64) % 2)
  path = rundir.write_predictions(str(tmp_path / "p.csv"), preds.ids,
                                  preds.labels, preds.probs)
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r["id"] for r in rows] == evalutil.ODD_IDS
  assert [int(r["label"]) for r in rows] == preds.labels.tolist()
  np.testing.assert_array_equal([float(r["prob"]) for r in rows],
                                preds.probs)
  ids, labels, probs = rundir.read_predictions(path)  # The reader agrees.
  assert ids == evalutil.ODD_IDS and labels.tolist() == preds.labels.tolist()
  np.testing.assert_array_equal(probs, preds.probs)


def test_read_predictions_takes_a_bom_and_names_a_bad_line(tmp_path):
  path = tmp_path / "p.csv"
  path.write_bytes("\ufeffid,label,prob\r\n a ,1,0.25\r\n\r\nb,0,0.5\r\n"
                   .encode("utf-8"))  # As a spreadsheet program saves it.
  ids, labels, probs = rundir.read_predictions(str(path))
  assert ids == [" a ", "b"] and labels.tolist() == [1, 0]
  np.testing.assert_array_equal(probs, [0.25, 0.5])
  path.write_text("id,label,prob\na,1,0.25\nb,0,high\n")
  with pytest.raises(rundir.RunError, match=r"p\.csv:3: not an id,label,prob "
                     r"row: label '0', prob 'high'"):
    rundir.read_predictions(str(path))
  path.write_text("id,prob\na,0.25\n")
  with pytest.raises(rundir.RunError, match=r"missing column\(s\) \['label'\]"):
    rundir.read_predictions(str(path))


def test_chosen_threshold(tmp_path, labelled):
  shards_dir, run = labelled
  src = inputs.open_source(shards_dir=shards_dir, split="valid")
  r = evaluate.evaluate([rundir.model_file(run)], src, str(tmp_path), tta=1,
                        threshold="youden", progress=False)
  assert r["threshold_method"] == "youden"
  y, p = _read_predictions(str(tmp_path / "predictions.csv"))
  assert r["accuracy_at_threshold"] == pytest.approx(
      skm.accuracy_score(y, p >= r["threshold"]))
  assert r["accuracy_at_threshold"] >= r["accuracy"]


def test_bad_threshold_and_unlabelled_data_refused(tmp_path, labelled):
  shards_dir, run = labelled
  for bad in ("1.5", "median", "nan"):
    with pytest.raises(ValueError, match="threshold"):
      evaluate.parse_threshold(bad)
  src = inputs.open_source(shards_dir=shards_dir, split="test")
  with pytest.raises(ValueError, match="4 image\\(s\\) have no label"):
    evaluate.evaluate([rundir.model_file(run)], src, str(tmp_path / "x"),
                      progress=False)
  assert not (tmp_path / "x" / "metrics.json").exists()


def test_run_validation_subset_is_the_pipelines(tmp_path):
  from hcd.data import subsets  # pylint: disable=g-import-not-at-top
  ids = [f"{k:040x}" for k in range(60)]
  labels = np.arange(60) % 2
  writer.write_arrays(evalutil.images(60), ids, labels, str(tmp_path), "train",
                      3)
  config = {"val_fraction": 0.3, "split_seed": 7, "shards_dir": str(tmp_path)}
  src = inputs.run_validation_source(config, str(tmp_path), 8)
  _, val_ids, val_labels = inputs.take_arrays(src)
  train = subsets.plan_subset(str(tmp_path), "train", "train",
                              subsets.SplitSpec(0.3, 7))
  _, train_ids, _ = inputs.take_arrays(inputs.plan_source(train, 8))
  assert src.num_examples == len(val_ids) and 5 < len(val_ids) < 35
  assert not set(val_ids) & set(train_ids)
  assert set(val_ids) | set(train_ids) == set(ids)
  assert all(val_labels == [int(i, 16) % 2 for i in val_ids])
  # Another seed, another split; no validation part, no source.
  config["split_seed"] = 8
  _, other, _ = inputs.take_arrays(
      inputs.run_validation_source(config, str(tmp_path), 8))
  assert set(other) != set(val_ids)
  assert inputs.run_validation_source({"val_fraction": 0}, str(tmp_path),
                                      8) is None


def test_cli_evaluate_run_defaults_to_its_validation_part(tmp_path, labelled):
  shards_dir, run = labelled
  with open(os.path.join(run, "config.json")) as f:
    config = json.load(f)
  config.update(shards_dir=shards_dir, train_split="valid", val_fraction=0.5)
  with open(os.path.join(run, "config.json"), "w") as f:
    json.dump(config, f)
  expected = inputs.run_validation_source(config, shards_dir, 8).num_examples
  assert 0 < expected < 40
  out = tmp_path / "out"
  code = "from hcd.cli.evaluate_main import run; run()"
  r = subprocess.run(
      [sys.executable, "-c", code, f"--workdir={run}", "--tta=8",
       f"--out_dir={out}", "--noprogress", "--threshold=youden"],
      capture_output=True, text=True, env=evalutil.ENV,
      cwd=str(evalutil.REPO), timeout=240)
  assert r.returncode == 0, r.stderr
  with open(out / "metrics.json") as f:
    m = json.load(f)
  assert m["num_examples"] == expected
  assert "val subset" in m["data"]
  assert 0.0 <= m["roc_auc"] <= 1.0 and m["tta"] == 8
  assert m["threshold_method"] == "youden"
  assert (out / "roc.png").stat().st_size > 0


def _evaluate_cli(*args):
  code = "from hcd.cli.evaluate_main import run; run()"
  return subprocess.run([sys.executable, "-c", code, *args],
                        capture_output=True, text=True, env=evalutil.ENV,
                        cwd=str(evalutil.REPO), timeout=240)


@pytest.mark.parametrize("flag,value", [("tta", "3"), ("batch_size", "0")])
def test_cli_evaluate_checks_flags_before_reading_data(tmp_path, labelled,
                                                       flag, value):
  """The same up-front checks as hcd_predict: usage errors naming the flag."""
  _, run = labelled
  r = _evaluate_cli(f"--workdir={run}", f"--data_dir={tmp_path / 'no_data'}",
                    f"--out_dir={tmp_path / 'out'}", f"--{flag}={value}",
                    "--noprogress")
  assert r.returncode == 1, r.stderr
  # One line, not absl's usage text.
  assert r.stderr.strip().splitlines() == [
      f"hcd_evaluate: error: {r.stderr.split('error: ', 1)[1].strip()}"]
  assert r.stderr.split("error: ", 1)[1].startswith(f"--{flag} must be"), (
      r.stderr[-2000:])
  assert "no_data" not in r.stderr and not (tmp_path / "out").exists()


def test_cli_evaluate_ensemble_without_workdir(tmp_path, labelled):
  """--ensemble alone needs --out_dir; with it the mean is evaluated."""
  shards_dir, run = labelled
  other = evalutil.make_run(str(tmp_path / "other"),
                            evalutil.invariant_model(seed=2))
  args = [f"--ensemble={run},{other}", f"--shards_dir={shards_dir}",
          "--split=valid", "--noprogress"]
  r = _evaluate_cli(*args)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith(
      "hcd_evaluate: error: --out_dir is required when --ensemble alone "
      "names the models"), r.stderr[-2000:]
  assert not os.path.exists(os.path.join(run, "eval"))
  assert not os.path.exists(os.path.join(other, "eval"))
  out = tmp_path / "ensemble"
  r = _evaluate_cli(*args, f"--out_dir={out}")
  assert r.returncode == 0, r.stderr
  with open(out / "metrics.json") as f:
    m = json.load(f)
  assert m["models"] == [os.path.abspath(rundir.model_file(r_))
                         for r_ in (run, other)]
  assert m["num_examples"] == 40
