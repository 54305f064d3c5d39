"""hcd.progress: one pacing policy for every progress bar hcd draws."""

import subprocess
import sys

import pytest

from hcd import progress

# 2,000 updates over about a second, as a fast scan makes them.
_DRAW = """
import time
from hcd import progress
with progress.bar(total=2000, desc="scan", unit="img") as bar:
  for _ in range(2000):
    time.sleep(0.0005)
    bar.update(1)
"""


def test_a_log_gets_the_final_state_not_every_update():
  # stderr is a pipe here, as under docker logs or nohup: tqdm's default
  # (an update every 0.1 s) would append ~10 redraws; the bar writes its
  # first and final states only.
  r = subprocess.run([sys.executable, "-c", _DRAW], capture_output=True,
                     text=True, check=True, timeout=60)
  redraws = [l for l in r.stderr.replace("\r", "\n").splitlines()
             if l.startswith("scan")]
  assert 1 <= len(redraws) <= 2, redraws
  assert "2000/2000" in redraws[-1]


@pytest.mark.parametrize("tty,interval", [(True, 0.5),
                                          (False, progress.LOG_INTERVAL_S)])
def test_pace_follows_whether_stderr_is_a_terminal(monkeypatch, tty,
                                                   interval):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
  with progress.bar(total=3) as bar:
    assert bar.mininterval == interval and bool(bar.dynamic_ncols) == tty
  with progress.bar(range(3), mininterval=2.0) as bar:
    assert bar.mininterval == 2.0 and list(bar) == [0, 1, 2]
  with progress.bar(range(3), enabled=False) as bar:  # --noprogress
    assert bar.disable and list(bar) == [0, 1, 2]
