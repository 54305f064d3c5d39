"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1, started by tools/launch_workers.

The real launcher starts the real hcd_train twice, each with its own
TF_CONFIG; both must end with identical weights (each logs the sha256 of its
weights), only the chief (worker 0) may write the run directory, and a time
budget must give both workers the same number of epochs.
"""

import json
import os
import re
import subprocess
import sys

import pytest

import test_train_cli  # pylint: disable=g-bad-import-order

LAUNCHER = os.path.join(test_train_cli.REPO, "tools", "launch_workers")


@pytest.mark.slow
def test_two_workers_end_with_identical_weights(tmp_path):
  ws = test_train_cli.make_workspace(tmp_path)
  log_dir = tmp_path / "logs"
  proc = subprocess.run(
      [sys.executable, LAUNCHER, "--local=2", f"--worker_logs={log_dir}",
       f"--timeout_s={test_train_cli.TIMEOUT_S}", "--"] +
      test_train_cli.hcd_train_command() + [
          "--flagfile=model1.flags", "--model=tiny", "--epochs=4",
          "--steps_per_epoch=8", "--batch_size=16", "--jit_compile=true",
          "--steps_per_loop=4", "--strategy=multiworker",
          # A budget that leaves one epoch after epoch 2: both workers
          # must decide the same length from their averaged timings.
          "--lr_schedule=cosine", "--warmup_epochs=1",
          "--time_budget_min=0.000001"],
      cwd=ws, env=test_train_cli.env(), capture_output=True, text=True,
      timeout=test_train_cli.TIMEOUT_S + 30, check=False)
  outputs = [(log_dir / f"worker-{i}.log").read_text() for i in range(2)]
  assert proc.returncode == 0, proc.stderr + outputs[0][-2000:] + outputs[1][-2000:]
  digests = [re.findall(r"final weights sha256 ([0-9a-f]{64})", out)
             for out in outputs]
  assert len(digests[0]) == 1 and digests[0] == digests[1]

  run_dir = ws / "runs" / "model1"
  config = json.load(open(run_dir / "config.json"))
  assert config["runtime"]["num_replicas"] == 2
  assert config["runtime"]["task"] == "worker:0"
  assert json.load(open(run_dir / "metrics.json"))[
      "weights_sha256"] == digests[0][0]
  assert [h["epoch"] for h in json.load(open(run_dir / "history.json"))] == [
      1, 2, 3]
  assert all("training 3 epochs in all (--epochs=4)" in out
             for out in outputs)
  assert os.path.getsize(run_dir / "model.keras") > 0
  # The non-chief wrote its checkpoints to a temporary dir and removed it.
  assert not [d for d in os.listdir(run_dir) if d.startswith("workertemp")]
  assert "wrote runs/model1" in outputs[0]
  assert "wrote runs/model1" not in outputs[1]
