"""Two local MultiWorkerMirroredStrategy workers on 127.0.0.1 (subprocesses).

Each worker runs the real hcd_train with its own TF_CONFIG; both must end
with identical weights (each logs the sha256 of its weights), and only the
chief (worker 0) may write the run directory.
"""

import json
import os
import re
import socket
import subprocess

import pytest

import test_train_cli  # pylint: disable=g-bad-import-order


def free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


@pytest.mark.slow
def test_two_workers_end_with_identical_weights(tmp_path):
  ws = test_train_cli.make_workspace(tmp_path)
  workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
  procs, logs = [], []
  for index in range(2):
    tf_config = {"cluster": {"worker": workers},
                 "task": {"type": "worker", "index": index}}
    log = open(tmp_path / f"worker{index}.log", "w+")
    logs.append(log)
    procs.append(subprocess.Popen(
        test_train_cli.hcd_train_command() + [
            "--flagfile=model1.flags", "--model=tiny", "--epochs=2",
            "--steps_per_epoch=8", "--batch_size=16", "--jit_compile=true",
            "--steps_per_loop=4", "--strategy=multiworker"],
        cwd=ws,
        env={**test_train_cli.env(), "TF_CONFIG": json.dumps(tf_config)},
        stdout=log, stderr=subprocess.STDOUT))
  try:
    for p in procs:
      p.wait(timeout=test_train_cli.TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
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
      1, 2]
  assert os.path.getsize(run_dir / "model.keras") > 0
  # The non-chief wrote its checkpoints to a temporary dir and removed it.
  assert not [d for d in os.listdir(run_dir) if d.startswith("workertemp")]
  assert "wrote runs/model1" in outputs[0]
  assert "wrote runs/model1" not in outputs[1]
