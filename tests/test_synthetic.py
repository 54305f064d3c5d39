"""Tests for hcd.data.synthetic: determinism, layout, plants, label signal."""

import csv
import hashlib
import io
import json
import os

import numpy as np
import pytest
import tifffile
from sklearn.metrics import roc_auc_score

from hcd.data import decode
from hcd.data import synthetic


def _read_csv(path):
  with open(path, newline="") as f:
    return [(r["id"], int(r["label"])) for r in csv.DictReader(f)]


def test_make_images_is_deterministic_and_seeded():
  a, la = synthetic.make_images(40, seed=3)
  b, lb = synthetic.make_images(40, seed=3)
  c, _ = synthetic.make_images(40, seed=4)
  assert a.dtype == np.uint8 and a.shape == (40, 96, 96, 3)
  assert la.shape == (40,) and set(np.unique(la)) <= {0, 1}
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert not np.array_equal(a, c)
  # Every image is distinct, so ids (SHA-1 of pixels) are unique.
  assert len({synthetic.image_id(x) for x in a}) == 40


def test_image_does_not_depend_on_split_size_except_plants():
  small, ls = synthetic.make_images(15, seed=1)  # Below PLANT_MIN_IMAGES.
  big, lb = synthetic.make_images(600, seed=1)
  np.testing.assert_array_equal(small, big[:15])
  np.testing.assert_array_equal(ls, lb[:15])
  test_split, _ = synthetic.make_images(15, seed=1, split="test")
  assert not np.array_equal(small, test_split)


def test_planted_dark_and_bright_patches():
  n = 2000
  images, labels = synthetic.make_images(n, seed=0)
  dark, bright = synthetic.planted_indices(n, seed=0)
  assert len(dark) == len(bright) == synthetic.num_planted(n) >= 1
  mx = images.reshape(n, -1).max(axis=1)
  mn = images.reshape(n, -1).min(axis=1)
  np.testing.assert_array_equal(np.nonzero(mx < 10)[0], dark)
  np.testing.assert_array_equal(np.nonzero(mn > 245)[0], bright)
  assert (labels[dark] == 0).all() and (labels[bright] == 0).all()
  assert synthetic.num_planted(220025) == 11
  assert synthetic.num_planted(10) == 0


def _darkness(images, mask):
  """Fraction of dark (nucleus-like) pixels inside a 96x96 mask."""
  dark = images.astype(np.int32).sum(axis=-1) < 330
  return (dark & mask).sum(axis=(1, 2)) / mask.sum()


def test_label_signal_lives_only_in_the_centre():
  images, labels = synthetic.make_images(1500, seed=7)
  assert 0.35 < labels.mean() < 0.46  # About 40% positive.
  centre = np.zeros((96, 96), bool)
  centre[32:64, 32:64] = True
  ring = np.zeros((96, 96), bool)
  ring[:24, :] = ring[72:, :] = ring[:, :24] = ring[:, 72:] = True
  centre_auc = roc_auc_score(labels, _darkness(images, centre))
  ring_score = _darkness(images, ring)
  ring_auc = roc_auc_score(labels, ring_score)
  assert centre_auc > 0.97, centre_auc
  assert 0.42 < ring_auc < 0.58, ring_auc
  # Distractors: many negatives carry tumour-like texture in the ring.
  tumour_like = ring_score > np.quantile(ring_score[labels == 1], 0.5)
  assert tumour_like[labels == 0].mean() > 0.3


def test_tiff_bytes_match_tifffile_and_decode():
  img, _ = synthetic.make_images(2, seed=0)
  data = synthetic.tiff_bytes(img[1])
  assert data[:4] == b"II*\x00"
  np.testing.assert_array_equal(tifffile.imread(io.BytesIO(data)), img[1])
  np.testing.assert_array_equal(decode.decode_bytes(data), img[1])
  assert data == decode.encode_tiff(img[1])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ws") / "data")
  info = synthetic.write_workspace(out, 600, 60, seed=5, workers=2,
                                   progress=False)
  return out, info


def test_workspace_layout_and_ids(workspace):
  out, info = workspace
  assert info["complete"] and info["num_train"] == 600
  train = _read_csv(os.path.join(out, "train_labels.csv"))
  test = _read_csv(os.path.join(out, "sample_submission.csv"))
  answers = _read_csv(os.path.join(out, synthetic.TEST_LABELS_CSV))
  assert len(train) == 600 and len(test) == 60
  assert sorted(os.listdir(os.path.join(out, "train"))) == sorted(
      i + ".tif" for i, _ in train)
  assert sorted(os.listdir(os.path.join(out, "test"))) == sorted(
      i + ".tif" for i, _ in test)
  assert all(l == 0 for _, l in test)
  assert [i for i, _ in answers] == [i for i, _ in test]
  # CSV order is generation order, which is not sorted (as Kaggle's).
  images, labels = synthetic.make_images(600, seed=5)
  assert [i for i, _ in train] == [synthetic.image_id(x) for x in images]
  assert [l for _, l in train] == labels.tolist()
  assert [i for i, _ in train] != sorted(i for i, _ in train)
  for split, rows in (("train", train[:20]), ("test", test[:5])):
    for rid, _ in rows:
      pixels = decode.read_image(os.path.join(out, split, rid + ".tif"))
      assert hashlib.sha1(pixels.tobytes()).hexdigest() == rid


def test_worker_count_does_not_change_output(workspace, tmp_path):
  out, _ = workspace
  one = str(tmp_path / "one")
  synthetic.write_workspace(one, 600, 60, seed=5, workers=1, progress=False)
  for name in ("train_labels.csv", "sample_submission.csv"):
    with open(os.path.join(out, name)) as a, open(os.path.join(one, name)) as b:
      assert a.read() == b.read()
  some = sorted(os.listdir(os.path.join(one, "train")))[:10]
  for name in some:
    with open(os.path.join(out, "train", name), "rb") as a, open(
        os.path.join(one, "train", name), "rb") as b:
      assert a.read() == b.read()


def test_rerun_is_a_no_op_and_other_params_refused(workspace):
  out, _ = workspace
  path = os.path.join(out, "train_labels.csv")
  before = os.stat(path).st_mtime_ns
  info = synthetic.write_workspace(out, 600, 60, seed=5, progress=False)
  assert info["already_complete"]
  assert os.stat(path).st_mtime_ns == before
  with pytest.raises(synthetic.WorkspaceError, match="already holds"):
    synthetic.write_workspace(out, 600, 60, seed=6, progress=False)


def test_refuses_a_foreign_directory(tmp_path):
  (tmp_path / "train_labels.csv").write_text("id,label\n")
  with pytest.raises(synthetic.WorkspaceError, match="not a synthetic"):
    synthetic.write_workspace(str(tmp_path), 10, 0, progress=False)


def test_interrupted_run_is_completed_and_stale_files_removed(tmp_path):
  out = str(tmp_path / "ws")
  os.makedirs(os.path.join(out, "train"))
  marker = {"num_train": 30, "num_test": 0, "seed": 9,
            "generator": "hcd.data.synthetic v1", "complete": False}
  with open(os.path.join(out, synthetic.MARKER), "w") as f:
    json.dump(marker, f)
  stale = os.path.join(out, "train", "f" * 40 + ".tif")
  with open(stale, "wb") as f:
    f.write(b"half-written")
  info = synthetic.write_workspace(out, 20, 5, seed=1, workers=1,
                                   progress=False)
  assert info["complete"] and not info.get("already_complete")
  assert not os.path.exists(stale)
  assert len(os.listdir(os.path.join(out, "train"))) == 20
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
