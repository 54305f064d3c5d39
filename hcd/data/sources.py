"""Where images come from: the Kaggle layout and class-folder layouts.

Both produce a list of `Record(id, path, label)`; everything downstream
(scanner, shard writer, predictor) consumes records and never globs itself.

  Kaggle:   <data_dir>/train/<id>.tif + <data_dir>/train_labels.csv
            <data_dir>/test/<id>.tif
  Folders:  <data_dir>/<split>/<label>/*.{tif,png,jpg}   (e.g. PCam exports)

In the folder layout a file name can repeat across splits and classes, so the
id is "<label>/<stem>", unique within a split.

Labels are joined to files by id, never by row position (the notebook dropped
the wrong rows that way).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterable, NamedTuple

from hcd.data import parallel
from hcd.data.decode import IMAGE_EXTS
from hcd.data.features import UNKNOWN_LABEL

LABELS_CSV = "train_labels.csv"
LAYOUT_KAGGLE = "kaggle"
LAYOUT_FOLDERS = "folders"


class Record(NamedTuple):
  """One image: its id, its file path and its label (UNKNOWN_LABEL if none).

  Immutable, like a frozen dataclass, but half the cost to create: a split
  lists 220k of them before any tool starts working.
  """
  id: str
  path: str
  label: int = UNKNOWN_LABEL


@dataclasses.dataclass(frozen=True)
class Problem:
  """A data problem that was skipped rather than raised."""
  id: str
  path: str
  reason: str


class DataError(ValueError):
  """Bad source data; the message names the file and rows at fault."""


def _list_images(directory: str) -> list[str]:
  with os.scandir(directory) as it:
    names = [e.name for e in it
             if e.name.lower().endswith(IMAGE_EXTS) and e.is_file()]
  names.sort()
  return names


def _stem(name: str) -> str:
  # Listed names always end in an image extension; rpartition is ~3x faster
  # than os.path.splitext, which matters for 220k files.
  return name.rpartition(".")[0] or name


def _fmt_rows(items: Iterable[str], limit: int = 10) -> str:
  items = list(items)
  head = ", ".join(items[:limit])
  more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
  return head + more


def read_labels_csv(path: str) -> tuple[dict[str, int], list[Problem]]:
  """Reads and validates a Kaggle labels CSV (`id,label`).

  Args:
    path: the CSV file.

  Returns:
    (labels by id, problems) where problems lists rows that are invalid
    (duplicate ids, labels outside {0,1}). Raising on them is the caller's
    choice (see `kaggle_records`).

  Raises:
    DataError: unreadable file or missing `id`/`label` columns.
  """
  try:
    # utf-8-sig: spreadsheet programs often save a byte-order mark.
    f = open(path, newline="", encoding="utf-8-sig")
  except OSError as e:
    raise DataError(f"{path}: cannot read labels CSV: {e.strerror}") from None
  with f:
    reader = csv.reader(f)
    try:
      fast = _parse_valid_labels(path, reader)
      if fast is not None:
        return fast, []
      # Some row has a problem: reread row by row to name each one.
      f.seek(0)
      reader = csv.reader(f)
      return _parse_labels(path, reader)
    except (csv.Error, UnicodeDecodeError) as e:
      raise DataError(f"{path}:{reader.line_num}: malformed labels CSV: "
                      f"{e}") from None


def _header(path: str, reader) -> tuple[int, int]:
  """The positions of the id and label columns.

  Raises:
    DataError: either column is missing.
  """
  cols = [c.strip() for c in next(reader, [])]
  missing = [c for c in ("id", "label") if c not in cols]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; found {cols}; "
                    f"expected a header 'id,label'")
  return cols.index("id"), cols.index("label")


_LABEL_VALUES = {"0": 0, "1": 1}


def _parse_valid_labels(path: str, reader) -> dict[str, int] | None:
  """Labels by id if no row has a problem, else None (see `_parse_labels`).

  The common case in whole-list operations, ~3x faster than the row-by-row
  loop of `_parse_labels`, which names the rows at fault.
  """
  i_id, i_label = _header(path, reader)
  rows = list(reader)
  width = max(i_id, i_label) + 1
  if any(len(r) < width for r in rows):  # Blank or short rows.
    return None
  ids = [r[i_id].strip() for r in rows]
  values = [r[i_label].strip() for r in rows]
  if ("" in ids or not set(values) <= _LABEL_VALUES.keys() or
      len(set(ids)) != len(ids)):
    return None
  return dict(zip(ids, map(_LABEL_VALUES.__getitem__, values)))


def _parse_labels(path: str, reader
                  ) -> tuple[dict[str, int], list[Problem]]:
  labels: dict[str, int] = {}
  problems: list[Problem] = []
  first_row: dict[str, int] = {}
  i_id, i_label = _header(path, reader)
  for row in reader:
    if not row:  # A blank line.
      continue
    rowno = reader.line_num  # The physical line, as an editor numbers it.
    rid = row[i_id].strip() if len(row) > i_id else ""
    raw = row[i_label].strip() if len(row) > i_label else ""
    if not rid:
      problems.append(Problem("", f"{path}:{rowno}", "row has an empty id"))
      continue
    if raw not in ("0", "1"):
      problems.append(Problem(rid, f"{path}:{rowno}",
                              f"label {raw!r} is not 0 or 1"))
      continue
    if rid in first_row:
      problems.append(Problem(
          rid, f"{path}:{rowno}",
          f"duplicate id (first seen on row {first_row[rid]})"))
      labels.pop(rid, None)  # Conflicting duplicates are not trusted.
      continue
    first_row[rid] = rowno
    labels[rid] = int(raw)
  return labels, problems


def kaggle_records(data_dir: str, split: str, labels_csv: str | None = None,
                   skip_invalid: bool = False
                   ) -> tuple[list[Record], list[Problem]]:
  """Lists a split of the Kaggle layout, joining labels by id.

  Args:
    data_dir: directory holding `train/`, `test/` and `train_labels.csv`.
    split: "train" or "test" (any sub-directory name works).
    labels_csv: labels file; defaults to `<data_dir>/train_labels.csv` for
      the train split and none for other splits.
    skip_invalid: report invalid rows, ids without files and files without
      labels as problems instead of raising.

  Returns:
    (records sorted by id, problems).

  Raises:
    DataError: missing directory, or (unless skip_invalid) any label problem,
      naming the rows and files.
  """
  image_dir = os.path.join(data_dir, split)
  if not os.path.isdir(image_dir):
    raise DataError(f"{image_dir}: no such directory (expected the Kaggle "
                    f"layout <data_dir>/{split}/<id>.tif)")
  files = _list_images(image_dir)
  if labels_csv is None and split == "train":
    labels_csv = os.path.join(data_dir, LABELS_CSV)
  prefix = os.path.join(image_dir, "")
  if labels_csv is None:
    return [Record(_stem(n), prefix + n) for n in files], []

  labels, problems = read_labels_csv(labels_csv)
  # Set operations and inline stems: this join runs on 220k ids before any
  # tool can start working.
  by_id = {(n.rpartition(".")[0] or n): n for n in files}
  no_file = sorted(labels.keys() - by_id.keys())
  problem_ids = {p.id for p in problems}
  no_label = sorted(by_id.keys() - labels.keys() - problem_ids)
  problems += [Problem(i, labels_csv, "id has no image file") for i in no_file]
  problems += [Problem(i, os.path.join(image_dir, by_id[i]),
                       f"file has no label in {labels_csv}")
               for i in no_label]
  if problems and not skip_invalid:
    lines = [f"  {p.path}: {p.id}: {p.reason}" for p in problems[:20]]
    more = len(problems) - len(lines)
    raise DataError(
        f"{labels_csv}: {len(problems)} label problem(s) for {image_dir}:\n" +
        "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else "") +
        "\n(pass --skip_invalid to exclude them and list them in the report)")
  bad = {p.id for p in problems}
  records = [Record(i, prefix + by_id[i], labels[i])
             for i in sorted((by_id.keys() & labels.keys()) - bad)]
  return records, problems


def folder_records(data_dir: str, split: str) -> list[Record]:
  """Lists a class-folder split `<data_dir>/<split>/<label>/*`.

  Returns:
    records sorted by id, with ids "<label>/<stem>".

  Raises:
    DataError: missing split directory, a class folder that is not 0 or 1,
      or no images at all.
  """
  split_dir = os.path.join(data_dir, split)
  if not os.path.isdir(split_dir):
    raise DataError(f"{split_dir}: no such directory (expected "
                    f"<data_dir>/{split}/<label>/*.jpg|png|tif)")
  records = []
  with os.scandir(split_dir) as it:
    class_dirs = sorted(e.name for e in it if e.is_dir())
  for name in class_dirs:
    if name not in ("0", "1"):
      raise DataError(f"{os.path.join(split_dir, name)}: class folder must be "
                      f"named 0 or 1")
    d = os.path.join(split_dir, name)
    records += [Record(f"{name}/{_stem(n)}", os.path.join(d, n), int(name))
                for n in _list_images(d)]
  if not records:
    raise DataError(f"{split_dir}: no images found under 0/ or 1/")
  return sorted(records, key=lambda r: r.id)


def detect_layout(data_dir: str, split: str) -> str:
  """Returns LAYOUT_FOLDERS if `<data_dir>/<split>` has class folders."""
  split_dir = os.path.join(data_dir, split)
  if os.path.isdir(os.path.join(split_dir, "0")) or os.path.isdir(
      os.path.join(split_dir, "1")):
    return LAYOUT_FOLDERS
  return LAYOUT_KAGGLE


def list_records(data_dir: str, split: str, labels_csv: str | None = None,
                 skip_invalid: bool = False
                 ) -> tuple[list[Record], list[Problem], str]:
  """Lists a split in whichever layout `data_dir` uses.

  Returns:
    (records, problems, layout).

  Raises:
    DataError: see `kaggle_records` and `folder_records`.
  """
  layout = detect_layout(data_dir, split)
  # Listing creates a few objects per image and no cycles: the collector
  # would re-walk all of them again and again (~30% of the time).
  with parallel.gc_paused():
    if layout == LAYOUT_FOLDERS:
      return folder_records(data_dir, split), [], layout
    records, problems = kaggle_records(data_dir, split, labels_csv,
                                       skip_invalid)
  return records, problems, layout
