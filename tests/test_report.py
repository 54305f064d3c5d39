"""Tests for hcd.eval.report (run comparison) and hcd.eval.eda (figures)."""

import csv
import json
import os

import numpy as np
import pytest

from hcd import rundir
from hcd.data import writer
from hcd.eval import eda
from hcd.eval import report

import evalutil

PNG = b"\x89PNG\r\n\x1a\n"


def _history(aucs, accs, epoch_time=100.0):
  return [dict(epoch=i + 1, loss=0.5, accuracy=acc, auc=0.9,
               val_loss=0.6, val_accuracy=acc - 0.05, val_auc=auc,
               epoch_time_s=epoch_time + i, step_time_s=0.05,
               images_per_s=5000.0, lr=1e-3)
          for i, (auc, acc) in enumerate(zip(aucs, accs))]


@pytest.fixture
def two_runs(tmp_path):
  a = evalutil.make_run(
      str(tmp_path / "model1"), name="model1", lr=1e-3, num_params=8868929,
      history=_history([0.90, 0.93, 0.92], [0.80, 0.85, 0.88]),
      metrics={"roc_auc": 0.931, "accuracy": 0.861, "best_epoch": 2,
               "time_per_epoch_s": 290.0, "time_per_step_s": 0.0412,
               "images_per_s": 6200.0, "num_params": 8868929})
  # No metrics.json: everything comes from the history.
  b = evalutil.make_run(
      str(tmp_path / "resnet"), name="resnet", lr=3e-4, num_params=1200000,
      history=_history([0.94, 0.96, 0.95], [0.90, 0.92, 0.93],
                       epoch_time=50.0))
  return a, b


def test_table_from_two_runs(tmp_path, two_runs):
  out = report.compare_runs(list(two_runs), str(tmp_path / "rep"))
  with open(out["csv"]) as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  a, b = rows["model1"], rows["resnet"]
  assert a["model"] == "model1" and int(a["parameters"]) == 8868929
  assert float(a["learning_rate"]) == 1e-3 and int(a["epochs"]) == 3
  assert float(a["time_per_epoch_s"]) == 290.0
  assert float(a["time_per_step_ms"]) == pytest.approx(41.2)
  assert float(a["val_auc"]) == 0.931 and float(a["val_accuracy"]) == 0.861
  assert int(a["best_epoch"]) == 2
  assert float(a["train_accuracy"]) == 0.88  # Final model: last epoch.
  # From the history alone: best epoch by val AUC, the last row's
  # accuracies, medians of the timings.
  assert int(b["best_epoch"]) == 2 and float(b["val_auc"]) == 0.95
  assert float(b["val_accuracy"]) == pytest.approx(0.88)
  assert float(b["train_accuracy"]) == 0.93 and int(b["epochs"]) == 3
  assert float(b["time_per_epoch_s"]) == 51.0
  assert float(b["learning_rate"]) == 3e-4
  with open(out["markdown"]) as f:
    md = f.read()
  assert "| run | model | parameters | learning rate | epochs |" in md
  assert "| model1 | model1 | 8,868,929 | 0.001 | 3 | 290.0 | 41.2 |" in md
  assert "Best validation AUC: **resnet**" in md and "+0.0190" in md
  with open(out["val_auc_png"], "rb") as f:
    assert f.read(8) == PNG


def test_names_and_missing_numbers(tmp_path, two_runs):
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "config.json").write_text(json.dumps({"model": "tiny"}))
  out = report.compare_runs([two_runs[0], str(bare)], str(tmp_path / "r"),
                            names=["first", "second"])
  with open(out["markdown"]) as f:
    md = f.read()
  assert "| second | tiny | — |" in md and "| first |" in md
  with pytest.raises(ValueError, match="distinct names"):
    report.compare_runs([two_runs[0], two_runs[0]], str(tmp_path / "r2"))
  with pytest.raises(ValueError, match="1 names for 2 runs"):
    report.compare_runs(list(two_runs), str(tmp_path / "r3"), names=["x"])


def test_bad_runs_are_clear_errors(tmp_path):
  with pytest.raises(rundir.RunError, match="does not exist"):
    report.compare_runs([str(tmp_path / "nope")], str(tmp_path / "r"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(rundir.RunError, match="not a run directory"):
    report.compare_runs([str(tmp_path / "empty")], str(tmp_path / "r"))
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "metrics.json").write_text("{oops")
  with pytest.raises(rundir.RunError, match="metrics.json: invalid JSON"):
    report.compare_runs([str(tmp_path / "broken")], str(tmp_path / "r"))
  with pytest.raises(rundir.RunError, match="no runs"):
    report.compare_runs([], str(tmp_path / "r"))


def test_eda_figures_from_folder_shards_and_scan(tmp_path):
  imgs = evalutil.images(12)
  imgs[0] = 3  # A dark patch the scanner flags.
  ids = [f"{k:040x}" for k in range(12)]
  labels = [k % 2 for k in range(12)]
  evalutil.write_tiffs(tmp_path / "data" / "train", imgs, ids)
  with open(tmp_path / "data" / "train_labels.csv", "w") as f:
    f.write("id,label\n" + "".join(f"{i},{l}\n" for i, l in zip(ids, labels)))
  scan = tmp_path / "scan.csv"
  with open(scan, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "path", "label", "ok", "dark", "bright", "flags"])
    for i, l in zip(ids, labels):
      flag = "dark" if i == ids[0] else ""
      w.writerow([i, tmp_path / "data" / "train" / f"{i}.tif", l, "true",
                  str(bool(flag)).lower(), "false", flag])
    w.writerow(["gone", tmp_path / "missing.tif", 0, "false", "false",
                "false", "unreadable"])
  out = eda.make_eda(str(tmp_path / "eda"), data_dir=str(tmp_path / "data"),
                     split="train", scan_csv=str(scan), num_samples=8)
  assert out["label_counts"] == {"0": 6, "1": 6}
  assert out["num_flagged"] == 2
  for k in ("label_frequency", "samples", "flagged"):
    with open(out[k], "rb") as f:
      assert f.read(8) == PNG
  writer.write_arrays(imgs, ids, labels, str(tmp_path / "sh"), "train", 2)
  out2 = eda.make_eda(str(tmp_path / "eda2"), shards_dir=str(tmp_path / "sh"))
  assert out2["label_counts"] == {"0": 6, "1": 6} and out2["flagged"] is None
  with pytest.raises(eda.EdaError, match="missing column"):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,path\n")
    eda.make_eda(str(tmp_path / "e3"), scan_csv=str(bad))
  imgs_, labels_, _ = eda.samples_from_shards(str(tmp_path / "sh"), "train",
                                              n=4)
  assert len(imgs_) == 4 and sorted(labels_.tolist()) == [0, 0, 1, 1]
  assert imgs_.dtype == np.uint8


def test_eda_reads_a_scan_csv_with_byte_order_mark(tmp_path):
  # Saved by a spreadsheet: the first column would read '\ufeffid'.
  scan = tmp_path / "scan.csv"
  scan.write_text("\ufeffid,path,label,flags\n"
                  f"a,{tmp_path / 'missing.tif'},1,dark\n"
                  f"b,{tmp_path / 'missing.tif'},0,\n", encoding="utf-8")
  images, labels, captions, total = eda.read_flagged(str(scan))
  assert total == 1 and labels == [1] and captions == ["a\ndark"]
  assert images.shape == (1, 96, 96, 3)  # The grey placeholder.
  scan.write_text("\ufeffid,flags\n", encoding="utf-8")
  with pytest.raises(eda.EdaError, match=r"scan.csv: missing column\(s\) "
                     r"\['path'\]"):
    eda.read_flagged(str(scan))


def test_cli_report(tmp_path, two_runs):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = "from hcd.cli.report_main import run; run()"
  r = subprocess.run(
      [sys.executable, "-c", code, f"--workdirs={','.join(two_runs)}",
       f"--out_dir={tmp_path / 'rep'}"],
      capture_output=True, text=True, env=evalutil.ENV,
      cwd=str(evalutil.REPO), timeout=120)
  assert r.returncode == 0, r.stderr
  assert "| resnet | resnet |" in r.stdout
  assert sorted(os.listdir(tmp_path / "rep")) == ["runs.csv", "runs.md",
                                                  "val_auc.png"]
  r = subprocess.run(
      [sys.executable, "-c", code, f"--workdirs={tmp_path / 'nope'}",
       f"--out_dir={tmp_path / 'rep2'}"],
      capture_output=True, text=True, env=evalutil.ENV,
      cwd=str(evalutil.REPO), timeout=120)
  assert r.returncode == 1 and "nope: run directory does not exist" in r.stderr


def _fold_run(path, fold, num_folds, ids, labels, probs, auc, **cfg):
  evalutil.make_run(str(path), metrics={"roc_auc": auc})
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config.update({"num_folds": num_folds, "fold": fold, "shards_dir": "shards",
                 "train_split": "train", "split_seed": 123, **cfg})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(path, "val_predictions.csv"), "w") as f:
    f.write("id,label,prob\n" + "".join(
        f"{i},{l},{float(p)!r}\n" for i, l, p in zip(ids, labels, probs)))
  return str(path)


def test_cross_validation_section_pools_out_of_fold_predictions(tmp_path):
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 90)
  probs = np.clip(0.5 * labels + rng.normal(0.25, 0.3, 90), 0, 1)
  # Fold 2 is calibrated differently: fine alone, worse when pooled.
  probs[60:] = probs[60:] * 0.3
  ids = [f"img{k}" for k in range(90)]
  runs_ = [_fold_run(tmp_path / f"f{k}", k, 3, ids[30 * k:30 * k + 30],
                     labels[30 * k:30 * k + 30], probs[30 * k:30 * k + 30],
                     roc_auc_score(labels[30 * k:30 * k + 30],
                                   probs[30 * k:30 * k + 30]))
           for k in range(3)]
  plain = evalutil.make_run(str(tmp_path / "plain"), metrics={"roc_auc": 0.9})
  out = report.compare_runs(runs_ + [plain], str(tmp_path / "rep"))
  (cv,) = out["cross_validation"]
  assert cv["num_folds"] == 3 and cv["missing"] == [] and (
      cv["num_examples"] == 90)
  assert cv["oof_auc"] == pytest.approx(roc_auc_score(labels, probs))
  assert cv["oof_auc"] < cv["mean_fold_auc"]
  with open(out["markdown"]) as f:
    md = f.read()
  assert "## Cross-validation" in md and f"**{cv['oof_auc']:.4f}**" in md
  with open(out["oof_csv"]) as f:
    rows = list(csv.DictReader(f))
  assert [r["id"] for r in rows] == ids and {r["fold"] for r in rows} == {
      "0", "1", "2"}
  # A missing fold is said; a fold given twice is refused.
  out = report.compare_runs(runs_[:2], str(tmp_path / "rep2"))
  assert out["cross_validation"][0]["missing"] == [2]
  with pytest.raises(rundir.RunError, match="fold 1 of 3 is also"):
    report.compare_runs(runs_ + [_fold_run(
        tmp_path / "again", 1, 3, ids[:3], labels[:3], probs[:3], 0.5)],
                        str(tmp_path / "rep3"))
  # Runs without folds give no section.
  out = report.compare_runs([plain], str(tmp_path / "rep4"))
  assert out["cross_validation"] == [] and out["oof_csv"] is None


def test_two_recipes_on_the_same_folds_are_two_experiments(tmp_path):
  """Comparing recipes on fixed folds: each recipe is its own experiment."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  labels = np.array([0, 1] * 20)
  ids = [f"img{k}" for k in range(40)]
  scores = {"resnet": np.clip(0.6 * labels + rng.normal(0.2, 0.2, 40), 0, 1),
            "efficientnet_v2_b0": rng.uniform(0, 1, 40)}
  runs_ = []
  for model, probs in scores.items():
    for k in range(2):
      part = slice(20 * k, 20 * k + 20)
      path = tmp_path / f"{model}_f{k}"
      # What hcd_train records about each run differs between the folds of
      # one recipe and must not split it.
      runs_.append(_fold_run(
          path, k, 2, ids[part], labels[part], probs[part],
          roc_auc_score(labels[part], probs[part]), model=model,
          workdir=str(path), steps_per_epoch=30 + k, val_steps=3 + k,
          data={"val": {"num_examples": 20 + k}},
          runtime={"gpus": ["GPU:0"] if k else []}, log_every_steps=10 * k))
  out = report.compare_runs(runs_, str(tmp_path / "rep"))
  resnet, effnet = out["cross_validation"]
  for cv, model in ((resnet, "resnet"), (effnet, "efficientnet_v2_b0")):
    assert cv["label"] == f"model={model}"
    assert cv["runs"] == {"0": f"{model}_f0", "1": f"{model}_f1"}
    assert cv["missing"] == [] and cv["num_examples"] == 40
    assert cv["oof_auc"] == pytest.approx(roc_auc_score(labels,
                                                        scores[model]))
  assert resnet["oof_auc"] > effnet["oof_auc"]
  with open(out["markdown"]) as f:
    md = f.read()
  assert "2 experiments, all on the same folds" in md
  assert "### model=resnet" in md and "### model=efficientnet_v2_b0" in md
  with open(out["oof_csv"]) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 80
  assert {r["experiment"] for r in rows} == {"model=resnet",
                                             "model=efficientnet_v2_b0"}
  # A second fold 0 of the same recipe is still a duplicate, named.
  again = _fold_run(tmp_path / "resnet_again", 0, 2, ids[:20], labels[:20],
                    scores["resnet"][:20], 0.9, model="resnet",
                    workdir=str(tmp_path / "resnet_again"))
  with pytest.raises(rundir.RunError,
                     match="resnet_again: fold 0 of 2 is also run resnet_f0"):
    report.compare_runs(runs_ + [again], str(tmp_path / "rep2"))


def test_experiments_on_other_folds_are_said(tmp_path):
  ids = [f"img{k}" for k in range(8)]
  labels = [0, 1] * 4
  runs_ = [_fold_run(tmp_path / f"s{seed}_f{k}", k, 2, ids[4 * k:4 * k + 4],
                     labels[4 * k:4 * k + 4], [0.2, 0.8] * 2, 1.0,
                     split_seed=seed)
           for seed in (1, 2) for k in range(2)]
  out = report.compare_runs(runs_, str(tmp_path / "rep"))
  assert [cv["label"] for cv in out["cross_validation"]] == [
      "split_seed=1", "split_seed=2"]
  with open(out["markdown"]) as f:
    assert "not all on the same folds (they differ in split_seed)" in f.read()
