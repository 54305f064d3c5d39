"""Tests for hcd.data.quality and the tools/scan_quality command."""

import csv
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from hcd.data import decode
from hcd.data import quality
from hcd.data import scan_report
from hcd.data import screening
from hcd.data import sources
from hcd.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _sha(img):
  return hashlib.sha1(np.ascontiguousarray(img)).hexdigest()


def _write(path, data):
  with open(path, "wb") as f:
    f.write(data)
  return path


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
  """A folder of good and bad images, returned as records + expectations."""
  d = tmp_path_factory.mktemp("imgs")
  rng = np.random.default_rng(0)
  good, _ = synthetic.make_images(6, seed=2)
  records, expect = [], {}

  def add(rid, data, flags, error=None):
    path = _write(str(d / f"{rid}.tif"), data)
    records.append(sources.Record(rid, path, 0))
    expect[rid] = (flags, error)

  for img in good:
    add(_sha(img), synthetic.tiff_bytes(img), "")
  dark = rng.integers(0, 10, (96, 96, 3), dtype=np.uint8)
  add(_sha(dark), synthetic.tiff_bytes(dark), "dark")
  bright = rng.integers(246, 256, (96, 96, 3), dtype=np.uint8)
  add(_sha(bright), synthetic.tiff_bytes(bright), "bright")
  add("corrupt", b"II*\x00" + rng.bytes(3000), "unreadable",
      "cannot decode tiff")
  add("truncated", synthetic.tiff_bytes(good[0])[:5000], "unreadable",
      "cannot decode tiff")
  add("empty", b"", "unreadable", "empty file (0 bytes)")
  add("text", b"id,label\n", "unreadable", "not a TIFF, JPEG or PNG")
  add("small", decode.encode_tiff(good[0][:64, :64]), "bad_shape",
      "shape (64, 64, 3)")
  add("gray", decode.encode_tiff(good[0][..., 0]), "bad_shape", "grayscale")
  add("deep", decode.encode_tiff(good[0].astype(np.uint16) * 256),
      "bad_shape", "pixel type uint16")
  # A valid image under an id that is not its SHA-1, and an exact duplicate
  # of good[1] (sorted after it) under another id.
  add("0" * 40, synthetic.tiff_bytes(good[2][::-1]), "sha1_mismatch")
  add("f" * 40, synthetic.tiff_bytes(good[1]), "sha1_mismatch;duplicate")
  missing = str(d / "missing.tif")
  records.append(sources.Record("missing", missing, 0))
  expect["missing"] = ("unreadable", "cannot read: No such file")
  return sorted(records, key=lambda r: r.id), expect, good


def test_scan_reports_every_problem_and_continues(bad_dir):
  records, expect, good = bad_dir
  df, summary = quality.scan(records, workers=1, progress=False)
  assert list(df.columns) == list(scan_report.COLUMNS)
  assert df["id"].tolist() == [r.id for r in records]
  for row in df.itertuples():
    flags, error = expect[row.id]
    assert row.flags == flags, row.id
    if error:
      assert error in row.error, (row.id, row.error)
      assert not row.ok and row.reasons.startswith(flags.split(";")[0])
    else:
      assert row.error == ""
  dup = df.set_index("id").loc["f" * 40]
  assert dup["duplicate_of"] == _sha(good[1])
  assert dup["reasons"] == (f"sha1_mismatch: pixels hash to {_sha(good[1])}; "
                            f"duplicate: same pixels as {_sha(good[1])}")
  counts = summary["flag_counts"]
  assert counts == {"unreadable": 5, "bad_shape": 3, "dark": 1, "bright": 1,
                    "sha1_mismatch": 2, "duplicate": 1}
  assert summary["num_images"] == len(records)
  assert summary["num_flagged"] == sum(1 for f, _ in expect.values() if f)


def test_an_unexpected_failure_is_the_row_error(bad_dir, monkeypatch):
  records, _, _ = bad_dir
  real = decode.decode_raw

  def flaky(data, name="<bytes>"):
    if name.endswith("gray.tif"):
      raise RuntimeError("codec crashed")
    return real(data, name)

  monkeypatch.setattr(decode, "decode_raw", flaky)
  df, _ = quality.scan(records, workers=1, progress=False)
  row = df.set_index("id").loc["gray"]
  assert row["flags"] == "unreadable"
  assert row["error"] == "unexpected RuntimeError: codec crashed"
  assert df["ok"].sum() == 10  # Everything else scanned as before.


def test_bad_shape_rows_describe_the_image(bad_dir):
  records, _, _ = bad_dir
  df, _ = quality.scan(records, workers=1, progress=False)
  df = df.set_index("id")
  assert (df.loc["small", ["height", "width", "channels"]].tolist() ==
          [64, 64, 3])
  assert df.loc["gray", "channels"] == 1
  assert df.loc["deep", "dtype"] == "uint16"
  assert pd.isna(df.loc["empty", "height"]) and df.loc["empty", "dtype"] == ""
  assert pd.isna(df.loc["corrupt", "min"]) and pd.isna(df.loc["gray", "max"])
  assert pd.isna(df.loc["small", "sha1_match"])  # Not a SHA-1 id.


def test_statistics_match_numpy(bad_dir):
  records, _, good = bad_dir
  df, _ = quality.scan(records, workers=1, progress=False)
  df = df.set_index("id")
  for img in good:
    row = df.loc[_sha(img)]
    px = img.reshape(-1, 3).astype(np.float64)
    assert row["ok"] and row["sha1"] == _sha(img) and row["sha1_match"]
    assert (row["min"], row["max"]) == (img.min(), img.max())
    np.testing.assert_allclose(row[["mean_r", "mean_g", "mean_b"]].tolist(),
                               px.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(row[["std_r", "std_g", "std_b"]].tolist(),
                               px.std(axis=0), rtol=0, atol=1e-9)
    background = (img.min(axis=-1) >= screening.BACKGROUND_MIN).mean()
    assert row["background_frac"] == pytest.approx(background, abs=1e-12)
    assert not row["dark"] and not row["bright"]


def test_thresholds_are_flags(bad_dir):
  records, _, _ = bad_dir
  df, summary = quality.scan(records, workers=1, dark_max=0, bright_min=255,
                             progress=False)
  assert summary["flag_counts"]["dark"] == 0
  assert summary["flag_counts"]["bright"] == 0
  assert summary["thresholds"]["dark_max"] == 0
  df, _ = quality.scan(records, workers=1, dark_max=256, progress=False)
  assert df["dark"].sum() == df["ok"].sum()


def test_parallel_scan_equals_serial_scan(bad_dir):
  records, _, _ = bad_dir
  one = quality.run_scan(records, workers=1, progress=False)
  # chunk_size=2 puts the duplicate pair into different worker tasks.
  two = quality.run_scan(records, workers=2, chunk_size=2, progress=False)
  assert one.lines == two.lines
  assert scan_report.to_csv_text(one.dataframe()) == scan_report.to_csv_text(
      two.dataframe())


def test_clean_rows_format_like_every_other_row(bad_dir, tmp_path):
  # Most rows take a one-format fast path; it must write what the general,
  # field-by-field formatter writes. Quotes and commas take the general one.
  records, _, good = bad_dir
  quoted = str(tmp_path / 'pa"tch,1.tif')
  _write(quoted, synthetic.tiff_bytes(good[3]))
  records = records + [sources.Record('pa"tch,1', quoted, 1)]
  result = quality.run_scan(records, workers=1, progress=False)
  rows = np.arange(len(records))
  general = scan_report._format_general(  # pylint: disable=protected-access
      result.columns, rows)
  assert result.lines == general
  clean = scan_report._clean_rows(  # pylint: disable=protected-access
      result.columns, rows)
  assert clean.sum() == len(good) and not clean[-1]


def test_report_round_trip_and_exclusions(bad_dir, tmp_path):
  records, expect, _ = bad_dir
  result = quality.run_scan(records, workers=1, progress=False)
  csv_path, json_path = result.write(str(tmp_path))
  assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["id"] for r in rows] == [r.id for r in records]
  with open(json_path) as f:
    assert json.load(f)["schema_version"] == scan_report.SCHEMA_VERSION
  back = scan_report.read_report(str(tmp_path))
  assert scan_report.to_csv_text(back) == scan_report.to_csv_text(result.dataframe())
  excluded = scan_report.load_exclusions(str(tmp_path))
  assert set(excluded) == {i for i, (f, _) in expect.items() if f}
  dark_id = next(i for i, (f, _) in expect.items() if f == "dark")
  assert excluded[dark_id].startswith("dark: max ") and "< 10" in (
      excluded[dark_id])
  assert excluded["empty"] == "unreadable: empty file (0 bytes)"
  assert scan_report.excluded_ids(result.dataframe()) == excluded
  # Saved again by a spreadsheet program, with a byte-order mark: the same.
  text = open(csv_path, encoding="utf-8").read()
  with open(csv_path, "w", encoding="utf-8-sig", newline="") as f:
    f.write(text)
  assert scan_report.to_csv_text(scan_report.read_report(str(tmp_path))) == (
      scan_report.to_csv_text(back))


def test_load_exclusions_errors_name_the_path(tmp_path):
  with pytest.raises(scan_report.ScanError, match=str(tmp_path / "scan.csv")):
    scan_report.load_exclusions(str(tmp_path))
  (tmp_path / "scan.csv").write_text("id,label\nabc,0\n")
  with pytest.raises(scan_report.ScanError, match="missing column"):
    scan_report.load_exclusions(str(tmp_path))
  (tmp_path / "scan.csv").write_text("id,flags,reasons\n\"abc,dark\n")
  with pytest.raises(scan_report.ScanError, match="malformed"):
    scan_report.load_exclusions(str(tmp_path))


def test_folder_layout_ids_are_not_hash_checked(tmp_path):
  images, _ = synthetic.make_images(4, seed=0)
  # Names with a comma, a quote and non-ASCII letters must survive the CSV.
  names = ["patch0", 'pa"tch,1', "patché2", "patch3"]
  for k, img in enumerate(images):
    d = tmp_path / "train" / str(k % 2)
    d.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(d / f"{names[k]}.tif", img, photometric="rgb")
  records, _, layout = sources.list_records(str(tmp_path), "train")
  assert layout == sources.LAYOUT_FOLDERS
  result = quality.run_scan(records, workers=1, progress=False)
  df = result.dataframe()
  assert df["id"].tolist() == ["0/patch0", "0/patché2", '1/pa"tch,1',
                               "1/patch3"]
  assert df["sha1_match"].isna().all() and df["ok"].all()
  summary = result.summary
  assert summary["sha1_checked"] == 0 and summary["num_flagged"] == 0
  assert summary["label_counts"] == {"0": 2, "1": 2}
  result.write(str(tmp_path / "scan"))
  back = scan_report.read_report(str(tmp_path / "scan"))
  assert back["id"].tolist() == df["id"].tolist()
  assert back["path"].tolist() == [r.path for r in records]


def test_workspace_md_documents_every_column():
  with open(os.path.join(ROOT, "WORKSPACE.md")) as f:
    text = f.read()
  section = text[text.index("## Scan report"):]
  section = section[:section.index("\n## ", 3)]
  for c in scan_report.COLUMNS + screening.FLAGS:
    assert c in section, c


def test_scanner_modules_do_not_import_tensorflow():
  code = ("import sys, hcd.data.quality, hcd.data.synthetic; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=ENV)


def _tool(name, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name),
                         *args], capture_output=True, text=True, env=ENV,
                        cwd=ROOT, check=False)


def test_tools_end_to_end(tmp_path):
  data = str(tmp_path / "data")
  p = _tool("make_synthetic", f"--out_dir={data}", "--num_train=300",
            "--num_test=50", "--seed=11", "--noprogress")
  assert p.returncode == 0, p.stderr
  with open(os.path.join(data, "train_labels.csv"), newline="") as f:
    train = [r["id"] for r in csv.DictReader(f)]
  dark, bright = synthetic.planted_indices(300, seed=11)
  planted = {train[i]: "dark" for i in dark}
  planted.update({train[i]: "bright" for i in bright})
  assert len(planted) == 2
  # Corrupt one file (keeps its id and label): the scan must report it and
  # go on.
  victim = next(i for i in train if i not in planted)
  _write(os.path.join(data, "train", victim + ".tif"), b"II*\x00garbage")

  out = str(tmp_path / "scans" / "train")
  p = _tool("scan_quality", f"--data_dir={data}", "--split=train",
            f"--out_dir={out}", "--workers=2", "--noprogress")
  assert p.returncode == 0, p.stderr
  assert "300 images" in p.stdout
  with open(os.path.join(out, "scan.csv"), newline="") as f:
    rows = {r["id"]: r for r in csv.DictReader(f)}
  assert len(rows) == 300
  flagged = {i: r["flags"] for i, r in rows.items() if r["flags"]}
  assert flagged == dict(planted, **{victim: "unreadable"})
  assert rows[victim]["ok"] == "False" and "cannot decode" in (
      rows[victim]["error"])
  assert all(r["sha1_match"] == "True" for i, r in rows.items()
             if i != victim)
  with open(os.path.join(out, "scan_summary.json")) as f:
    summary = json.load(f)
  assert summary["split"] == "train" and summary["num_images"] == 300
  assert summary["flag_counts"]["dark"] == 1
  assert summary["flag_counts"]["unreadable"] == 1
  assert scan_report.load_exclusions(out)[victim].startswith("unreadable: ")

  p = _tool("scan_quality", f"--data_dir={data}", "--split=test",
            f"--out_dir={tmp_path / 'scans' / 'test'}", "--workers=1",
            "--noprogress")
  assert p.returncode == 0, p.stderr
  test_df = scan_report.read_report(str(tmp_path / "scans" / "test"))
  assert len(test_df) == 50 and (test_df["label"] == -1).all()


def test_scan_tool_refuses_a_bad_data_dir(tmp_path):
  bad = str(tmp_path / "nowhere")
  p = _tool("scan_quality", f"--data_dir={bad}", f"--out_dir={tmp_path}/o",
            "--noprogress")
  assert p.returncode != 0
  err = p.stderr.strip()
  assert len(err.splitlines()) == 1 and bad in err, err
  assert not os.path.exists(tmp_path / "o" / "scan.csv")


def test_duplicate_rule_keeps_the_genuine_copy():
  a, b = "a" * 40, "b" * 40  # Pixel digests.
  # The image whose id is its digest is canonical wherever it sits.
  ids = ["0" * 40, "x", a, "y", b]
  assert screening.duplicate_of(ids, [a, b, a, b, b]) == {0: 2, 1: 4, 3: 4}
  # No genuine id in a group: the first in record order is canonical.
  assert screening.duplicate_of(["p", "q", "r"], [a, a, a]) == {1: 0, 2: 0}
  digests = np.array([a, b, a], dtype="S40")  # The scanner's column type.
  assert screening.duplicate_of(["q", b, a], digests) == {0: 2}
  assert screening.duplicate_of(["p", "q"], [a, b]) == {}


def _bomb(path, side=20000, tile=1024):
  """A ~40 KB tiled zstd TIFF that declares side x side RGB pixels.

  Written tile by tile, so the test never holds the pixels either.
  """
  zeros = np.zeros((tile, tile, 3), np.uint8)
  tiles = (zeros for _ in range((-(-side // tile)) ** 2))
  tifffile.imwrite(path, tiles, shape=(side, side, 3), dtype=np.uint8,
                   tile=(tile, tile), compression="zstd", photometric="rgb")
  return path


def test_a_decompression_bomb_is_refused_from_its_tags(tmp_path):
  """20000 x 20000 px declared in 40 KB: refused without decoding."""
  path = _bomb(str(tmp_path / "bomb.tif"))
  assert os.path.getsize(path) < 200_000
  data = open(path, "rb").read()
  with pytest.raises(decode.ImageError, match=r"shape \(20000, 20000, 3\)"
                     r".*not decoded") as e:
    decode.decode_raw(data, path)
  assert e.value.flag == decode.BAD_SHAPE
  assert e.value.shape == (20000, 20000, 3) and e.value.dtype == "uint8"
  rid = "bomb"
  df, _ = quality.scan([sources.Record(rid, path, 0)], workers=1,
                       progress=False)
  row = df.iloc[0]
  assert row["flags"] == "bad_shape"
  assert (row["height"], row["width"], row["channels"]) == (20000, 20000, 3)
  # JPEG and PNG headers are read the same way (Pillow, header only).
  big = np.zeros((100, 2000, 3), np.uint8)
  import imagecodecs  # pylint: disable=g-import-not-at-top
  for name, encoded in (("big.png", imagecodecs.png_encode(big)),
                        ("big.jpg", imagecodecs.jpeg8_encode(big))):
    with pytest.raises(decode.ImageError) as e:
      decode.decode_raw(encoded, name)
    assert e.value.flag == decode.BAD_SHAPE, name
    assert e.value.shape == (100, 2000, 3), name


_PEAK_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_scan_quality_peak_memory_is_not_raised_by_a_bomb(tmp_path):
  """The issue's target: within 50 MB of the peak on three normal images.

  Peak resident memory of the tool and its worker processes (the largest
  one), each measured in a fresh process.
  """
  good, _ = synthetic.make_images(3, seed=5)
  peaks = {}
  for case in ("normal", "bomb"):
    d = tmp_path / case / "test"
    d.mkdir(parents=True)
    for img in good:
      _write(str(d / f"{_sha(img)}.tif"), synthetic.tiff_bytes(img))
    if case == "bomb":
      _bomb(str(d / ("b" * 40 + ".tif")))
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, sys.executable,
         os.path.join(ROOT, "tools", "scan_quality"),
         f"--data_dir={tmp_path / case}", "--split=test",
         f"--out_dir={tmp_path / case / 'scan'}", "--workers=2",
         "--noprogress"], capture_output=True, text=True, env=ENV, cwd=ROOT,
        check=True)
    peaks[case] = int(out.stdout.split()[-1]) / 1024  # MB (ru_maxrss: KB).
  report = scan_report.read_report(str(tmp_path / "bomb" / "scan"))
  assert report["flags"].tolist().count("bad_shape") == 1
  assert peaks["bomb"] - peaks["normal"] < 50, peaks
