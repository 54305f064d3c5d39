"""Tests for hcd.data.sources: layouts and labels-CSV validation."""

import os
from pathlib import Path

import pytest

from hcd.data import sources

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _ids(n):
  return [f"{k:040x}" for k in range(1, n + 1)]


def _kaggle(tmp_path, ids, csv_text=None, test_ids=()):
  """A Kaggle-layout directory with placeholder files (listing never reads)."""
  for split, names in (("train", ids), ("test", test_ids)):
    (tmp_path / split).mkdir(exist_ok=True)
    for i in names:
      (tmp_path / split / f"{i}.tif").write_bytes(b"x")
  if csv_text is None:
    csv_text = "id,label\n" + "".join(f"{i},{k % 2}\n"
                                      for k, i in enumerate(ids))
  (tmp_path / "train_labels.csv").write_text(csv_text)
  return str(tmp_path)


def test_kaggle_layout_joins_labels_by_id(tmp_path):
  ids = _ids(5)
  # CSV rows in another order than the files: the join is by id.
  rows = [(ids[3], 1), (ids[0], 0), (ids[4], 1), (ids[2], 0), (ids[1], 1)]
  d = _kaggle(tmp_path, ids, "id,label\n" + "".join(f"{i},{l}\n"
                                                    for i, l in rows),
              test_ids=_ids(7)[5:])
  records, problems, layout = sources.list_records(d, "train")
  assert layout == sources.LAYOUT_KAGGLE and problems == []
  assert [r.id for r in records] == ids
  assert {r.id: r.label for r in records} == dict(rows)
  assert all(r.path == os.path.join(d, "train", r.id + ".tif")
             for r in records)
  test, problems, _ = sources.list_records(d, "test")
  assert [r.id for r in test] == _ids(7)[5:] and not problems
  assert all(r.label == -1 for r in test)


def test_missing_columns(tmp_path):
  d = _kaggle(tmp_path, _ids(2), "image,target\nabc,1\n")
  with pytest.raises(sources.DataError) as e:
    sources.list_records(d, "train")
  msg = str(e.value)
  assert "train_labels.csv" in msg and "['id', 'label']" in msg


def test_header_with_byte_order_mark(tmp_path):
  ids = _ids(2)
  d = _kaggle(tmp_path, ids, f"\ufeffid,label\n{ids[0]},1\n{ids[1]},0\n")
  records, _, _ = sources.list_records(d, "train")
  assert [r.label for r in records] == [1, 0]


def test_undecodable_csv_is_a_data_error(tmp_path):
  d = _kaggle(tmp_path, _ids(1))
  (tmp_path / "train_labels.csv").write_bytes(b"id,label\n\xff\xfe\x00,1\n")
  with pytest.raises(sources.DataError, match="malformed labels CSV"):
    sources.list_records(d, "train")


def _problem_case(tmp_path, kind):
  ids = _ids(4)
  lines = [f"{i},{k % 2}" for k, i in enumerate(ids)]
  files = list(ids)
  if kind == "duplicate":
    lines.append(f"{ids[1]},0")  # Line 6: conflicts with line 3.
    bad, where = ids[1], "train_labels.csv:6"
  elif kind == "label":
    lines[2] = f"{ids[2]},2"  # Line 4.
    bad, where = ids[2], "train_labels.csv:4"
  elif kind == "no_file":
    files = ids[:3]
    bad, where = ids[3], "train_labels.csv"
  else:  # no_label
    lines = lines[:3]
    bad, where = ids[3], os.path.join("train", ids[3] + ".tif")
  d = _kaggle(tmp_path, files, "id,label\n" + "\n".join(lines) + "\n")
  return d, bad, where


@pytest.mark.parametrize("kind,reason", [
    ("duplicate", "duplicate id (first seen on row 3)"),
    ("label", "label '2' is not 0 or 1"),
    ("no_file", "id has no image file"),
    ("no_label", "file has no label"),
])
def test_label_problems_raise_or_are_skipped(tmp_path, kind, reason):
  d, bad, where = _problem_case(tmp_path, kind)
  with pytest.raises(sources.DataError) as e:
    sources.list_records(d, "train")
  msg = str(e.value)
  assert bad in msg and reason in msg and where in msg, msg
  assert "--skip_invalid" in msg

  records, problems, _ = sources.list_records(d, "train", skip_invalid=True)
  assert [p.id for p in problems] == [bad]
  assert problems[0].reason.startswith(reason)
  assert where in problems[0].path
  assert bad not in {r.id for r in records}
  assert len(records) == 3


def test_blank_lines_do_not_shift_reported_lines(tmp_path):
  ids = _ids(2)
  d = _kaggle(tmp_path, ids, f"id,label\n\n{ids[0]},1\n{ids[1]},x\n")
  _, problems, _ = sources.list_records(d, "train", skip_invalid=True)
  assert problems[0].path.endswith("train_labels.csv:4")


def test_many_problems_are_summarised(tmp_path):
  ids = _ids(30)
  d = _kaggle(tmp_path, ids, "id,label\n" + "".join(f"{i},7\n" for i in ids))
  with pytest.raises(sources.DataError) as e:
    sources.list_records(d, "train")
  assert "30 label problem(s)" in str(e.value)
  assert "... and 10 more" in str(e.value)


def test_ids_with_control_characters_are_quoted_in_errors(tmp_path):
  """An id holding a carriage return or newline shows as one quoted item."""
  ids = _ids(3)
  odd = ["ab\rcd", "ef\ngh"]
  d = _kaggle(tmp_path, ids, "id,label\n" + "".join(
      f"{i},0\n" for i in ids) + "".join(f'"{i}",1\n' for i in odd))
  with pytest.raises(sources.DataError) as e:
    sources.list_records(d, "train")
  msg = str(e.value)
  lines = msg.splitlines()
  assert sum("id has no image file" in l for l in lines) == 2, msg
  assert "'ab\\rcd'" in msg and "'ef\\ngh'" in msg
  assert "\r" not in msg and not any(l.startswith(("cd", "gh")) for l in lines)


def test_missing_split_directory(tmp_path):
  with pytest.raises(sources.DataError, match=str(tmp_path / "train")):
    sources.list_records(str(tmp_path), "train")


def _folders(tmp_path, split="train"):
  for label, names in (("0", ["a.png", "b.jpg"]), ("1", ["a.tif", "c.JPG"])):
    (tmp_path / split / label).mkdir(parents=True)
    for n in names:
      (tmp_path / split / label / n).write_bytes(b"x")
  (tmp_path / split / "0" / "notes.txt").write_text("not an image")


def test_folder_layout(tmp_path):
  _folders(tmp_path)
  assert sources.detect_layout(str(tmp_path), "train") == "folders"
  records, problems, layout = sources.list_records(str(tmp_path), "train")
  assert layout == sources.LAYOUT_FOLDERS and problems == []
  # The same stem in both classes stays two images: ids are "<label>/<stem>".
  assert [(r.id, r.label) for r in records] == [
      ("0/a", 0), ("0/b", 0), ("1/a", 1), ("1/c", 1)]
  assert records[2].path == str(tmp_path / "train" / "1" / "a.tif")


def test_folder_layout_rejects_other_class_folders(tmp_path):
  _folders(tmp_path)
  (tmp_path / "train" / "2").mkdir()
  with pytest.raises(sources.DataError, match="must be named 0 or 1"):
    sources.list_records(str(tmp_path), "train")


def test_folder_layout_without_images(tmp_path):
  (tmp_path / "valid" / "0").mkdir(parents=True)
  with pytest.raises(sources.DataError, match="no images"):
    sources.list_records(str(tmp_path), "valid")


def test_detect_layout_kaggle(tmp_path):
  d = _kaggle(tmp_path, _ids(1))
  assert sources.detect_layout(d, "train") == sources.LAYOUT_KAGGLE


@pytest.mark.skipif(not (SHARED / "kaggle_tif").is_dir(),
                    reason=f"real data not present at {SHARED}")
def test_real_kaggle_and_pcam_layouts():
  records, problems, layout = sources.list_records(
      str(SHARED / "kaggle_tif"), "train")
  assert layout == "kaggle" and not problems
  assert len(records) == 16 and sum(r.label for r in records) == 5
  test, _, _ = sources.list_records(str(SHARED / "kaggle_tif"), "test")
  assert len(test) == 29
  if (SHARED / "pcam96_jpeg").is_dir():
    valid, _, layout = sources.list_records(str(SHARED / "pcam96_jpeg"),
                                            "valid")
    assert layout == "folders" and len(valid) == 3000
    assert sum(r.label for r in valid) == 1500


def test_image_files_maps_names_to_ids_and_finds_shared_ids(tmp_path):
  for n in ("b.tif", "a.png", "a.tif", "c.JPG", "notes.txt"):
    (tmp_path / n).write_bytes(b"x")
  (tmp_path / "d.tif").mkdir()  # A directory is not an image.
  names, shared = sources.image_files(str(tmp_path))
  assert names == {"b": "b.tif", "c": "c.JPG"}
  assert shared == {"a": ["a.png", "a.tif"]}


def test_file_names_that_are_not_utf8_are_refused_by_name(tmp_path):
  # Such a name lists as a str with surrogate escapes, which cannot be
  # stored as an id; it used to end in a UnicodeEncodeError traceback deep
  # in the shard writer (test split).
  d = _kaggle(tmp_path, [], test_ids=["a", "b\u00e9"])  # UTF-8 e-acute: fine.
  with open(os.path.join(os.fsencode(tmp_path / "test"), b"bad\xff.tif"),
            "wb") as f:
    f.write(b"x")
  with pytest.raises(sources.DataError) as e:
    sources.list_records(d, "test", skip_invalid=True)
  assert (f"{tmp_path / 'test'}: 1 file name(s) are not valid UTF-8, so they "
          f"cannot be ids: b'bad\\xff.tif'") in str(e.value), str(e.value)
  os.remove(os.path.join(os.fsencode(tmp_path / "test"), b"bad\xff.tif"))
  records, _, _ = sources.list_records(d, "test")
  assert sorted(r.id for r in records) == ["a", "b\u00e9"]


def test_kaggle_files_sharing_an_id_are_refused_or_skipped(tmp_path):
  ids = _ids(3)
  d = _kaggle(tmp_path, ids)
  (tmp_path / "train" / f"{ids[1]}.png").write_bytes(b"x")
  with pytest.raises(sources.DataError) as e:
    sources.list_records(d, "train")
  msg = str(e.value)
  assert (f"{tmp_path / 'train'}: 2 files share the id '{ids[1]}': "
          f"{ids[1]}.png, {ids[1]}.tif") in msg, msg
  assert "--skip_invalid" in msg

  records, problems, _ = sources.list_records(d, "train", skip_invalid=True)
  assert [r.id for r in records] == [ids[0], ids[2]]
  # One problem per file, none of them "id has no image file".
  assert sorted(p.path for p in problems) == [
      str(tmp_path / "train" / f"{ids[1]}.{ext}") for ext in ("png", "tif")]
  assert {p.id for p in problems} == {ids[1]}
  assert all("2 files share the id" in p.reason for p in problems)


def test_unlabelled_files_sharing_an_id_are_refused_or_skipped(tmp_path):
  d = _kaggle(tmp_path, [], test_ids=["a", "b"])
  (tmp_path / "test" / "a.png").write_bytes(b"x")
  with pytest.raises(sources.DataError, match="2 files share the id 'a': "
                     "a.png, a.tif"):
    sources.list_records(d, "test")
  records, problems, _ = sources.list_records(d, "test", skip_invalid=True)
  assert [r.id for r in records] == ["b"]  # Never two records "a".
  assert [os.path.basename(p.path) for p in problems] == ["a.png", "a.tif"]


def test_class_folder_files_sharing_an_id_are_refused(tmp_path):
  _folders(tmp_path)
  (tmp_path / "train" / "0" / "a.tif").write_bytes(b"x")  # Next to a.png.
  with pytest.raises(sources.DataError) as e:
    sources.list_records(str(tmp_path), "train", skip_invalid=True)
  assert (f"{tmp_path / 'train' / '0'}: 2 files share the id 'a': a.png, "
          f"a.tif") in str(e.value)


def test_label_problem_hint_is_the_callers(tmp_path):
  d, _, _ = _problem_case(tmp_path, "label")
  with pytest.raises(sources.DataError) as e:
    sources.list_records(d, "train", skip_hint=None)
  assert "label '2' is not 0 or 1" in str(e.value)
  assert "skip_invalid" not in str(e.value)
  with pytest.raises(sources.DataError) as e:
    sources.list_records(d, "train", skip_hint="pass --lenient")
  assert str(e.value).endswith("\n(pass --lenient)")


class _OwnError(ValueError):
  pass


def test_open_csv_byte_order_mark_spaces_and_missing_columns(tmp_path):
  p = tmp_path / "t.csv"
  p.write_text("\ufeff id , group \na,1\n", encoding="utf-8")
  with sources.open_csv(str(p), ("id", "group"), "group CSV") as opened:
    reader, header = opened
    assert header == ["id", "group"] and list(reader) == [["a", "1"]]
  with pytest.raises(_OwnError) as e:
    with sources.open_csv(str(p), ("id", "label"), "labels CSV", _OwnError):
      pass
  msg = str(e.value)
  assert msg.startswith(f"{p}: missing column(s) ['label']") and (
      "no 'label' column" in msg), msg
  with pytest.raises(_OwnError, match="nope.csv: cannot read labels CSV"):
    with sources.open_csv(str(tmp_path / "nope.csv"), ("id",), "labels CSV",
                          _OwnError):
      pass
  p.write_text("id\na\n" + "b" * 200_000 + "\n")  # Over csv's field limit.
  with pytest.raises(_OwnError, match=r"t.csv:3: malformed x: field larger"):
    with sources.open_csv(str(p), ("id",), "x", _OwnError) as (reader, _):
      list(reader)
  p.write_bytes(b"id\n\xff\n")
  with pytest.raises(_OwnError, match=r"t.csv: malformed x: not UTF-8 text"):
    with sources.open_csv(str(p), ("id",), "x", _OwnError) as (reader, _):
      list(reader)
