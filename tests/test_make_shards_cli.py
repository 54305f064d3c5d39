"""tools/make_shards as a user runs it: exit codes, messages, kill -9, resume.

These run the real command-line tools in subprocesses on small synthetic
workspaces (tools/make_synthetic, tools/scan_quality).
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
KILL_ENV = "HCD_MAKE_SHARDS_KILL_AFTER_BLOCKS"


def run(tool, *args, env=None, check=None):
  e = dict(os.environ)
  for k in (KILL_ENV, "TF_CPP_MIN_LOG_LEVEL"):  # The tool's own default.
    e.pop(k, None)
  e.update(env or {})
  quiet = [] if tool == "eda" else ["--noprogress"]  # eda draws no bar.
  p = subprocess.run([sys.executable, str(TOOLS / tool), *args, *quiet],
                     capture_output=True, text=True, cwd=ROOT, env=e,
                     timeout=120, check=False)
  if check is not None:
    assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
  return p


@pytest.fixture(name="workspace", scope="module")
def _workspace(tmp_path_factory):
  data = tmp_path_factory.mktemp("ws") / "data"
  run("make_synthetic", f"--out_dir={data}", "--num_train=240",
      "--num_test=40", "--seed=3", "--workers=1", check=0)
  return data


def _error_line(p):
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1, p.stderr
  assert lines[0].startswith("make_shards: error: "), lines[0]
  return lines[0]


def test_missing_data_dir_is_a_one_line_refusal(tmp_path):
  p = run("make_shards", f"--data_dir={tmp_path / 'nope'}", "--split=train",
          f"--out_dir={tmp_path / 'out'}", check=1)
  assert str(tmp_path / "nope") in _error_line(p)
  p = run("make_shards", f"--out_dir={tmp_path}", check=1)
  assert "--data_dir" in _error_line(p)
  p = run("make_shards", "--verify", f"--out_dir={tmp_path}", check=1)
  assert "no hcd-<split>.manifest.json" in _error_line(p)
  bad = tmp_path / "bad"
  (bad / "train").mkdir(parents=True)
  (bad / "train_labels.csv").write_text("name,class\nabc,1\n")
  p = run("make_shards", f"--data_dir={bad}", "--split=train",
          f"--out_dir={tmp_path / 'out'}", check=1)
  line = _error_line(p)
  assert str(bad / "train_labels.csv") in line and "missing column" in line


def test_scan_shard_rerun_verify(workspace, tmp_path):
  scans, out = tmp_path / "scan", tmp_path / "shards"
  run("scan_quality", f"--data_dir={workspace}", "--split=train",
      f"--out_dir={scans}", "--workers=2", check=0)
  args = [f"--data_dir={workspace}", "--split=train", f"--out_dir={out}",
          "--workers=2", f"--scan_dir={scans}", "--num_shards=2"]
  p = run("make_shards", *args, check=0)
  assert "wrote 2 of 2 shards" in p.stdout
  manifest = json.loads((out / "hcd-train.manifest.json").read_text())
  # The synthetic workspace plants one dark and one bright patch.
  reasons = sorted(x["reason"].split(":")[1].strip()
                   for x in manifest["excluded"])
  assert reasons == ["bright", "dark"], manifest["excluded"]
  assert manifest["num_examples"] == 238
  p = run("make_shards", *args, check=0)
  assert "is up to date" in p.stdout
  run("make_shards", f"--data_dir={workspace}", "--split=test",
      f"--out_dir={out}", "--workers=1", check=0)
  p = run("make_shards", "--verify", f"--out_dir={out}", check=0)
  assert p.stdout.count("verified") == 2

  shard = out / "hcd-test.tfrecord-00000-of-00001"
  raw = bytearray(shard.read_bytes())
  raw[100] ^= 0xFF
  shard.write_bytes(bytes(raw))
  p = run("make_shards", "--verify", f"--out_dir={out}", "--split=test",
          check=1)
  assert str(shard) in _error_line(p) and "sha256" in p.stderr


def test_kill_9_then_resume(workspace, tmp_path):
  out = tmp_path / "shards"
  args = [f"--data_dir={workspace}", "--split=train", f"--out_dir={out}",
          "--workers=2", "--num_shards=3", "--block_size=32"]
  # 80 images a shard = 3 blocks: a worker SIGKILLs the main process and
  # itself inside its second shard; the other worker dies with the parent.
  p = run("make_shards", *args, env={KILL_ENV: "4"})
  assert p.returncode == -9, (p.returncode, p.stderr)
  assert not (out / "hcd-train.manifest.json").exists()
  state = out / ".hcd-train.state"
  done = {}
  for name in os.listdir(out):
    if ".tmp-" in name or name.startswith("."):
      continue
    # A shard counts as done once its sidecar is written, after the rename;
    # one killed between the two has no sidecar and is simply redone.
    sidecar = state / f"{name}.json"
    if sidecar.exists():
      side = json.loads(sidecar.read_text())
      assert side["entry"]["bytes"] == (out / name).stat().st_size
      done[name] = (out / name).stat()
  assert 1 <= len(done) <= 2, os.listdir(out)
  assert [n for n in os.listdir(out) if ".tmp-" in n]
  # Make the kill land between a rename and its sidecar for one shard, so
  # that the "redone" path runs every time, not only when timing hits it.
  orphan = sorted(done)[0]
  (state / f"{orphan}.json").unlink()
  orphan_inode = done.pop(orphan).st_ino

  p = run("make_shards", *args, check=0)
  # With one shard done before the kill, removing its sidecar leaves none
  # reused, and the summary then has no "already done" clause.
  reused = f", {len(done)} already done" if done else ":"
  assert f"wrote {3 - len(done)} of 3 shards{reused}" in p.stdout, p.stdout
  for name, st in done.items():
    now = (out / name).stat()
    assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
  assert (out / orphan).stat().st_ino != orphan_inode  # Rewritten.
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
  p = run("make_shards", "--verify", f"--out_dir={out}", check=0)
  assert "238 images" in p.stdout


def test_writer_never_imports_tensorflow(workspace, tmp_path):
  code = (
      "import sys\n"
      "from hcd.data import writer\n"
      f"r = writer.make_split({str(workspace)!r}, 'train', "
      f"{str(tmp_path)!r}, workers=2, num_shards=2, progress=False)\n"
      "assert r['written'] == 2, r\n"
      "assert 'tensorflow' not in sys.modules\n")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                     capture_output=True, text=True, timeout=120, check=False)
  assert p.returncode == 0, p.stderr


def test_copy_under_a_wrong_id_never_drops_the_genuine_file(tmp_path):
  """A genuine file and a copy under a wrong id that sorts first.

  The genuine file (id = SHA-1 of its pixels) must be kept and the copy
  excluded as sha1_mismatch and duplicate, whichever sorts first; flagging
  the genuine file as the duplicate dropped both.
  """
  from hcd.data import synthetic  # pylint: disable=g-import-not-at-top
  data = tmp_path / "data"
  (data / "train").mkdir(parents=True)
  images, labels = synthetic.make_images(8, seed=5)
  rows = []
  for img, label in zip(images, labels):
    i = synthetic.image_id(img)
    (data / "train" / f"{i}.tif").write_bytes(synthetic.tiff_bytes(img))
    rows.append(f"{i},{label}")
  genuine = synthetic.image_id(images[3])
  copy = "0" * 40  # Not the SHA-1 of any pixels, and sorts before any id.
  assert copy < genuine
  (data / "train" / f"{copy}.tif").write_bytes(
      synthetic.tiff_bytes(images[3]))
  rows.append(f"{copy},{labels[3]}")
  (data / "train_labels.csv").write_text("id,label\n" + "\n".join(rows) + "\n")

  scans, out = tmp_path / "scan", tmp_path / "shards"
  run("scan_quality", f"--data_dir={data}", "--split=train",
      f"--out_dir={scans}", "--workers=1", check=0)
  with open(scans / "scan.csv", newline="") as f:
    report = {r["id"]: r for r in csv.DictReader(f)}
  assert report[genuine]["flags"] == "", report[genuine]
  assert report[copy]["flags"] == "sha1_mismatch;duplicate"
  assert report[copy]["duplicate_of"] == genuine

  run("make_shards", f"--data_dir={data}", "--split=train",
      f"--out_dir={out}", "--workers=1", f"--scan_dir={scans}", check=0)
  manifest = json.loads((out / "hcd-train.manifest.json").read_text())
  assert manifest["excluded"] == [{
      "id": copy, "path": str(data / "train" / f"{copy}.tif"),
      "reason": (f"scan: sha1_mismatch: pixels hash to {genuine}; "
                 f"duplicate: same pixels as {genuine}")}]
  assert manifest["num_examples"] == 8  # The genuine file is in a shard.
  p = run("make_shards", "--verify", f"--out_dir={out}", check=0)
  assert "8 images" in p.stdout


@pytest.mark.parametrize("tool", ["make_synthetic", "scan_quality",
                                  "make_shards", "eda"])
def test_every_tool_fails_in_one_line_with_the_remedy(workspace, tmp_path,
                                                      tool):
  # Every tool's main is wrapped in hcd.cli.errors.guard, as the hcd_*
  # binaries' are: a failure is one `<tool>: error:` line naming the path
  # and the remedy, never a traceback, whatever the exception's type.
  blocker = tmp_path / "a_file"
  blocker.write_text("in the way\n")
  out = blocker / "out"
  args = {"make_synthetic": [f"--out_dir={out}", "--num_train=8",
                             "--num_test=0", "--workers=1"],
          "scan_quality": [f"--data_dir={workspace}", "--split=test",
                           f"--out_dir={out}", "--workers=1"],
          "make_shards": [f"--data_dir={workspace}", "--split=test",
                          f"--out_dir={out}", "--workers=1"],
          "eda": [f"--data_dir={workspace}", "--split=test",
                  f"--out_dir={out}", "--num_samples=4"]}[tool]
  p = run(tool, *args, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
  assert p.returncode == 1, (p.stdout, p.stderr)
  assert "Traceback" not in p.stderr, p.stderr
  lines = [l for l in p.stderr.splitlines() if l.startswith(f"{tool}: ")]
  assert len(lines) == 1, p.stderr
  assert lines[0].startswith(f"{tool}: error: {blocker}"), lines[0]
  assert lines[0].endswith("not a directory; a file is in the way; remove "
                           "it or choose another path"), lines[0]
  # HCD_TRACEBACK=1 shows the traceback after all, for a bug report.
  p = run(tool, *args, env={"HCD_TRACEBACK": "1"})
  assert p.returncode != 0 and "Traceback" in p.stderr
