"""Tests for hcd.eval.submission: ids, order, values, refusals, real ids."""

import csv
import os
import random
import types

import numpy as np
import pytest

from hcd.eval import submission
import evalutil

SAMPLE = evalutil.KAGGLE_TIF / "sample_submission.csv"


def _ids(n):
  return [f"{k:040x}" for k in range(n)]


def test_write_orders_like_sample_and_keeps_full_precision(tmp_path):
  expected = _ids(50)
  rng = np.random.default_rng(0)
  probs = rng.random(50)
  perm = rng.permutation(50)
  got_ids = [expected[k] for k in perm]
  path = submission.write_submission(str(tmp_path / "s.csv"), got_ids,
                                     probs[perm], expected)
  ids, back = submission.read_submission(path)
  assert ids == expected
  np.testing.assert_array_equal(back, probs)  # Bit-exact: never rounded.
  summary = submission.validate_submission(path, expected)
  assert summary["num_rows"] == 50 and not summary["rounded"]
  with open(path) as f:
    assert f.readline() == "id,label\n"


@pytest.mark.parametrize("mutate,words", [
    (lambda ids: ids[:-2], ["2 missing", "missing id"]),
    (lambda ids: ids + ["cafe", "f00d"], ["2 extra", "cafe", "f00d"]),
    (lambda ids: ids + ids[3:4], ["1 duplicate"]),
])
def test_wrong_ids_refused_with_list_and_nothing_written(tmp_path, mutate,
                                                         words):
  expected = _ids(20)
  ids = mutate(list(expected))
  out = tmp_path / "s.csv"
  with pytest.raises(submission.SubmissionError) as e:
    submission.write_submission(str(out), ids, np.full(len(ids), 0.3),
                                expected)
  for w in words:
    assert w in str(e.value)
  if "missing" in words[0]:
    assert expected[-1] in str(e.value) and expected[-2] in str(e.value)
  if "duplicate" in words[0]:
    assert expected[3] in str(e.value)
  assert not os.listdir(tmp_path)


def test_ids_with_control_characters_are_quoted_in_errors(tmp_path):
  expected = _ids(5)
  ids = expected + ["ab\rcd", "ef\ngh"]
  with pytest.raises(submission.SubmissionError) as e:
    submission.write_submission(str(tmp_path / "s.csv"), ids,
                                np.full(len(ids), 0.3), expected)
  msg = str(e.value)
  assert "2 extra" in msg and "'ab\\rcd', 'ef\\ngh'" in msg, msg
  assert "\r" not in msg and "ef\ngh" not in msg
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.5, float("inf")])
def test_bad_probabilities_refused_naming_the_id(tmp_path, bad):
  ids = _ids(5)
  probs = [0.1, 0.2, bad, 0.4, 0.5]
  with pytest.raises(submission.SubmissionError, match=ids[2]):
    submission.write_submission(str(tmp_path / "s.csv"), ids, probs, ids)
  assert not os.listdir(tmp_path)


def test_length_mismatch_refused(tmp_path):
  with pytest.raises(submission.SubmissionError, match="3 ids but 2"):
    submission.write_submission(str(tmp_path / "s.csv"), _ids(3), [0.1, 0.2])


def test_sample_file_problems(tmp_path):
  p = tmp_path / "sample.csv"
  p.write_text("id,label\na,0\nb,0\na,0\n")
  with pytest.raises(submission.SubmissionError, match="duplicate.*a"):
    submission.read_sample_ids(str(p))
  p.write_text("name,label\na,0\n")
  with pytest.raises(submission.SubmissionError, match="no 'id' column"):
    submission.read_sample_ids(str(p))
  p.write_text("id,label\na,0\n,0\n")
  with pytest.raises(submission.SubmissionError, match="row\\(s\\) 3"):
    submission.read_sample_ids(str(p))
  with pytest.raises(submission.SubmissionError, match="cannot read"):
    submission.read_sample_ids(str(tmp_path / "nope.csv"))


def test_blank_lines_are_skipped(tmp_path):
  # As in the labels CSV (sources.cells): an editor's trailing blank line
  # is no empty id.
  p = tmp_path / "s.csv"
  p.write_text("id,label\na,0.25\n\nb,0.5\n\n")
  assert submission.read_sample_ids(str(p)) == ["a", "b"]
  ids, probs = submission.read_submission(str(p))
  assert ids == ["a", "b"] and probs.tolist() == [0.25, 0.5]


@pytest.mark.parametrize("read,text,match", [
    (submission.read_sample_ids, 'id,label\n"two\nlines",0\n\n,0\n',
     r"row\(s\) 5$"),
    (submission.read_submission, "id,label\na,0.25\n\nb,x\n",
     ":4: label 'x'"),
    (submission.read_submission, "id,label\na,0.25,extra\n",
     ":2: expected 2"),
])
def test_bad_rows_are_named_by_their_physical_line(tmp_path, read, text,
                                                    match):
  # The line an editor shows, past blank lines and quoted line breaks.
  p = tmp_path / "s.csv"
  p.write_text(text)
  with pytest.raises(submission.SubmissionError, match=match):
    read(str(p))


def test_validate_detects_order_header_and_rounding(tmp_path):
  p = tmp_path / "s.csv"
  p.write_text("id,label\nb,0.2\na,0.7\n")
  with pytest.raises(submission.SubmissionError, match="order.*row 2"):
    submission.validate_submission(str(p), ["a", "b"])
  p.write_text("id,prob\na,0.2\n")
  with pytest.raises(submission.SubmissionError, match="header"):
    submission.validate_submission(str(p))
  p.write_text("id,label\na,0\nb,1\n")
  assert submission.validate_submission(str(p), ["a", "b"])["rounded"]
  p.write_text("id,label\na,x\n")
  with pytest.raises(submission.SubmissionError, match=":2: label 'x'"):
    submission.validate_submission(str(p))


@pytest.mark.skipif(not SAMPLE.is_file(), reason=evalutil.NO_SHARED)
def test_real_sample_submission_57458_ids(tmp_path):
  expected = submission.read_sample_ids(str(SAMPLE))
  assert len(expected) == 57458 and len(set(expected)) == 57458
  rng = random.Random(0)
  ids = list(expected)
  rng.shuffle(ids)  # Predictions come in shard order, not sample order.
  probs = np.random.default_rng(0).random(len(ids))
  truth = dict(zip(ids, probs))
  out = submission.write_submission(str(tmp_path / "sub.csv"), ids, probs,
                                    expected)
  summary = submission.validate_submission(out, expected)
  assert summary["num_rows"] == 57458
  got_ids, got = submission.read_submission(out)
  assert got_ids == expected
  np.testing.assert_array_equal(got, [truth[i] for i in expected])
  # One id short, one foreign id, one repeated: each refused and listed.
  with pytest.raises(submission.SubmissionError, match=ids[-1]):
    submission.write_submission(str(tmp_path / "x.csv"), ids[:-1],
                                probs[:-1], expected)
  with pytest.raises(submission.SubmissionError, match="1 extra.*deadbeef"):
    submission.write_submission(str(tmp_path / "x.csv"), ids + ["deadbeef"],
                                np.append(probs, 0.5), expected)
  with pytest.raises(submission.SubmissionError,
                     match=f"1 duplicate.*{ids[7]}"):
    submission.write_submission(str(tmp_path / "x.csv"), ids + [ids[7]],
                                np.append(probs, 0.5), expected)
  assert not (tmp_path / "x.csv").exists()


def test_kaggle_sample_submission_is_the_default_unless_given(tmp_path):
  from hcd.cli import eval_flags  # pylint: disable=g-import-not-at-top

  def resolve(**kw):
    values = dict(sample_submission=None, data_dir=str(tmp_path),
                  split="test")
    values.update(kw)
    return eval_flags.sample_submission_path(types.SimpleNamespace(**values))

  (tmp_path / "test").mkdir()
  assert resolve() == (None, False)  # No sample_submission.csv there.
  sample = tmp_path / "sample_submission.csv"
  sample.write_text("id,label\n")
  assert resolve() == (str(sample), True)
  assert resolve(sample_submission="mine.csv") == ("mine.csv", False)
  assert resolve(sample_submission="") == (None, False)  # Opted out.
  assert resolve(split="train") == (None, False)  # Lists test ids only.
  assert resolve(data_dir=None) == (None, False)  # Shards.
  (tmp_path / "test" / "0").mkdir()  # A class-folder layout.
  assert resolve() == (None, False)


def test_ids_with_comma_quote_newline_are_quoted_and_read_back(tmp_path):
  odd = evalutil.ODD_IDS
  probs = np.linspace(0.05, 0.95, len(odd))
  expected = list(reversed(odd))
  out = submission.write_submission(str(tmp_path / "s.csv"), odd, probs,
                                    expected)
  ids, back = submission.read_submission(out)
  assert ids == expected
  np.testing.assert_array_equal(back, probs[::-1])
  summary = submission.validate_submission(out, expected)
  assert summary["num_rows"] == len(odd)
  with open(out, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["id", "label"] and len(rows) == len(odd) + 1
  assert all(len(r) == 2 for r in rows)
  # Without a carriage return in any id, only the fields that need it are
  # quoted: the common file stays the plain id,label text.
  plain = submission.write_submission(str(tmp_path / "p.csv"), odd[:3],
                                      probs[:3])
  with open(plain, newline="", encoding="utf-8") as f:
    text = f.read()
  assert text == ('id,label\n"a,b",0.05\n"say ""hi""",'
                  f'{float(probs[1])!r}\n"two\nlines",{float(probs[2])!r}\n')


def test_byte_order_mark_is_read_like_the_labels_csv(tmp_path):
  # Spreadsheet programs save one; read as plain UTF-8 the header would be
  # ['\ufeffid', 'label'] and the file refused for having no 'id' column.
  p = tmp_path / "s.csv"
  p.write_text("\ufeffid,label\nb,0.25\na,0.5\n", encoding="utf-8")
  assert submission.read_sample_ids(str(p)) == ["b", "a"]
  ids, probs = submission.read_submission(str(p))
  assert ids == ["b", "a"] and probs.tolist() == [0.25, 0.5]
  assert submission.validate_submission(str(p), ["b", "a"])["num_rows"] == 2


def test_sample_submission_missing_column_names_file_and_column(tmp_path):
  p = tmp_path / "sample.csv"
  p.write_text("\ufeffname,label\na,0\n", encoding="utf-8")
  with pytest.raises(submission.SubmissionError) as e:
    submission.read_sample_ids(str(p))
  assert str(e.value).startswith(f"{p}: missing column(s) ['id']")
  assert "['name', 'label']" in str(e.value)  # The header found, no BOM.
