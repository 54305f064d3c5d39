"""Tests of the shards: manifest, tfrecord encoding, writer (assignment,
make_split) and verify.

Workspaces are tiny TIFF folders made here with numpy + decode.encode_tiff,
ids being the SHA-1 of the pixels as Kaggle's are; shards are read back with
TensorFlow's own reader and parser.
"""

import csv
import hashlib
import json
import os
import pathlib

import imagecodecs
import numpy as np
import pytest
import tensorflow as tf

from hcd.data import decode
from hcd.data import features
from hcd.data import manifest as manifest_lib
from hcd.data import shard_plan
from hcd.data import shard_worker
from hcd.data import tfrecord
from hcd.data import verify
from hcd.data import writer

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / (
    "data")


def _sha1(img):
  return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "label"])
    w.writerows(rows)


def make_kaggle(root, n=40, n_pos=16, seed=0, split="train", labels=True):
  """Writes a Kaggle-layout split; returns {id: (pixels, label)}."""
  rng = np.random.default_rng(seed)
  d = pathlib.Path(root) / split
  d.mkdir(parents=True, exist_ok=True)
  data = {}
  for k in range(n):
    img = rng.integers(20, 230, size=features.IMAGE_SHAPE, dtype=np.uint8)
    i = _sha1(img)
    (d / f"{i}.tif").write_bytes(decode.encode_tiff(img))
    data[i] = (img, (1 if k < n_pos else 0) if labels else -1)
  if labels:
    _write_csv(pathlib.Path(root) / "train_labels.csv",
               [(i, lab) for i, (_, lab) in data.items()])
  return data


def add_image(root, img, label, split="train", name=None, raw=None):
  """Adds one file (pixels or raw bytes) and its label row; returns its id."""
  i = name or _sha1(img)
  path = pathlib.Path(root) / split / f"{i}.tif"
  path.write_bytes(raw if raw is not None else decode.encode_tiff(img))
  if label is not None:
    with open(pathlib.Path(root) / "train_labels.csv", "a", newline="") as f:
      csv.writer(f).writerow([i, label])
  return i


def read_shards(out_dir, split):
  """Reads a split back with TensorFlow: (manifest, [(ids, images, labels)])."""
  manifest = manifest_lib.load_manifest(str(out_dir), split)
  per_shard = []
  for path in manifest_lib.shard_paths(str(out_dir), manifest):
    ids, images, labels = [], [], []
    for rec in tf.data.TFRecordDataset(path).as_numpy_iterator():
      im, i, lab = features.parse_block_numpy(rec)
      ids += i
      images.append(im)
      labels.append(lab)
    per_shard.append((ids, np.concatenate(images), np.concatenate(labels)))
  return manifest, per_shard


def make(data, out, **kw):
  kw.setdefault("workers", 1)
  kw.setdefault("progress", False)
  return writer.make_split(str(data), kw.pop("split", "train"), str(out), **kw)


# --- naming, sizing, assignment ----------------------------------------------


def test_shard_names_follow_tfds():
  assert manifest_lib.shard_name("train", 3, 32) == (
      "hcd-train.tfrecord-00003-of-00032")
  assert manifest_lib.manifest_path("/s", "test") == "/s/hcd-test.manifest.json"


@pytest.mark.parametrize("n", [1, 5000, 7300, 100_000, 220_025, 1_000_000])
def test_default_num_shards_gives_100_to_200_mb(n):
  counts = {"0": n - n // 2, "1": n // 2} if n > 1 else None
  k = shard_plan.default_num_shards(n, counts)
  size = n * features.IMAGE_BYTES / k
  if k == 1:
    assert size <= shard_plan.MAX_SHARD_BYTES
  else:
    assert 100e6 <= size <= 200e6, (k, size)


def test_default_num_shards_caps_at_smaller_class():
  assert shard_plan.default_num_shards(100_000, {"0": 99_993, "1": 7}) == 7
  assert shard_plan.default_num_shards(100_000) == 14  # Unlabelled: no cap.


def test_assignment_deterministic_stratified_and_hash_ordered():
  rng = np.random.default_rng(1)
  ids = [f"{k:040x}" for k in rng.integers(0, 2**62, 1000)]
  labels = (rng.random(1000) < 0.4).astype(int)
  members = shard_plan.shard_members(ids, labels, 7)
  perm = rng.permutation(1000)
  again = shard_plan.shard_members([ids[p] for p in perm], labels[perm], 7)
  as_ids = [[ids[i] for i in m] for m in members]
  assert as_ids == [[ids[perm[i]] for i in m] for m in again]
  sizes = [len(m) for m in members]
  assert sum(sizes) == 1000 and max(sizes) - min(sizes) <= 1
  n1 = labels.sum()
  for m in members:
    # Each shard gets its share of both classes, within one image.
    assert abs(labels[m].sum() - n1 / 7) <= 1
    h = shard_plan.id_hash([ids[i] for i in m])
    assert np.all(np.diff(h.astype(np.float64)) > 0)  # Interleaved by hash.
  np.testing.assert_array_equal(
      shard_plan.assign_shards(ids, labels, 7)[np.concatenate(members)],
      np.repeat(np.arange(7), sizes))


# --- encoding -----------------------------------------------------------------


def test_encoded_block_equals_tensorflow_example():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (5,) + features.IMAGE_SHAPE, dtype=np.uint8)
  ids = ["a" * 40, "0/patch1", "é-unicode", "x", "1/" + "z" * 200]
  labels = [0, 1, -1, 1, 0]
  ours = tfrecord.encode_block_head(images.nbytes, ids, labels) + (
      images.tobytes())
  theirs = features.serialize_block(images, ids, labels)
  assert tf.train.Example.FromString(ours) == tf.train.Example.FromString(
      theirs)
  got = features.parse_block(tf.constant(ours))
  np.testing.assert_array_equal(got["image"].numpy(), images)
  assert [b.decode() for b in got["id"].numpy()] == ids
  assert got["label"].numpy().tolist() == labels
  with pytest.raises(ValueError):
    tfrecord.encode_block_head(images.nbytes - 1, ids, labels)


def test_record_writer_framing_read_by_tensorflow(tmp_path):
  path = str(tmp_path / "f.tfrecord")
  payloads = [b"", b"abc", os.urandom(70_000)]
  w = tfrecord.RecordWriter(path)
  w.write(b"")
  w.write(b"a", np.frombuffer(b"bc", np.uint8))
  w.write(payloads[2][:1000], np.frombuffer(payloads[2][1000:], np.uint8))
  size, sha = w.close()
  assert size == os.path.getsize(path) and sha == tfrecord.sha256_file(path)
  # TensorFlow checks both CRCs of every record while reading.
  assert list(tf.data.TFRecordDataset(path).as_numpy_iterator()) == payloads
  ref = str(tmp_path / "ref.tfrecord")
  with tf.io.TFRecordWriter(ref) as tw:
    for p in payloads:
      tw.write(p)
  assert tfrecord.sha256_file(ref) == sha


def test_tensorflow_fallback_writes_identical_shards(tmp_path, monkeypatch):
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (10,) + features.IMAGE_SHAPE, dtype=np.uint8)
  ids, labels = [f"i{k}" for k in range(10)], [k % 2 for k in range(10)]
  fast = writer.write_shard(str(tmp_path / "fast"), images, ids, labels, 4)
  monkeypatch.setattr(tfrecord, "google_crc32c", None)
  slow = writer.write_shard(str(tmp_path / "slow"), images, ids, labels, 4)
  assert fast["sha256"] == slow["sha256"] and fast["num_records"] == 3
  assert {f.name for f in tmp_path.iterdir()} == {"fast", "slow"}


# --- make_split ---------------------------------------------------------------


def test_round_trip_manifest_and_both_classes(tmp_path):
  data = make_kaggle(tmp_path / "data", n=40, n_pos=16)
  r = make(tmp_path / "data", tmp_path / "out", num_shards=3, block_size=5)
  assert r["status"] == "written" and r["written"] == 3
  manifest, per_shard = read_shards(tmp_path / "out", "train")
  assert [e["file"] for e in manifest["shards"]] == [
      f"hcd-train.tfrecord-0000{k}-of-00003" for k in range(3)]
  seen = {}
  for e, (ids, images, labels) in zip(manifest["shards"], per_shard):
    path = tmp_path / "out" / e["file"]
    assert e["sha256"] == tfrecord.sha256_file(path)
    assert e["bytes"] == path.stat().st_size
    assert e["num_examples"] == len(ids) == len(images)
    assert e["num_records"] == -(-len(ids) // 5)
    assert e["label_counts"] == manifest_lib.label_counts(labels)
    assert set(labels.tolist()) == {0, 1}
    for i, img, lab in zip(ids, images, labels):
      seen[i] = (img, lab)
  assert seen.keys() == data.keys()
  for i, (img, lab) in data.items():
    np.testing.assert_array_equal(seen[i][0], img)
    assert seen[i][1] == lab
  assert manifest["num_examples"] == 40
  assert manifest["label_counts"] == {"0": 24, "1": 16}
  assert manifest["schema_version"] == features.SCHEMA_VERSION
  assert manifest["excluded"] == [] and manifest["flagged"] == []
  src = manifest["source"]
  assert src["layout"] == "kaggle" and src["split"] == "train"
  assert src["data_dir"] == str(tmp_path / "data")
  assert src["labels_csv"] == str(tmp_path / "data" / "train_labels.csv")


def test_output_does_not_depend_on_worker_count(tmp_path):
  make_kaggle(tmp_path / "data", n=30, n_pos=12)
  one = make(tmp_path / "data", tmp_path / "one", num_shards=3, workers=1)
  two = make(tmp_path / "data", tmp_path / "two", num_shards=3, workers=2)
  assert [e["sha256"] for e in one["manifest"]["shards"]] == [
      e["sha256"] for e in two["manifest"]["shards"]]


def _reasons(manifest):
  return {x["id"]: x["reason"] for x in manifest["excluded"]}


def test_invalid_images_refused_then_excluded_with_reasons(tmp_path):
  root = tmp_path / "data"
  make_kaggle(root, n=20, n_pos=8)
  rng = np.random.default_rng(5)
  good = rng.integers(20, 230, features.IMAGE_SHAPE, dtype=np.uint8)
  other = rng.integers(20, 230, features.IMAGE_SHAPE, dtype=np.uint8)
  full = decode.encode_tiff(good)
  bad = {
      "truncated": add_image(root, good, 0, raw=full[:5000]),
      "empty": add_image(root, None, 1, name="e" * 40, raw=b""),
      "small": add_image(root, good[:64, :64], 0),
      "gray": add_image(root, good[..., 0], 1),
      "16bit": add_image(root, good.astype(np.uint16) * 200, 0),
      "mismatch": add_image(root, None, 1, name=_sha1(other), raw=full),
  }
  with pytest.raises(writer.ShardError, match=r"6 invalid image\(s\)"):
    make(root, tmp_path / "out")
  assert not (tmp_path / "out" / "hcd-train.manifest.json").exists()
  # Nothing finished: the out_dir this run created is gone again.
  assert not (tmp_path / "out").exists()

  r = make(root, tmp_path / "out", skip_invalid=True)
  reasons = _reasons(r["manifest"])
  assert reasons.keys() == set(bad.values())
  assert reasons[bad["truncated"]].startswith("unreadable: ")
  assert reasons[bad["empty"]] == "unreadable: empty file (0 bytes)"
  for k in ("small", "gray", "16bit"):
    assert reasons[bad[k]].startswith("bad_shape: "), reasons[bad[k]]
  assert reasons[bad["mismatch"]] == (
      f"sha1_mismatch: pixels hash to {_sha1(good)}")
  _, per_shard = read_shards(tmp_path / "out", "train")
  assert len(per_shard[0][0]) == 20 and not set(per_shard[0][0]) & set(
      bad.values())


def test_dark_bright_excluded_from_train_flagged_in_test(tmp_path):
  root = tmp_path / "data"
  make_kaggle(root, n=12, n_pos=4)
  dark = add_image(root, np.full(features.IMAGE_SHAPE, 9, np.uint8), 0)
  bright = add_image(root, np.full(features.IMAGE_SHAPE, 246, np.uint8), 1)
  r = make(root, tmp_path / "out")
  assert _reasons(r["manifest"]) == {dark: "dark: max 9 < 10",
                                     bright: "bright: min 246 > 245"}
  assert r["manifest"]["num_examples"] == 12
  kept = make(root, tmp_path / "kept", dark_bright="keep", dark_max=5)
  assert kept["manifest"]["excluded"] == []
  assert {x["id"]: x["reason"] for x in kept["manifest"]["flagged"]} == {
      bright: "bright: min 246 > 245"}
  assert kept["manifest"]["num_examples"] == 14

  make_kaggle(tmp_path / "t", n=6, split="test", labels=False)
  add_image(tmp_path / "t", np.zeros(features.IMAGE_SHAPE, np.uint8), None,
            split="test")
  test = make(tmp_path / "t", tmp_path / "out", split="test")
  m = test["manifest"]
  assert m["num_examples"] == 7 and m["label_counts"] == {"-1": 7}
  assert [x["reason"] for x in m["flagged"]] == ["dark: max 0 < 10"]


def _data_and_scan(tmp_path, flat_value, **scan_kw):
  """12 Kaggle images plus one flat one, and their scan report in scan/.

  Returns:
    (data root, the flat image's id, the scan directory).
  """
  quality = pytest.importorskip("hcd.data.quality")
  from hcd.data import scan_report  # pylint: disable=g-import-not-at-top
  from hcd.data import sources  # pylint: disable=g-import-not-at-top
  root = tmp_path / "data"
  make_kaggle(root, n=12, n_pos=4)
  flat = add_image(root, np.full(features.IMAGE_SHAPE, flat_value, np.uint8),
                   0)
  records, _, _ = sources.list_records(str(root), "train")
  df, summary = quality.scan(records, workers=1, progress=False, **scan_kw)
  scan_report.write_report(df, summary, str(tmp_path / "scan"))
  return root, flat, str(tmp_path / "scan")


def test_scan_report_exclusions(tmp_path):
  root, dark, scan = _data_and_scan(tmp_path, 3)
  r = make(root, tmp_path / "out", scan_dir=scan)
  reasons = _reasons(r["manifest"])
  assert list(reasons) == [dark] and reasons[dark].startswith("scan: ")
  assert "dark" in reasons[dark]
  assert r["manifest"]["source"]["scan_dir"] == scan
  assert r["manifest"]["num_examples"] == 12
  assert r["manifest"]["options"]["dark_max"] == 10


def test_scan_thresholds_are_the_ones_recorded_and_in_force(tmp_path):
  # The scan decides what is dark; the manifest must say by which threshold
  # (it used to record make_shards' own default of 10 beside "max 14 < 20").
  from hcd.data import scan_report  # pylint: disable=g-import-not-at-top
  root, grey, scan = _data_and_scan(tmp_path, 14, dark_max=20)
  r = make(root, tmp_path / "out", scan_dir=scan)
  assert _reasons(r["manifest"]) == {grey: "scan: dark: max 14 < 20"}
  assert r["manifest"]["options"]["dark_max"] == 20
  assert r["manifest"]["options"]["bright_min"] == 245
  with pytest.raises(writer.ShardError, match=r"--dark_max=10 disagrees.*"
                     r"dark_max=20"):
    make(root, tmp_path / "out2", scan_dir=scan, dark_max=10)
  assert not (tmp_path / "out2").exists()
  make(root, tmp_path / "out3", scan_dir=scan, dark_max=20)
  os.remove(os.path.join(scan, "scan_summary.json"))
  with pytest.raises(scan_report.ScanError, match="scan_summary.json"):
    make(root, tmp_path / "out4", scan_dir=scan)


def test_scan_report_of_other_data_is_refused(tmp_path):
  _, _, scan = _data_and_scan(tmp_path, 3)
  # A report of other data is refused rather than silently ignored.
  make_kaggle(tmp_path / "other", n=6, n_pos=3, seed=9)
  with pytest.raises(writer.ShardError, match="not in"):
    make(tmp_path / "other", tmp_path / "out2", scan_dir=scan)


def test_label_problems_refused_or_listed(tmp_path):
  root = tmp_path / "data"
  make_kaggle(root, n=10, n_pos=4)
  unlabelled = add_image(root, np.full(features.IMAGE_SHAPE, 99, np.uint8),
                         None)
  from hcd.data import sources  # pylint: disable=g-import-not-at-top
  with pytest.raises(sources.DataError, match="no label"):
    make(root, tmp_path / "out")
  r = make(root, tmp_path / "out", skip_invalid=True)
  assert _reasons(r["manifest"])[unlabelled].startswith("label: ")


def test_a_refused_run_leaves_no_state_or_empty_out_dir(tmp_path):
  root = tmp_path / "data"
  make_kaggle(root, n=10, n_pos=4)
  add_image(root, np.full(features.IMAGE_SHAPE, 99, np.uint8), None)
  from hcd.data import sources  # pylint: disable=g-import-not-at-top
  fresh = tmp_path / "new" / "shards"
  with pytest.raises(sources.DataError, match="no label"):
    make(root, fresh)
  assert not (tmp_path / "new").exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  with pytest.raises(sources.DataError, match="no label"):
    make(root, existing)
  assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


def test_files_sharing_an_id_are_listed_as_such(tmp_path):
  # Not a label problem: the manifest says what is wrong with the id.
  root = tmp_path / "data"
  data = make_kaggle(root, n=10, n_pos=4)
  shared = sorted(data)[0]
  (root / "train" / f"{shared}.png").write_bytes(
      imagecodecs.png_encode(data[shared][0]))
  r = make(root, tmp_path / "out", skip_invalid=True)
  reasons = [x["reason"] for x in r["manifest"]["excluded"]
             if x["id"] == shared]
  assert len(reasons) == 2
  assert all(x.startswith("id: 2 files share the id") for x in reasons)
  assert r["manifest"]["num_examples"] == 9


def test_class_folder_layout(tmp_path):
  rng = np.random.default_rng(7)
  want = {}
  for label, ext, enc in ((0, "png", imagecodecs.png_encode),
                          (1, "jpg", imagecodecs.jpeg8_encode)):
    d = tmp_path / "pcam" / "train" / str(label)
    d.mkdir(parents=True)
    for k in range(4):
      img = rng.integers(30, 220, features.IMAGE_SHAPE, dtype=np.uint8)
      path = d / f"patch{k}.{ext}"
      path.write_bytes(enc(img))
      # JPEG is lossy: the shard holds what the decoder gives.
      want[f"{label}/patch{k}"] = (decode.read_image(str(path)), label)
  r = make(tmp_path / "pcam", tmp_path / "out")
  assert r["manifest"]["source"]["layout"] == "folders"
  _, per_shard = read_shards(tmp_path / "out", "train")
  ids, images, labels = per_shard[0]
  assert sorted(ids) == sorted(want)
  for i, img, lab in zip(ids, images, labels):
    np.testing.assert_array_equal(img, want[i][0])
    assert lab == want[i][1]


def test_rerun_is_a_no_op_and_new_shard_count_replaces_old(tmp_path):
  make_kaggle(tmp_path / "data", n=30, n_pos=10)
  out = tmp_path / "out"
  make(tmp_path / "data", out, num_shards=3)
  before = {f: os.stat(out / f) for f in os.listdir(out)}
  r = make(tmp_path / "data", out, num_shards=3)
  assert r["status"] == "up_to_date" and r["written"] == 0
  after = {f: os.stat(out / f) for f in os.listdir(out)}
  assert {f: (s.st_ino, s.st_mtime_ns) for f, s in before.items()} == {
      f: (s.st_ino, s.st_mtime_ns) for f, s in after.items()}
  # Another shard count: the old shards are removed, not left for globs.
  r = make(tmp_path / "data", out, num_shards=2)
  assert r["written"] == 2
  assert sorted(f for f in os.listdir(out) if "tfrecord" in f) == [
      "hcd-train.tfrecord-00000-of-00002", "hcd-train.tfrecord-00001-of-00002"]
  assert verify.verify(str(out), progress=False)[0]["num_examples"] == 30


def test_resume_after_crash_keeps_finished_shards(tmp_path, monkeypatch):
  make_kaggle(tmp_path / "data", n=30, n_pos=10)
  out = tmp_path / "out"
  real = shard_worker.write_shard_task
  calls = []

  def crash_on_second(task, on_progress=None):
    calls.append(task.index)
    if len(calls) == 2:
      # Leave a partial shard behind, as a killed writer would.
      (out / (os.path.basename(task.path) + ".tmp-999999")).write_bytes(b"x")
      raise KeyboardInterrupt
    return real(task, on_progress)

  monkeypatch.setattr(shard_worker, "write_shard_task", crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    make(tmp_path / "data", out, num_shards=3)
  monkeypatch.undo()
  first = out / "hcd-train.tfrecord-00000-of-00003"
  st = first.stat()
  assert not (out / "hcd-train.manifest.json").exists()
  assert sorted(os.listdir(out))[-1].endswith(".tmp-999999")

  r = make(tmp_path / "data", out, num_shards=3)
  assert (r["written"], r["reused"]) == (2, 1)
  assert (first.stat().st_ino, first.stat().st_mtime_ns) == (
      st.st_ino, st.st_mtime_ns)
  assert not [f for f in os.listdir(out) if ".tmp-" in f]
  assert verify.verify(str(out), "train", progress=False)[0][
      "num_examples"] == 30


def test_disk_full_names_the_shard_and_leaves_no_partial_file(tmp_path,
                                                           monkeypatch):
  # A failed write() names no file: "[Errno 28] No space left on device"
  # alone does not say where. Both shard writers must name the shard.
  import errno  # pylint: disable=g-import-not-at-top
  make_kaggle(tmp_path / "data", n=12, n_pos=4)
  out = tmp_path / "out"

  def full(self, *pieces):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(tfrecord.RecordWriter, "write", full)
  with pytest.raises(OSError) as e:
    make(tmp_path / "data", out, num_shards=2)
  assert e.value.errno == errno.ENOSPC
  assert e.value.filename == str(out / "hcd-train.tfrecord-00000-of-00002")
  assert not out.exists()  # No temporary file, and nothing else, is left.
  path = tmp_path / "one.tfrecord"
  with pytest.raises(OSError) as e:
    writer.write_shard(str(path), np.zeros((1,) + features.IMAGE_SHAPE,
                                           np.uint8), ["a"], [0])
  assert e.value.filename == str(path)
  assert sorted(os.listdir(tmp_path)) == ["data"]


def test_changed_input_rewrites_affected_shards(tmp_path):
  make_kaggle(tmp_path / "data", n=20, n_pos=8)
  make(tmp_path / "data", tmp_path / "out", num_shards=2)
  add_image(tmp_path / "data", np.full(features.IMAGE_SHAPE, 77, np.uint8), 1)
  r = make(tmp_path / "data", tmp_path / "out", num_shards=2)
  assert r["status"] == "written" and r["manifest"]["num_examples"] == 21


def test_refusals(tmp_path):
  make_kaggle(tmp_path / "data", n=10, n_pos=3)
  with pytest.raises(writer.ShardError, match="class 1"):
    make(tmp_path / "data", tmp_path / "out", num_shards=4)
  with pytest.raises(writer.ShardError, match="split name"):
    make(tmp_path / "data", tmp_path / "out", split="../x")
  lock = writer._split_lock  # pylint: disable=protected-access
  with lock(str(tmp_path / "out"), "train"):
    with pytest.raises(writer.ShardError, match="another make_shards"):
      make(tmp_path / "data", tmp_path / "out")


# --- verify -------------------------------------------------------------------


@pytest.fixture(name="made")
def _made(tmp_path):
  make_kaggle(tmp_path / "data", n=24, n_pos=8)
  make(tmp_path / "data", tmp_path / "out", num_shards=2, block_size=4)
  return tmp_path / "out"


def _edit_manifest(out, fn):
  path = out / "hcd-train.manifest.json"
  m = json.loads(path.read_text())
  fn(m)
  path.write_text(json.dumps(m))


def test_verify_passes_on_good_shards(made):
  (r,) = verify.verify(str(made), progress=False)
  assert (r["split"], r["num_shards"], r["num_examples"]) == ("train", 2, 24)


def test_verify_catches_a_flipped_byte(made):
  shard = made / "hcd-train.tfrecord-00001-of-00002"
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 2] ^= 1
  shard.write_bytes(bytes(raw))
  with pytest.raises(writer.ShardError, match=f"{shard}: sha256"):
    verify.verify(str(made), "train", progress=False)
  # With a manifest that agrees with the damage, TensorFlow's CRC check
  # still names the shard.
  _edit_manifest(made, lambda m: m["shards"][1].update(
      sha256=tfrecord.sha256_file(shard)))
  with pytest.raises(writer.ShardError, match=f"{shard}: unreadable TFRecord"):
    verify.verify(str(made), "train", progress=False)


def test_verify_catches_count_mismatch(made):
  def bump(m):
    m["shards"][0]["num_examples"] += 1
    m["shards"][0]["label_counts"]["0"] += 1
    m["num_examples"] += 1
    m["label_counts"]["0"] += 1
  _edit_manifest(made, bump)
  with pytest.raises(writer.ShardError,
                     match="hcd-train.tfrecord-00000-of-00002: holds"):
    verify.verify(str(made), progress=False)
  _edit_manifest(made, lambda m: m.update(num_examples=5))
  with pytest.raises(manifest_lib.ManifestError, match="add up to"):
    verify.verify(str(made), progress=False)


def test_verify_catches_missing_truncated_and_duplicates(made, tmp_path):
  shard = made / "hcd-train.tfrecord-00000-of-00002"
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(writer.ShardError, match="truncated"):
    verify.verify(str(made), progress=False)
  shard.unlink()
  with pytest.raises(writer.ShardError, match="missing"):
    verify.verify(str(made), progress=False)
  with pytest.raises(manifest_lib.ManifestError, match="no hcd-"):
    verify.verify(str(tmp_path / "nothing"), progress=False)
  # The same images twice: duplicate ids across shards.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4,) + features.IMAGE_SHAPE, dtype=np.uint8)
  for k in (1, 2):  # Duplicates inside one block, and across shards.
    writer.write_arrays(np.concatenate([images, images]), list("abcdabcd"),
                        [0, 1] * 4, str(tmp_path / f"dup{k}"), "train", k)
    with pytest.raises(writer.ShardError, match="also in"):
      verify.verify(str(tmp_path / f"dup{k}"), progress=False)


def test_verify_catches_an_excluded_id_in_a_shard(made):
  _, per_shard = read_shards(made, "train")
  leaked = per_shard[1][0][3]
  _edit_manifest(made, lambda m: m["excluded"].append(
      {"id": leaked, "path": "x", "reason": "dark: max 1 < 10"}))
  with pytest.raises(writer.ShardError, match=f"id {leaked} is listed as "
                     f"excluded but is in shard hcd-train.tfrecord-00001"):
    verify.verify(str(made), progress=False)


# --- real data ----------------------------------------------------------------


def test_real_kaggle_train_round_trip(tmp_path):
  root = SHARED_DATA / "kaggle_tif"
  if not (root / "train").is_dir():
    pytest.skip(f"real data not found at {root} (../shared/data is absent)")
  with open(root / "train_labels.csv") as f:
    want = {row["id"]: int(row["label"]) for row in csv.DictReader(f)}
  r = make(root, tmp_path / "out")
  assert r["manifest"]["num_examples"] == 16 and r["manifest"]["excluded"] == []
  _, per_shard = read_shards(tmp_path / "out", "train")
  got = {}
  for ids, images, labels in per_shard:
    for i, img, lab in zip(ids, images, labels):
      assert _sha1(img) == i
      got[i] = int(lab)
  assert got == want
