"""End-to-end tests of the real hcd_train binary (subprocesses).

A workspace is made the documented way: shards in <ws>/shards, flagfiles
copied by `python -m hcd.configs --out_dir=<ws>`, and hcd_train run from the
workspace root with `--flagfile=model1.flags` plus overriding flags.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import test_pipeline  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def hcd_train_command() -> list[str]:
  """The installed console script, else the module it points to."""
  script = shutil.which("hcd_train", path=os.path.dirname(sys.executable))
  return [script] if script else [sys.executable, "-m", "hcd.cli.train_main"]


def env() -> dict:
  e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  e.pop("TF_CONFIG", None)
  return e


def make_workspace(tmp_path, n=240):
  ws = tmp_path / "ws"
  ws.mkdir()
  test_pipeline.write(ws, n=n, block_size=32, name="shards")
  subprocess.run([sys.executable, "-m", "hcd.configs", f"--out_dir={ws}"],
                 check=True, env=env(), cwd=REPO, capture_output=True)
  return ws


def run_train(ws, *flags, timeout=TIMEOUT_S, extra_env=None):
  return subprocess.run(
      hcd_train_command() + ["--flagfile=model1.flags", *flags],
      cwd=ws, env={**env(), **(extra_env or {})}, capture_output=True,
      text=True, timeout=timeout)


# Parses flagfiles with hcd_train's own flag definitions, in a subprocess so
# that its absl FLAGS never meet another binary's in the test process.
PARSE = """
import json, sys
from hcd.cli import flags
flags.FLAGS(["hcd_train"] + sys.argv[1:])
print(flags.config_from_flags(flags.FLAGS).to_json())
"""


def parse_flags(ws, *argv):
  r = subprocess.run([sys.executable, "-c", PARSE, *argv], cwd=ws, env=env(),
                     capture_output=True, text=True, check=True)
  return json.loads(r.stdout)


def test_flagfiles_hold_the_notebook_settings(tmp_path):
  ws = make_workspace(tmp_path, n=20)
  expected_lr = {"model1": 1e-3, "model2": 1e-3, "model3": 1e-4}
  for name, lr in expected_lr.items():
    text = (ws / f"{name}.flags").read_text()
    assert text.startswith("#") and "--flagfile=base.flags" in text
    config = parse_flags(ws, f"--flagfile={name}.flags", "--epochs=3")
    assert (config["model"], config["learning_rate"]) == (name, lr)
    assert (config["adam_beta1"], config["adam_beta2"]) == (0.9, 0.999)
    assert (config["batch_size"], config["flips"], config["rot90"]) == (
        32, True, False)
    assert (config["balance"], config["val_fraction"], config["seed"]) == (
        "undersample", 0.2, 123)
    assert config["epochs"] == 3  # The command line overrides the file.
    assert (config["shards_dir"], config["workdir"]) == ("shards",
                                                         f"runs/{name}")
  resnet = parse_flags(ws, "--flagfile=resnet.flags")
  assert resnet["model"] == "resnet" and resnet["lr_schedule"] == "cosine"
  assert resnet["rot90"] and resnet["flips"] and resnet["batch_size"] == 64
  # A second copy keeps a user's edits unless told to overwrite.
  (ws / "model1.flags").write_text("# mine\n")
  subprocess.run([sys.executable, "-m", "hcd.configs", f"--out_dir={ws}"],
                 check=True, env=env(), cwd=REPO, capture_output=True)
  assert (ws / "model1.flags").read_text() == "# mine\n"
  subprocess.run([sys.executable, "-m", "hcd.configs", f"--out_dir={ws}",
                  "--overwrite"], check=True, env=env(), cwd=REPO,
                 capture_output=True)
  assert (ws / "model1.flags").read_text().startswith("# Notebook model1")


def test_bad_flags_are_clear_errors(tmp_path):
  ws = make_workspace(tmp_path, n=40)
  r = run_train(ws, "--model=nope")
  assert r.returncode != 0
  assert "nope" in r.stderr and "model1" in r.stderr and "tiny" in r.stderr
  r = run_train(ws, "--shards_dir=missing", "--model=tiny")
  assert r.returncode == 2
  assert os.path.join("missing", "hcd-train.manifest.json") in r.stderr
  r = subprocess.run(hcd_train_command() + ["--flagfile=nope.flags"], cwd=ws,
                     env=env(), capture_output=True, text=True,
                     timeout=TIMEOUT_S)
  assert r.returncode != 0 and "nope.flags" in r.stderr


@pytest.mark.slow
def test_mirrored_xla_run_killed_and_resumed(tmp_path):
  """2 replicas on a CPU split in 2, XLA on, kill -9 mid-training, resume."""
  ws = make_workspace(tmp_path)
  flags = ["--model=tiny", "--epochs=4", "--steps_per_epoch=40",
           "--batch_size=16", "--cpu_logical_devices=2",
           "--strategy=mirrored", "--jit_compile=true", "--steps_per_loop=10",
           "--checkpoint_every_steps=20", "--log_every_steps=20"]
  run_dir = ws / "runs" / "model1"
  log = open(tmp_path / "first.log", "w")
  proc = subprocess.Popen(hcd_train_command() + ["--flagfile=model1.flags"] +
                          flags, cwd=ws, env=env(), stdout=log,
                          stderr=subprocess.STDOUT)
  deadline = time.time() + TIMEOUT_S
  while not (run_dir / "checkpoints" / "checkpoint").exists():
    assert proc.poll() is None, open(tmp_path / "first.log").read()[-3000:]
    assert time.time() < deadline, "no checkpoint in time"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  log.close()
  assert proc.returncode == -signal.SIGKILL
  assert not (run_dir / "metrics.json").exists(), (
      "the run finished before it was killed; make it longer")

  r = run_train(ws, *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stderr
  history = json.load(open(run_dir / "history.json"))
  assert [h["epoch"] for h in history] == [1, 2, 3, 4]
  config = json.load(open(run_dir / "config.json"))
  assert config["runtime"]["num_replicas"] == 2
  assert config["runtime"]["jit_compile"] is True
  assert config["runtime"]["strategy"] == "MirroredStrategy"
  metrics = json.load(open(run_dir / "metrics.json"))
  assert metrics["epochs"] == 4 and 0 <= metrics["roc_auc"] <= 1
  for name in ("model.keras", "best.keras", "val_predictions.csv",
               "history.csv", "plots/metrics.png",
               "plots/confusion_matrix.png"):
    assert (run_dir / name).stat().st_size > 0, name
  # The resolved flags: base.flags' settings, the overrides, the defaults.
  text = (run_dir / "flags.txt").read_text()
  for line in ("--model=tiny", "--epochs=4", "--balance=undersample",
               "--flips", "--val_fraction=0.2", "--seed=123",
               "--cpu_logical_devices=2", "--workdir=runs/model1",
               "--learning_rate=0.001"):
    assert line + "\n" in text, line
  leftovers = [f for _, _, fs in os.walk(run_dir) for f in fs
               if ".tmp-" in f]
  assert not leftovers


def test_recipe_flagfiles_train_through_the_cli(tmp_path):
  """pcam.flags and kaggle_gpu.flags, as shipped, run the real CLI."""
  ws = make_workspace(tmp_path, n=160)
  test_pipeline.write(ws, n=64, seed=1, split="valid", num_shards=1,
                      block_size=32, name="shards")
  pcam = parse_flags(ws, "--flagfile=pcam.flags")
  assert (pcam["model"], pcam["val_split"], pcam["rot90"],
          pcam["workdir"]) == ("resnet", "valid", True, "runs/pcam")
  assert pcam["model_overrides"] == {"widths": [48, 96, 192],
                                     "blocks_per_stage": 2}
  assert (pcam["mixed_precision"], pcam["epochs"], pcam["ema_decay"],
          pcam["weight_decay"]) == ("auto", 22, 0.9995, 0.05)
  cpu = parse_flags(ws, "--flagfile=pcam_cpu.flags")
  assert cpu["model_overrides"] == {"widths": [48, 96, 192],
                                    "blocks_per_stage": 2, "size": 64}
  assert (cpu["batch_size"], cpu["learning_rate"], cpu["time_budget_min"],
          cpu["epochs"], cpu["workdir"]) == (128, 0.004, 29, 22,
                                             "runs/pcam_cpu")
  # The jitter stays on: valid alone preferred it off, other slides on.
  assert (cpu["stain_jitter"], pcam["stain_jitter"]) == (0.05, 0.05)
  # In-model stain normalisation: measured on pcam_cpu.flags only so far;
  # Macenko won the mean of clean and re-stained valid AUC.
  assert (cpu["stain_norm"], pcam["stain_norm"]) == ("macenko", "none")
  # The two-resolution ensemble: pcam.flags and a narrow pcam_cpu.flags,
  # their budgets summing to the 28 minutes of epochs of a 30-minute run.
  ens96 = parse_flags(ws, "--flagfile=pcam_ens96.flags")
  ens64 = parse_flags(ws, "--flagfile=pcam_ens64.flags")
  for member, base, sub in ((ens96, pcam, "96px"), (ens64, cpu, "64px")):
    differ = {k for k in base if member[k] != base[k]}
    # The ensemble was measured without the stain normalisation.
    assert differ <= {"time_budget_min", "workdir", "model_overrides",
                      "stain_norm"}, differ
    assert member["stain_norm"] == "none"
    assert member["workdir"] == f"runs/pcam_ens/{sub}"
  assert ens96["model_overrides"] == pcam["model_overrides"]
  assert ens64["model_overrides"] == {**cpu["model_overrides"],
                                      "widths": [32, 64, 128]}
  assert ens96["time_budget_min"] + ens64["time_budget_min"] == 28
  gpu = parse_flags(ws, "--flagfile=kaggle_gpu.flags")
  assert (gpu["mixed_precision"], gpu["num_folds"], gpu["fold"],
          gpu["balance"]) == ("auto", 5, 0, "none")
  assert (gpu["model"], gpu["batch_size"]) == ("resnet", 512)
  # One flagfile for every fold, each fold in its own run directory.
  assert gpu["workdir"] == "runs/kaggle_gpu_fold0"
  assert parse_flags(ws, "--flagfile=kaggle_gpu.flags", "--fold=3")[
      "workdir"] == "runs/kaggle_gpu_fold3"
  quick = ["--epochs=1", "--steps_per_epoch=2", "--val_steps=1",
           "--notensorboard"]
  for flagfile, extra in (("pcam.flags", []),
                          ("kaggle_gpu.flags", ["--batch_size=32"])):
    r = subprocess.run(hcd_train_command() + [f"--flagfile={flagfile}",
                                              *quick, *extra],
                       cwd=ws, env=env(), capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
  metrics = json.load(open(ws / "runs" / "pcam" / "metrics.json"))
  assert metrics["model"] == "resnet" and metrics["num_examples"] == 64
  assert metrics["num_params"] == 1_594_081  # the deep-narrow overrides
  config = json.load(open(ws / "runs" / "kaggle_gpu_fold0" / "config.json"))
  from hcd.train import runtime  # pylint: disable=g-import-not-at-top
  # auto, resolved for this machine (the resolution is tested in
  # test_runtime): what ran is saved, not the word "auto".
  assert config["mixed_precision"] == "auto"
  assert config["runtime"]["mixed_precision"] == (
      runtime.resolve_mixed_precision("auto"))
  assert config["data"]["val"]["role"] == "val"


def test_out_of_range_flags_fail_before_data_or_workdir(tmp_path):
  """Checked by TrainConfig.validate, before any shard is read or written."""
  ws = make_workspace(tmp_path, n=80)
  # Real shards: the old code read them, then spun forever at step 0.
  r = run_train(ws, "--model=tiny", "--epochs=1", "--steps_per_epoch=2",
                "--batch_size=16", "--checkpoint_every_steps=-5",
                "--workdir=runs/negative", timeout=120)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "hcd_train: error: checkpoint_every_steps must be >= 0" in r.stderr
  assert not (ws / "runs" / "negative").exists()
  # Missing shards: the jitter range is checked before they are looked at
  # (the Augmenter, built after the data plan, was the only check).
  r = run_train(ws, "--model=tiny", "--stain_jitter=1.5",
                f"--shards_dir={tmp_path / 'none'}", "--workdir=runs/jitter",
                timeout=120)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "hcd_train: error: stain_jitter must be in [0, 1), got 1.5" in (
      r.stderr)
  assert "manifest" not in r.stderr
  assert not (ws / "runs" / "jitter").exists()
