"""Multi-worker launching: TF_CONFIG for MultiWorkerMirroredStrategy.

A multi-host run is one process per host, each started with the same command
and a `TF_CONFIG` that lists every worker and names its own index. Worker 0
is the chief: it alone writes the run's artifacts (hcd.train.loop checks
`strategy.cluster_resolver.task_id`); the others write to scratch space.

`run_local` starts N workers on 127.0.0.1 (free ports) on one machine: the
way to test a multi-host setup on a laptop, and how the test suite runs it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence


class LaunchError(RuntimeError):
  """A worker failed or the cluster description is invalid."""


def tf_config(workers: Sequence[str], index: int) -> str:
  """Returns the TF_CONFIG JSON for worker `index` of `workers`.

  Args:
    workers: "host:port" addresses, the same list (same order) on every host.
    index: this worker's position in `workers`; 0 is the chief.

  Raises:
    LaunchError: empty list, malformed address or index out of range.
  """
  if not workers:
    raise LaunchError("no workers given (expected host:port,host:port,...)")
  for w in workers:
    host, sep, port = w.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise LaunchError(f"worker address {w!r} is not host:port")
  if not 0 <= index < len(workers):
    raise LaunchError(f"worker index {index} is outside 0..{len(workers) - 1}")
  return json.dumps({"cluster": {"worker": list(workers)},
                     "task": {"type": "worker", "index": index}})


def free_ports(n: int) -> list[int]:
  """Returns n distinct free TCP ports on 127.0.0.1."""
  socks = []
  try:
    for _ in range(n):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      socks.append(s)
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def run_local(num_workers: int, command: Sequence[str],
              log_dir: str | None = None, timeout_s: float | None = None,
              env: dict | None = None) -> list[int]:
  """Runs `command` as `num_workers` MultiWorkerMirroredStrategy workers.

  All workers listen on 127.0.0.1. When any worker fails, the others are
  terminated, since a collective op would otherwise wait for it forever.

  Over 60 lines only for documenting each argument.

  Args:
    num_workers: number of worker processes.
    command: the command each worker runs (e.g. ["hcd_train", ...]).
    log_dir: if given, worker i logs to `<log_dir>/worker-<i>.log`; else the
      workers inherit stdout/stderr.
    timeout_s: kill all workers after this many seconds.
    env: base environment (default: os.environ).

  Returns:
    The exit codes, one per worker.

  Raises:
    LaunchError: a worker exited non-zero or the timeout passed.
  """
  if num_workers < 1:
    raise LaunchError(f"num_workers must be >= 1, got {num_workers}")
  workers = [f"127.0.0.1:{p}" for p in free_ports(num_workers)]
  procs, logs = [], []
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  try:
    for i in range(num_workers):
      wenv = dict(os.environ if env is None else env)
      wenv["TF_CONFIG"] = tf_config(workers, i)
      out = None
      if log_dir:
        out = open(os.path.join(log_dir, f"worker-{i}.log"), "wb")
        logs.append(out)
      procs.append(subprocess.Popen(list(command), env=wenv, stdout=out,
                                    stderr=subprocess.STDOUT if out else None,
                                    start_new_session=True))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    codes: list[int | None] = [None] * num_workers
    while any(c is None for c in codes):
      for i, p in enumerate(procs):
        if codes[i] is None:
          codes[i] = p.poll()
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        raise LaunchError(f"worker {failed[0]} exited with code "
                          f"{codes[failed[0]]}" +
                          (f"; see {log_dir}/worker-{failed[0]}.log"
                           if log_dir else ""))
      if deadline is not None and time.monotonic() > deadline:
        raise LaunchError(f"workers still running after {timeout_s:.0f} s")
      time.sleep(0.2)
    return [int(c) for c in codes]
  finally:
    for p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
          pass
    for p in procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
    for f in logs:
      f.close()


def exec_worker(workers: Sequence[str], index: int,
                command: Sequence[str]) -> None:
  """Replaces this process with `command`, TF_CONFIG set for one host."""
  os.environ["TF_CONFIG"] = tf_config(workers, index)
  sys.stdout.flush()
  os.execvp(command[0], list(command))
