"""Every failure of the four binaries is one line naming the file and remedy.

Each test runs the real binary in a subprocess (as test_train_cli.py does)
and checks the exit status, that stderr holds exactly one
`<prog>: error: ...` line naming the file at fault, and no traceback.

Read-only places and full disks are real ones: the binary runs in a private
mount namespace (`unshare -rm`) where the output directory is a fresh tmpfs,
mounted read-only or filled to the last byte, so the kernel itself refuses
the writes. Where namespaces are not allowed those tests skip.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import test_train_cli  # pylint: disable=g-bad-import-order

TIMEOUT_S = test_train_cli.TIMEOUT_S
TRAIN_FLAGS = ("--model=tiny", "--epochs=2", "--steps_per_epoch=3",
               "--batch_size=16", "--log_every_steps=3")
# Runs `"$@"` with $1 a fresh tmpfs (ro: read-only; full: no byte free),
# then lists what is left in it into $3 (the tmpfs vanishes with the
# namespace).
MOUNT_SCRIPT = r"""
set -e
dir="$1"; mode="$2"; listing="$3"; shift 3
if [ "$mode" = ro ]; then
  mount -t tmpfs -o ro,size=1m tmpfs "$dir"
else
  mount -t tmpfs -o size=64k tmpfs "$dir"
  dd if=/dev/zero of="$dir/.fill" bs=4096 2>/dev/null || true
fi
set +e
"$@"
rc=$?
find "$dir" > "$listing"
exit $rc
"""


def _namespaces_work() -> bool:
  if not shutil.which("unshare"):
    return False
  r = subprocess.run(["unshare", "-rm", "sh", "-c",
                      "mount -t tmpfs tmpfs /mnt"], capture_output=True,
                     check=False)
  return r.returncode == 0


NAMESPACES = _namespaces_work()
needs_mounts = pytest.mark.skipif(
    not NAMESPACES, reason="no private mount namespaces here (unshare -rm "
    "fails), so no read-only or full file system to write to")


def command(binary: str) -> list[str]:
  """The installed console script, else the module it points to."""
  script = shutil.which(binary, path=os.path.dirname(sys.executable))
  if script:
    return [script]
  module = binary.replace("hcd_", "hcd.cli.") + "_main"
  return [sys.executable, "-m", module]


def run(binary, *flags, cwd, mount=None):
  """Runs a binary; mount=(dir, "ro"|"full", listing) wraps it as above."""
  argv = command(binary) + list(flags)
  if mount:
    argv = ["unshare", "-rm", "sh", "-c", MOUNT_SCRIPT, "sh", *map(str, mount)
            ] + argv
  return subprocess.run(argv, cwd=cwd, env=test_train_cli.env(),
                        capture_output=True, text=True, timeout=TIMEOUT_S)


def error_line(r, binary: str) -> str:
  """The one error line of a failed run (asserting there is exactly one)."""
  assert r.returncode != 0, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith(
      f"{binary}: error:")]
  assert len(lines) == 1, r.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
  """A workspace with shards, flagfiles and one finished 2-epoch run."""
  ws = test_train_cli.make_workspace(tmp_path_factory.mktemp("errors"))
  r = run("hcd_train", "--flagfile=model1.flags", *TRAIN_FLAGS,
          "--workdir=runs/base", cwd=ws)
  assert r.returncode == 0, r.stderr[-3000:]
  return ws


def _copy_run(ws, name):
  dst = ws / "runs" / name
  shutil.copytree(ws / "runs" / "base", dst)
  return dst


def _ckpt_data(run_dir, number):
  ckpts = run_dir / "checkpoints"
  (data,) = [p for p in ckpts.iterdir()
             if p.name.startswith(f"ckpt-{number}.data-")]
  return data


# --- shards ------------------------------------------------------------------


def _damage(shards_dir, fault):
  shard = sorted(p for p in shards_dir.iterdir() if ".tfrecord-" in p.name)[1]
  data = bytearray(shard.read_bytes())
  if fault == "corrupt":  # Same size: only the records' CRCs can tell.
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    shard.write_bytes(bytes(data))
  elif fault == "truncated":
    shard.write_bytes(bytes(data[:len(data) // 2]))
  else:
    shard.unlink()
  return shard


@pytest.mark.parametrize("fault", ["corrupt", "truncated", "missing"])
@pytest.mark.parametrize("binary", ["hcd_train", "hcd_evaluate"])
def test_bad_shard_is_named_with_the_verify_command(ws, tmp_path, binary,
                                                    fault):
  shards_dir = tmp_path / "shards"
  shutil.copytree(ws / "shards", shards_dir)
  shard = _damage(shards_dir, fault)
  if binary == "hcd_train":
    r = run(binary, "--flagfile=model1.flags", *TRAIN_FLAGS,
            f"--shards_dir={shards_dir}", f"--workdir={tmp_path / 'run'}",
            cwd=ws)
  else:  # Reads the split directly: the corrupt record turns up mid-predict.
    r = run(binary, f"--workdir={ws / 'runs' / 'base'}",
            f"--shards_dir={shards_dir}", "--split=train", "--noprogress",
            f"--out_dir={tmp_path / 'eval'}", cwd=ws)
  line = error_line(r, binary)
  assert str(shard) in line
  assert f"tools/make_shards --verify --out_dir={shards_dir}" in line
  assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


# --- checkpoints -------------------------------------------------------------


def test_truncated_checkpoint_falls_back_to_the_previous_one(ws):
  run_dir = _copy_run(ws, "fallback")
  data = _ckpt_data(run_dir, 6)  # 2 epochs of 3 steps: ckpt-3 and ckpt-6.
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  r = run("hcd_train", "--flagfile=model1.flags", *TRAIN_FLAGS,
          "--epochs=3", "--workdir=runs/fallback", cwd=ws)
  assert r.returncode == 0, r.stderr[-3000:]
  notes = [l for l in r.stderr.splitlines() if "fell back" in l]
  assert len(notes) == 1, r.stderr[-3000:]
  assert "ckpt-6" in notes[0] and "ckpt-3" in notes[0]
  assert "resumed from" in r.stderr and "ckpt-3: 1 epoch(s)" in r.stderr
  history = json.loads((run_dir / "history.json").read_text())
  assert [h["epoch"] for h in history] == [1, 2, 3]


def test_no_intact_checkpoint_is_one_error_with_the_remedy(ws):
  run_dir = _copy_run(ws, "broken")
  for number in (3, 6):
    data = _ckpt_data(run_dir, number)
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  r = run("hcd_train", "--flagfile=model1.flags", *TRAIN_FLAGS,
          "--epochs=3", "--workdir=runs/broken", cwd=ws)
  assert r.returncode == 2
  line = error_line(r, "hcd_train")
  assert os.path.join("runs", "broken", "checkpoints") in line
  assert "--workdir" in line and "delete" in line


# --- outputs -----------------------------------------------------------------


def test_predict_out_that_is_a_directory(ws, tmp_path):
  r = run("hcd_predict", f"--workdir={ws / 'runs' / 'base'}",
          f"--shards_dir={ws / 'shards'}", "--split=train", "--noprogress",
          f"--out={tmp_path}", cwd=ws)
  line = error_line(r, "hcd_predict")
  assert f"{tmp_path}: is a directory" in line and "file name" in line


def test_predict_out_that_is_not_a_regular_file_is_left_alone(ws, tmp_path):
  # Renaming a finished submission over it would replace it (as root, even
  # a device such as /dev/full); a fifo stands in for one here.
  fifo = tmp_path / "pipe"
  os.mkfifo(fifo)
  r = run("hcd_predict", f"--workdir={ws / 'runs' / 'base'}",
          f"--shards_dir={ws / 'shards'}", "--split=train", "--noprogress",
          f"--out={fifo}", cwd=ws)
  line = error_line(r, "hcd_predict")
  assert f"{fifo}: exists and is not a regular file" in line
  assert fifo.is_fifo()


def _output_case(ws, place, case):
  """(binary, flags, the path the error must name) for one output case."""
  base = str(ws / "runs" / "base")
  if case == "predict":
    out = place / "sub.csv"
    return "hcd_predict", [f"--workdir={base}", "--noprogress",
                           f"--shards_dir={ws / 'shards'}", "--split=train",
                           f"--out={out}"], str(out)
  if case == "evaluate":
    out = place / "eval"
    return "hcd_evaluate", [f"--workdir={base}", "--noprogress",
                            f"--out_dir={out}"], str(out)
  if case == "report":
    out = place / "reports"
    return "hcd_report", [f"--workdirs={base}", f"--out_dir={out}"], str(out)
  workdir = place / "runs" / "new"
  return "hcd_train", ["--flagfile=model1.flags", *TRAIN_FLAGS,
                       f"--workdir={workdir}"], str(workdir)


@needs_mounts
@pytest.mark.parametrize("case", ["predict", "evaluate", "report", "train"])
def test_read_only_output_fails_before_reading_data(ws, tmp_path, case):
  place = tmp_path / "ro"
  place.mkdir()
  binary, flags, path = _output_case(ws, place, case)
  listing = tmp_path / "listing.txt"
  if case == "train":  # Refused before the (missing) shards are looked at.
    flags.append(f"--shards_dir={tmp_path / 'no_shards'}")
  r = run(binary, *flags, cwd=ws, mount=(place, "ro", listing))
  line = error_line(r, binary)
  assert f"{path}: read-only file system" in line, line
  assert "write elsewhere" in line


@needs_mounts
@pytest.mark.parametrize("case", ["predict", "evaluate", "train"])
def test_full_disk_is_one_line_and_leaves_no_temporary_file(ws, tmp_path,
                                                            case):
  place = tmp_path / "full"
  place.mkdir()
  binary, flags, path = _output_case(ws, place, case)
  listing = tmp_path / "listing.txt"
  r = run(binary, *flags, cwd=ws, mount=(place, "full", listing))
  line = error_line(r, binary)
  assert "no space left on device" in line and "free some space" in line
  assert line.startswith(f"{binary}: error: {path}"), line
  left = listing.read_text().split()
  assert not [p for p in left if ".tmp" in os.path.basename(p)], left
  if case == "train":  # The run directory it created is removed again.
    assert path not in left, left


# --- configuration -----------------------------------------------------------


def test_unknown_model_override_lists_the_accepted_ones(ws, tmp_path):
  r = run("hcd_train", "--flagfile=model1.flags", "--model=resnet",
          "--model_override=depth=50", f"--shards_dir={tmp_path / 'none'}",
          f"--workdir={tmp_path / 'run'}", cwd=ws)
  assert r.returncode == 2
  line = error_line(r, "hcd_train")
  assert "does not accept depth" in line and "accepted overrides:" in line
  assert "dropout" in line  # One of resnet's own.
  assert "manifest" not in line  # No data was looked at.
  assert not (tmp_path / "run").exists()


def test_failed_validation_leaves_no_run_directory(ws):
  runs_dir = ws / "runs"
  r = run("hcd_train", "--flagfile=model1.flags", *TRAIN_FLAGS,
          "--shards_dir=missing", "--workdir=runs/no_manifest", cwd=ws)
  assert "hcd-train.manifest.json" in error_line(r, "hcd_train")
  r = run("hcd_train", "--flagfile=model1.flags", *TRAIN_FLAGS,
          "--steps_per_epoch=0", "--batch_size=100000",
          "--workdir=runs/huge_batch", cwd=ws)
  assert "fewer than one batch" in error_line(r, "hcd_train")
  assert not (runs_dir / "no_manifest").exists()
  assert not (runs_dir / "huge_batch").exists()


def test_rerun_removes_what_a_killed_run_left(ws):
  run_dir = _copy_run(ws, "killed")
  dead = subprocess.Popen(["true"])
  dead.wait()
  stale = [run_dir / f"history.json.tmp-{dead.pid}",
           run_dir / "plots" / f"metrics.png.tmp-{dead.pid}",
           run_dir / f"best.keras.tmp-{dead.pid}.keras",
           run_dir / "checkpoints" / "ckpt-99_temp" /
           "part-00000-of-00001.data-00000-of-00001",
           run_dir / "checkpoints" / ("checkpoint.tmp" + "0123abcd" * 4),
           run_dir / "workertemp_worker_1" / "ckpt-1.index"]
  # A live writer's file (this test's pid) is not a leftover: kept.
  live = run_dir / "eval" / f"metrics.json.tmp-{os.getpid()}"
  for p in stale + [live]:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("half-written")
  r = run("hcd_train", "--flagfile=model1.flags", *TRAIN_FLAGS,
          "--workdir=runs/killed", cwd=ws)
  assert r.returncode == 0, r.stderr[-3000:]
  assert [p for p in stale if p.exists()] == []
  assert not (run_dir / "checkpoints" / "ckpt-99_temp").exists()
  assert not (run_dir / "workertemp_worker_1").exists()
  assert live.exists()
  assert "removed 6 temporary file(s)" in r.stderr


@pytest.mark.parametrize("argv,words", [
    (["hcd_predict", "--tta=3", "--workdir=r", "--data_dir=d", "--out=s.csv"],
     "--tta must be one of"),
    (["hcd_evaluate", "--tta=3", "--workdir=r", "--data_dir=d"],
     "--tta must be one of"),
    (["hcd_predict", "--tta=abc"], "flag --tta=abc"),
    (["hcd_train", "--flagfile=missing.flags"], "missing.flags"),
    (["hcd_train", "--mixed_precision=bogus"], "--mixed_precision=bogus"),
    (["hcd_report", "--no_such_flag"], "no_such_flag"),
    (["scan_quality", "--workers=x"], "flag --workers=x"),
])
def test_a_flag_error_is_one_line(tmp_path, argv, words):
  """Not absl's page of usage text: one line naming the flag."""
  binary, flags = argv[0], argv[1:]
  if binary.startswith("hcd_"):
    r = run(binary, *flags, cwd=tmp_path)
  else:
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "tools", binary)
    r = subprocess.run([sys.executable, tool, *flags], cwd=tmp_path,
                       env=test_train_cli.env(), capture_output=True,
                       text=True, timeout=TIMEOUT_S)
  assert r.returncode == 1, r.stderr[-3000:]
  assert r.stderr.strip().splitlines() == [error_line(r, binary)]
  assert words in r.stderr and "--help lists the flags" in r.stderr
  assert not os.listdir(tmp_path)  # Nothing was written.
  if binary.startswith("hcd_"):  # The full usage is still there on demand.
    helpfull = run(binary, "--helpfull", cwd=tmp_path)
    assert len(helpfull.stdout.splitlines()) > 20, helpfull.stderr[-2000:]
