"""The scan report's format: scan.csv and scan_summary.json.

One module for everything about the report as files (WORKSPACE.md, "Scan
report"): its columns and their types, the CSV formatter shared by the
scanner's workers, its parent and `to_csv_text` (so a report reads the same
whichever wrote it), writing and reading it back, and the exclusions
tools/make_shards takes from it. The scan itself is hcd/data/quality.py.
This module never imports TensorFlow.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Sequence

import numpy as np

from hcd.data import sources
from hcd.data.features import IMAGE_SHAPE
from hcd.fileio import atomic_write_text

SCHEMA_VERSION = 1
SCAN_CSV = "scan.csv"
SUMMARY_JSON = "scan_summary.json"
COLUMNS = ("id", "path", "label", "ok", "error", "height", "width", "channels",
           "dtype", "min", "max", "mean_r", "mean_g", "mean_b", "std_r",
           "std_g", "std_b", "background_frac", "sha1", "sha1_match",
           "duplicate_of", "dark", "bright", "flags", "reasons")
# Text columns (object arrays of str, missing is ""; sha1 is bytes "S40").
TEXT_COLUMNS = ("id", "path", "error", "dtype", "sha1", "duplicate_of",
                "flags", "reasons")
# Integer columns stored with -1 for missing.
INT_COLUMNS = {"height": "Int32", "width": "Int32", "channels": "Int32",
               "min": "Int16", "max": "Int16"}
FLOAT_COLUMNS = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b",
                 "background_frac")


class ScanError(ValueError):
  """A missing or malformed scan report; the message names the path."""


def _q(s: str) -> str:
  """Quotes a CSV text field where RFC 4180 needs it."""
  if "," in s or '"' in s or "\n" in s or "\r" in s:
    return '"' + s.replace('"', '""') + '"'
  return s


def _i(v: int) -> str:
  return "" if v < 0 else str(v)


def _f(v: float, fmt: str) -> str:
  return "" if v != v else format(v, fmt)


_MATCH_TEXT = {-1: "", 0: "False", 1: "True"}
MATCH_CODE = {None: -1, False: 0, True: 1}
# A clean row: readable 96x96 RGB uint8, nothing flagged, no field that
# needs quoting. Most rows are; one %-format per row is ~3x faster than the
# general formatter's 25 fields (the output is the same, see format_rows).
_CLEAN_ROW = ("%s,%s,%d,True,," + ",".join(map(str, IMAGE_SHAPE)) +
              ",uint8,%d,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.4f,%s,%s,,False,"
              "False,,\n")
_NEEDS_QUOTES = re.compile(r'[,"\r\n]')


def format_rows(cols: dict, rows=None) -> list[str]:
  """CSV lines (each ending in a newline) of the given rows of a report.

  One formatter for the workers, the parent and `to_csv_text`, so that a
  report reads the same whichever wrote it; ~4x faster than pandas'.

  Args:
    cols: report columns (see `_chunk_columns`).
    rows: indices of the rows to format; None formats every row.

  Returns:
    One line per row, in order.
  """
  if rows is None:
    rows = np.arange(len(cols["ok"]))
  rows = np.asarray(rows, np.int64)
  clean = _clean_rows(cols, rows)
  if clean.all():
    return _format_clean(cols, rows)
  lines = _format_general(cols, rows)
  for k, line in zip(np.flatnonzero(clean).tolist(),
                     _format_clean(cols, rows[clean])):
    lines[k] = line
  return lines


def _clean_rows(cols: dict, rows: np.ndarray) -> np.ndarray:
  """Which of the rows `_CLEAN_ROW` formats exactly (see there)."""
  h, w, c = IMAGE_SHAPE
  clean = (cols["ok"][rows] & (cols["height"][rows] == h) &
           (cols["width"][rows] == w) & (cols["channels"][rows] == c) &
           (cols["dtype"][rows] == "uint8") & (cols["flags"][rows] == "") &
           (cols["duplicate_of"][rows] == ""))
  ids, paths = cols["id"][rows].tolist(), cols["path"][rows].tolist()
  # One search over all ids and paths; per row only if one needs quotes.
  if _NEEDS_QUOTES.search("".join(ids) + "".join(paths)):
    clean &= np.array([not (_NEEDS_QUOTES.search(i) or
                            _NEEDS_QUOTES.search(p))
                       for i, p in zip(ids, paths)], bool)
  return clean


def _format_clean(cols: dict, rows: np.ndarray) -> list[str]:
  """Lines of clean rows (`_clean_rows`), one %-format each."""
  get = lambda c: cols[c][rows].tolist()
  match = [_MATCH_TEXT[m] for m in get("sha1_match")]
  sha = cols["sha1"][rows].astype("U40").tolist()
  return [_CLEAN_ROW % t for t in zip(
      get("id"), get("path"), get("label"), get("min"), get("max"),
      get("mean_r"), get("mean_g"), get("mean_b"), get("std_r"),
      get("std_g"), get("std_b"), get("background_frac"), sha, match)]


def _format_general(cols: dict, rows: np.ndarray) -> list[str]:
  """Lines of any rows, field by field."""
  get = lambda c: cols[c][rows].tolist()
  out = []
  for (i, p, lab, ok, err, h, w, ch, dt, mn, mx, mr, mg, mb, sr, sg, sb, bg,
       sha, sm, dup, dk, br, fl, rs) in zip(*(get(c) for c in COLUMNS)):
    out.append(
        f"{_q(i)},{_q(p)},{lab},{ok},{_q(err)},{_i(h)},{_i(w)},{_i(ch)},{dt},"
        f"{_i(mn)},{_i(mx)},{_f(mr, '.3f')},{_f(mg, '.3f')},{_f(mb, '.3f')},"
        f"{_f(sr, '.3f')},{_f(sg, '.3f')},{_f(sb, '.3f')},{_f(bg, '.4f')},"
        f"{sha.decode()},{_MATCH_TEXT[sm]},{_q(dup)},{dk},{br},{fl},"
        f"{_q(rs)}"
        "\n")
  return out



def _columns(df) -> dict:
  """A report DataFrame's columns as `format_rows` takes them."""
  cols = {}
  for c in COLUMNS:
    s = df[c]
    if c in INT_COLUMNS:
      cols[c] = s.fillna(-1).to_numpy(np.int64)
    elif c == "sha1_match":
      cols[c] = np.where(s.isna(), -1, s.fillna(False).astype(bool)).astype(
          np.int8)
    elif c in FLOAT_COLUMNS:
      cols[c] = s.to_numpy(np.float64)
    elif c == "sha1":
      cols[c] = s.fillna("").astype(str).to_numpy("S40")
    elif c in TEXT_COLUMNS:
      cols[c] = s.fillna("").astype(str).to_numpy(object)
    else:
      cols[c] = s.to_numpy()
  return cols


def to_csv_text(df) -> str:
  """Formats a report DataFrame (from `scan` or `read_report`) as scan.csv."""
  return ",".join(COLUMNS) + "\n" + "".join(format_rows(_columns(df)))


def write_report(df, summary: dict, out_dir: str) -> tuple[str, str]:
  """Writes a report DataFrame and summary atomically into out_dir.

  Returns:
    (scan.csv path, scan_summary.json path).
  """
  return write_lines(format_rows(_columns(df)), summary, out_dir)


def write_lines(lines: Sequence[str], summary: dict,
                out_dir: str) -> tuple[str, str]:
  """Writes scan.csv from formatted lines, and scan_summary.json, atomically.

  Args:
    lines: CSV text after the header, in pieces ending in a newline (e.g.
      `format_rows`' lines).
    summary: scan_summary.json's content.
    out_dir: created if missing.

  Returns:
    (scan.csv path, scan_summary.json path).
  """
  os.makedirs(out_dir, exist_ok=True)
  csv_path = os.path.join(out_dir, SCAN_CSV)
  json_path = os.path.join(out_dir, SUMMARY_JSON)
  # Joined a few thousand lines at a time: one 25 MB string per 100k rows
  # costs more than the writing.
  atomic_write_text(csv_path, itertools.chain(
      [",".join(COLUMNS) + "\n"],
      ("".join(lines[s:s + 4096]) for s in range(0, len(lines), 4096))))
  atomic_write_text(json_path, json.dumps(summary, indent=1) + "\n")
  return csv_path, json_path


def excluded_ids(scan_df) -> dict[str, str]:
  """Maps each flagged image's id to the reason it should be excluded.

  Args:
    scan_df: a report from `scan` or `read_report` (needs id and flags;
      uses reasons when present).

  Returns:
    {id: reason} for every row with a non-empty `flags`.
  """
  flags = scan_df["flags"].fillna("").astype(str)
  flagged = flags != ""
  reasons = flags[flagged]
  if "reasons" in scan_df:
    text = scan_df["reasons"][flagged].fillna("").astype(str)
    reasons = text.where(text != "", reasons)
  return dict(zip(scan_df["id"][flagged].astype(str), reasons))


def read_report(scan_dir: str, columns: Sequence[str] | None = None):
  """Reads `<scan_dir>/scan.csv` into a DataFrame.

  Args:
    scan_dir: a directory written by tools/scan_quality.
    columns: read only these columns (faster); they must exist.

  Returns:
    The report DataFrame, with the dtypes `scan` gives.

  Raises:
    ScanError: missing file, unparsable CSV or missing columns, naming
      the path.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  path = os.path.join(scan_dir, SCAN_CSV)
  if not os.path.isfile(path):
    raise ScanError(f"{path}: no scan report (run tools/scan_quality "
                    f"--out_dir={scan_dir} first)")
  need = list(columns) if columns else list(COLUMNS)
  with sources.open_csv(path, need, "tools/scan_quality report",
                        error=ScanError):
    pass  # The header check (a byte-order mark allowed, as pandas below).
  dtypes = {c: str for c in TEXT_COLUMNS}
  dtypes.update(INT_COLUMNS)
  dtypes.update({"sha1_match": "boolean", "label": np.int64})
  dtypes.update({c: bool for c in ("ok", "dark", "bright")})
  dtypes.update({c: np.float64 for c in FLOAT_COLUMNS})
  try:
    return pd.read_csv(path, usecols=need, dtype={c: dtypes[c] for c in need},
                       encoding="utf-8-sig", keep_default_na=False,
                       na_values={c: [""] for c in need
                                  if c not in TEXT_COLUMNS})
  except (ValueError, TypeError, pd.errors.ParserError) as e:
    raise ScanError(f"{path}: malformed scan report: {e}") from None


def load_thresholds(scan_dir: str) -> dict[str, int]:
  """The dark/bright thresholds a scan report was made with.

  tools/make_shards --scan_dir records these in its manifest: the report,
  not make_shards' own flags, decided which images are dark or bright.

  Args:
    scan_dir: a directory written by tools/scan_quality.

  Returns:
    {"dark_max": int, "bright_min": int}.

  Raises:
    ScanError: missing or malformed scan_summary.json, naming the path.
  """
  path = os.path.join(scan_dir, SUMMARY_JSON)
  try:
    with open(path, encoding="utf-8") as f:
      found = json.load(f)["thresholds"]
    return {k: int(found[k]) for k in ("dark_max", "bright_min")}
  except OSError as e:
    raise ScanError(f"{path}: cannot read the scan summary: "
                    f"{e.strerror}") from None
  except (ValueError, KeyError, TypeError) as e:
    raise ScanError(f"{path}: no dark_max/bright_min thresholds in the "
                    f"scan summary ({type(e).__name__}: {e})") from None


def load_exclusions(scan_dir: str) -> dict[str, str]:
  """Returns {id: reason} for the images a scan says to exclude.

  This is what tools/make_shards applies with --scan_dir.

  Args:
    scan_dir: a directory written by tools/scan_quality.

  Returns:
    {id: reason}, e.g. {"ab12...": "dark: max 7 < 10"}.

  Raises:
    ScanError: missing or malformed scan.csv, naming the path.
  """
  return excluded_ids(read_report(scan_dir, ["id", "flags", "reasons"]))
