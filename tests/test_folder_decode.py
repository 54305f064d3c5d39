"""Prediction's tf.data decode == the shard writer's decoder, file by file.

The decoder of record is imagecodecs (`hcd.data.decode.read_image`, what the
scanner and the shard writer use). Prediction and evaluation from an image
folder (`hcd.eval.inputs.folder_source`) must yield exactly its pixels for
every file it accepts, whichever graph path a file takes (a proven plain
strip sliced in the graph, or imagecodecs through tf.numpy_function), and
refuse every other file by name.
"""

import os
import sys

import numpy as np
import pytest

from hcd.data import decode
from hcd.data import sources
from hcd.eval import inputs

import evalutil


def _pixels_by_path(source):
  """{path: pixels} of what a folder source's tf.data pipeline yields."""
  imgs, ids, _ = inputs.take_arrays(source)
  return dict(zip(ids, imgs))


@pytest.mark.skipif(not evalutil.KAGGLE_TIF.is_dir(), reason=evalutil.NO_SHARED)
@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("split", ["train", "test", "lzw_resaved"])
def test_real_kaggle_files_same_pixels_as_shard_writer(split, check):
  root = str(evalutil.KAGGLE_TIF)
  records, _, _ = sources.list_records(root, split)
  got = _pixels_by_path(inputs.folder_source(root, split, 7, check=check,
                                             progress=False))
  assert sorted(got) == sorted(r.id for r in records)
  for r in records:
    np.testing.assert_array_equal(got[r.id], decode.read_image(r.path),
                                  err_msg=r.path)


def test_edge_cases_same_pixels_or_refused_by_name(tmp_path):
  cases = evalutil.write_edge_cases(tmp_path / "test")
  refused = {n for n, (_, px, _) in cases.items() if px is None}
  with pytest.raises(inputs.InputError) as e:
    inputs.folder_source(str(tmp_path), "test", 4, progress=False)
  lines = str(e.value).splitlines()
  assert lines[0].startswith(f"{len(refused)} of {len(cases)} images")
  named = {l.split(": ")[0].strip(): l for l in lines[1:]}
  for name in refused:  # One line per refused file, naming it and why.
    line = named[str(tmp_path / "test" / name)]
    assert cases[name][2] in line
  assert len(lines) == len(refused) + 2  # Header, one per file, remedy.
  assert "--skip_unreadable" in lines[-1]

  src = inputs.folder_source(str(tmp_path), "test", 4, skip_unreadable=True,
                             progress=False)
  assert {os.path.basename(p.path) for p in src.skipped} == refused
  got = _pixels_by_path(src)
  assert len(got) == len(cases) - len(refused)
  for name, (_, pixels, _) in cases.items():
    if pixels is not None:
      path = str(tmp_path / "test" / name)
      # Stored order: an Orientation tag is not applied, on any path.
      np.testing.assert_array_equal(decode.read_image(path), pixels)
      np.testing.assert_array_equal(got[name[:-4]], pixels, err_msg=name)
  # One decoder: prediction never loads tensorflow-io.
  assert "tensorflow_io" not in sys.modules


def test_plain_strips_are_sliced_in_the_graph(tmp_path, monkeypatch):
  cases = evalutil.write_edge_cases(tmp_path / "test")
  for name, (_, pixels, _) in cases.items():
    if pixels is None:
      os.remove(tmp_path / "test" / name)
  checked = inputs.check_images(inputs.folder_records(str(tmp_path), "test"),
                                progress=False)
  # Only the one plain, interleaved, uncompressed strip has a proof.
  assert [os.path.basename(p) for p in checked.layouts] == [
      "orientation3.tif", "orientation6.tif", "plain.tif"]

  def no_decoder(contents, names):
    if len(names):
      raise decode.ImageError(os.fsdecode(names[0]), "decoder disabled")
    return np.zeros((0, 96, 96, 3), np.uint8)

  monkeypatch.setattr(decode, "_numpy_decode", no_decoder)
  src = inputs.folder_source(str(tmp_path), "test", 4, progress=False)
  tf = pytest.importorskip("tensorflow")
  with pytest.raises(tf.errors.OpError, match="decoder disabled"):
    inputs.take_arrays(src)
  from hcd.data import pipeline  # pylint: disable=g-import-not-at-top
  records = [r for r in inputs.folder_records(str(tmp_path), "test")
             if r.path in checked.layouts]
  got, _, _ = inputs.take_arrays(inputs.Source(
      pipeline.folder_dataset(records, 4, checked.layouts), len(records), ""))
  np.testing.assert_array_equal(
      got, [cases[os.path.basename(r.path)][1] for r in records])


def test_file_changed_after_check_is_decoded_not_sliced(tmp_path):
  imgs = evalutil.images(3, seed=5)
  evalutil.write_tiffs(tmp_path / "test", imgs, ["a", "b", "c"])
  planar = evalutil.edge_case_tiffs(seed=5)["planar.tif"]
  # "a" starts as a plain strip padded (by its description) to the planar
  # file's size, so only the bytes outside the pixels tell them apart.
  padded = [evalutil.tiff(imgs[0], photometric="rgb", description="x" * n)
            for n in range(2000)]
  same_size = [d for d in padded if len(d) == len(planar[0])]
  assert same_size
  (tmp_path / "test" / "a.tif").write_bytes(same_size[0])
  src = inputs.folder_source(str(tmp_path), "test", 3, progress=False)
  assert "3 plain TIFFs sliced" in src.description
  # After the check: "a" becomes planar (other pixels, same size, another
  # layout: the proven offset would slice garbage), "b" holds other pixels
  # in the same layout (its proof still holds).
  (tmp_path / "test" / "a.tif").write_bytes(planar[0])
  (tmp_path / "test" / "b.tif").write_bytes(decode.encode_tiff(imgs[2]))
  got, ids, _ = inputs.take_arrays(src)
  assert ids == ["a", "b", "c"]
  np.testing.assert_array_equal(got, [planar[1], imgs[2], imgs[2]])


def test_shards_and_folder_hold_the_same_pixels(tmp_path):
  """End to end: make_split's shards == prediction's folder pixels."""
  from hcd.data import writer  # pylint: disable=g-import-not-at-top
  cases = evalutil.write_edge_cases(tmp_path / "data" / "test")
  # A second file of plain.tif's layout, other pixels: the shard writer's
  # layout cache and the graph's slice both take the fast path for it.
  again = evalutil.images(1, seed=9)[0]
  (tmp_path / "data" / "test" / "plain2.tif").write_bytes(
      decode.encode_tiff(again))
  refused = {n[:-4] for n, (_, px, _) in cases.items() if px is None}
  r = writer.make_split(str(tmp_path / "data"), "test", str(tmp_path / "sh"),
                        workers=1, skip_invalid=True, progress=False)
  assert {x["id"] for x in r["manifest"]["excluded"]} == refused
  sharded = _pixels_by_path(inputs.shards_source(str(tmp_path / "sh"),
                                                 "test", 4))
  folder = _pixels_by_path(inputs.folder_source(
      str(tmp_path / "data"), "test", 4, skip_unreadable=True,
      progress=False))
  assert sorted(sharded) == sorted(folder)
  assert len(folder) == len(cases) - len(refused) + 1
  for i, pixels in folder.items():
    np.testing.assert_array_equal(sharded[i], pixels, err_msg=i)
  np.testing.assert_array_equal(folder["plain2"], again)


def test_refusals_are_worded_like_the_scanner_and_shard_writer(tmp_path):
  cases = evalutil.write_edge_cases(tmp_path / "test")
  (tmp_path / "test" / "empty.tif").write_bytes(b"")
  (tmp_path / "test" / "garbage.tif").write_bytes(b"II*\x00garbage")
  records = inputs.folder_records(str(tmp_path), "test")
  gone = sources.Record("gone", str(tmp_path / "test" / "gone.tif"))
  checked = inputs.check_images(records + [gone], progress=False)
  reasons = {os.path.basename(p.path): p.reason for p in checked.problems}
  refused = {n for n, (_, px, _) in cases.items() if px is None}
  assert set(reasons) == refused | {"empty.tif", "garbage.tif", "gone.tif"}
  # The skipped list must read as scan.csv and the manifest do: the same
  # "<flag>: <detail>" that decode.ImageError gives the scanner and writer.
  for p in checked.problems:
    with pytest.raises(decode.ImageError) as e:
      decode.read_image(p.path)
    assert p.reason == e.value.reason, p.path
  assert reasons["empty.tif"] == "unreadable: empty file (0 bytes)"
  assert reasons["gone.tif"].startswith("unreadable: cannot read: ")
  assert reasons["gray.tif"].startswith("bad_shape: grayscale")


def test_plain_folder_lists_files_only_and_refuses_shared_ids(tmp_path):
  evalutil.write_tiffs(tmp_path, evalutil.images(2), ["b", "a"])
  (tmp_path / "c.tif").mkdir()  # A directory is not an image.
  records = inputs.folder_records(str(tmp_path), "test")
  assert [(r.id, os.path.basename(r.path)) for r in records] == [
      ("a", "a.tif"), ("b", "b.tif")]
  (tmp_path / "a.png").write_bytes(b"x")
  with pytest.raises(sources.DataError,
                     match=r"2 files share the id 'a': a\.png, a\.tif"):
    inputs.folder_records(str(tmp_path), "test")


def test_label_problems_suggest_no_flag_evaluation_lacks(tmp_path):
  evalutil.write_tiffs(tmp_path / "train", evalutil.images(2), ["a", "b"])
  (tmp_path / "train_labels.csv").write_text("id,label\na,1\nb,7\n")
  with pytest.raises(sources.DataError) as e:
    inputs.folder_records(str(tmp_path), "train")
  msg = str(e.value)
  assert "label '7' is not 0 or 1" in msg
  # hcd_evaluate / hcd_predict have no --skip_invalid (their
  # --skip_unreadable does not apply to labels).
  assert "--skip_invalid" not in msg
