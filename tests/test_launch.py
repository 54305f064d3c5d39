"""Tests of the multi-worker launcher's cluster description and process handling."""

import json
import sys

import pytest

from hcd.train import launch


def test_tf_config_lists_all_workers_and_own_index():
  cfg = json.loads(launch.tf_config(["a:1", "b:2"], 1))
  assert cfg == {"cluster": {"worker": ["a:1", "b:2"]},
                 "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize("workers,index,msg", [
    ([], 0, "no workers"),
    (["hostonly"], 0, "not host:port"),
    (["a:x"], 0, "not host:port"),
    (["a:1", "b:2"], 2, "outside 0..1"),
])
def test_tf_config_rejects_bad_input(workers, index, msg):
  with pytest.raises(launch.LaunchError, match=msg):
    launch.tf_config(workers, index)


def test_free_ports_are_distinct():
  ports = launch.free_ports(4)
  assert len(set(ports)) == 4


def test_run_local_gives_each_worker_its_index(tmp_path):
  code = ("import json, os; c = json.loads(os.environ['TF_CONFIG']); "
          "print(c['task']['index'], len(c['cluster']['worker']))")
  codes = launch.run_local(3, [sys.executable, "-c", code], str(tmp_path))
  assert codes == [0, 0, 0]
  for i in range(3):
    assert (tmp_path / f"worker-{i}.log").read_text().strip() == f"{i} 3"


def test_run_local_stops_everyone_when_one_worker_fails(tmp_path):
  # Worker 1 fails at once; worker 0 would otherwise sleep for a minute.
  code = ("import json, os, sys, time; i = json.loads(os.environ['TF_CONFIG'])"
          "['task']['index']; sys.exit(3) if i == 1 else time.sleep(60)")
  with pytest.raises(launch.LaunchError, match="worker 1 exited with code 3"):
    launch.run_local(2, [sys.executable, "-c", code], str(tmp_path), timeout_s=30)


def test_run_local_timeout(tmp_path):
  with pytest.raises(launch.LaunchError, match="still running"):
    launch.run_local(1, [sys.executable, "-c", "import time; time.sleep(60)"],
                     str(tmp_path), timeout_s=1)
