"""Where images come from: the Kaggle layout and class-folder layouts.

Both produce a list of `Record(id, path, label)`; everything downstream
(scanner, shard writer, predictor) consumes records and never globs itself.

  Kaggle:   <data_dir>/train/<id>.tif + <data_dir>/train_labels.csv
            <data_dir>/test/<id>.tif
  Folders:  <data_dir>/<split>/<label>/*.{tif,png,jpg}   (e.g. PCam exports)

An image's id is its file name without the extension (`image_files`, for
every layout); two files of one directory that would share an id (`a.tif`,
`a.png`) are refused or, where the caller allows it, reported and left out,
never silently merged or duplicated. In the folder layout a file name can
repeat across splits and classes, so the id is "<label>/<stem>", unique
within a split.

Every CSV with a header (labels, sample submission, submission, group CSV,
scan.csv) is opened by `open_csv`, so all accept a byte-order mark and name
the file and the missing column the same way.

Labels are joined to files by id, never by row position (the notebook dropped
the wrong rows that way).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
from typing import Iterable, Iterator, NamedTuple, Sequence

from hcd import text
from hcd.data import parallel
from hcd.data.decode import IMAGE_EXTS
from hcd.data.features import UNKNOWN_LABEL

LABELS_CSV = "train_labels.csv"
LAYOUT_KAGGLE = "kaggle"
LAYOUT_FOLDERS = "folders"
# The end of the label-problem error of the tools that have --skip_invalid
# (tools/scan_quality, tools/make_shards); see `kaggle_records`.
SKIP_INVALID_HINT = ("pass --skip_invalid to exclude them and list them in "
                     "the report")


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
  """A data problem that was skipped rather than raised.

  Attributes:
    id, path: the image (or the labels CSV row) at fault.
    reason: what is wrong, readable.
    kind: what sort of problem, the prefix of the reason in a shard
      manifest: "label" (a labels CSV row, a file without a label, an id
      without a file) or "id" (files sharing an id).
  """
  id: str
  path: str
  reason: str
  kind: str = "label"


class DataError(ValueError):
  """Bad source data; the message names the file and rows at fault."""


def image_files(directory: str
                ) -> tuple[dict[str, str], dict[str, list[str]]]:
  """Lists the image files of a directory by id: the one file name -> id map.

  An image's id is its file name without the extension. Every layout lists
  through here (Kaggle, class folders, a plain folder of images), so ids are
  derived one way and two files that would get the same id (`a.tif` and
  `a.png`) are always caught instead of one silently replacing the other.

  Args:
    directory: the directory (not searched recursively); names ending in an
      image extension (any case) that are regular files count.

  Returns:
    (names, shared), in no particular order: `names` maps each id that
    exactly one file has to that file's name; `shared` maps each id that
    several files have to their names, sorted. A shared id is not in
    `names`: which file it means cannot be known.

  Raises:
    OSError: the directory cannot be listed.
    DataError: a file name is not valid UTF-8 (an id is stored as UTF-8
      text in the shards, the manifest and the submission); names them.
  """
  with os.scandir(directory) as it:
    listed = [e.name for e in it
              if e.name.lower().endswith(IMAGE_EXTS) and e.is_file()]
  undecodable = [n for n in listed if not _is_utf8(n)]
  if undecodable:
    shown = ", ".join(ascii(os.fsencode(n)) for n in undecodable[:20])
    more = len(undecodable) - min(len(undecodable), 20)
    raise DataError(
        f"{directory}: {len(undecodable)} file name(s) are not valid UTF-8, "
        f"so they cannot be ids: {shown}{f' and {more} more' if more else ''}"
        f" (rename them, e.g. with `convmv -f latin1 -t utf8`)")
  # Listed names always end in an image extension; rpartition is ~3x faster
  # than os.path.splitext, which matters for 220k files.
  stems = [n.rpartition(".")[0] or n for n in listed]
  names = dict(zip(stems, listed))
  if len(names) == len(listed):
    return names, {}
  # Rare, so only now find out which ids repeat.
  by_id: dict[str, list[str]] = {}
  for stem, name in zip(stems, listed):
    by_id.setdefault(stem, []).append(name)
  shared = {i: sorted(ns) for i, ns in sorted(by_id.items()) if len(ns) > 1}
  for i in shared:
    del names[i]
  return names, shared


def _is_utf8(name: str) -> bool:
  """Whether a listed name was valid UTF-8 on disk (no surrogate escapes)."""
  if name.isascii():  # Every Kaggle name; the fast path for 220k files.
    return True
  try:
    name.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _shared_reason(image_id: str, names: list[str]) -> str:
  return (f"{len(names)} files share the id {image_id!r}: "
          f"{', '.join(map(text.shown, names))}")


def _shared_ids_error(directory: str, shared: dict[str, list[str]],
                      hint: str | None = None) -> DataError:
  """The error naming the files that share an id (see `image_files`)."""
  lines = [f"{directory}: {_shared_reason(i, ns)}"
           for i, ns in list(shared.items())[:20]]
  if len(shared) > len(lines):
    lines.append(f"... and {len(shared) - len(lines)} more ids shared by "
                 f"several files")
  lines.append("(an image's id is its file name without the extension, so "
               "it must be unique: rename or remove all but one file of each"
               + (f"; or {hint}" if hint else "") + ")")
  return DataError("\n".join(lines))


def image_records(directory: str, id_prefix: str = "",
                  label: int = UNKNOWN_LABEL) -> list[Record]:
  """The images of one directory as records (see `image_files`).

  Args:
    directory: the directory.
    id_prefix: put before each id (e.g. "1/" for a class folder).
    label: every image's label.

  Returns:
    Records sorted by id (possibly none).

  Raises:
    DataError: several files share an id, naming them.
    OSError: the directory cannot be listed.
  """
  names, shared = image_files(directory)
  if shared:
    raise _shared_ids_error(directory, shared)
  prefix = os.path.join(directory, "")
  return [Record(id_prefix + i, prefix + names[i], label)
          for i in sorted(names)]


def _quoted(items: Iterable[str], last: str) -> str:
  """'a', 'b' <last> 'c'."""
  items = [repr(i) for i in items]
  return (f"{', '.join(items[:-1])} {last} {items[-1]}" if len(items) > 1
          else "".join(items))


@contextlib.contextmanager
def open_csv(path: str, columns: Sequence[str], what: str,
             error: type[Exception] = DataError
             ) -> Iterator[tuple[Iterator[list[str]], list[str]]]:
  """Opens a CSV file with a header row: the one way hcd reads one.

  The file is read as UTF-8 with an optional byte-order mark (spreadsheet
  programs often save one; read as plain UTF-8 it would turn `id` into
  `\\ufeffid`), and the header cells are stripped of spaces.

  Args:
    path: the CSV file.
    columns: the columns the header must name (in any order, among others).
    what: what the file is, for messages (e.g. "labels CSV").
    error: the exception type to raise, so that a caller's own error type
      (and its callers' handlers) stay as they were; DataError by default.

  Yields:
    (reader, header): a csv.reader positioned after the header (its
    `line_num` is the physical line of the last row read, as an editor
    numbers it), and the stripped header cells.

  Raises:
    error: the file cannot be opened; a column is missing (naming the file,
      the missing columns and the header found); or, while it is read
      inside the `with` block, the file is not valid CSV (naming the line)
      or not UTF-8 text.
  """
  try:
    f = open(path, newline="", encoding="utf-8-sig")
  except OSError as e:
    raise error(f"{path}: cannot read {what}: {e.strerror}") from None
  with f:
    reader = csv.reader(f)
    try:
      header = [c.strip() for c in next(reader, [])]
      missing = [c for c in columns if c not in header]
      if missing:
        raise error(
            f"{path}: missing column(s) {missing}: header {header} has no "
            f"{_quoted(missing, 'or')} column (a {what} needs a header "
            f"naming {_quoted(columns, 'and')})")
      yield reader, header
    except csv.Error as e:
      raise error(f"{path}:{reader.line_num}: malformed {what}: {e}"
                  ) from None
    except UnicodeDecodeError as e:
      # No line: the file is decoded a block at a time, ahead of the rows.
      raise error(f"{path}: malformed {what}: not UTF-8 text: {e}") from None


def cells(reader, *columns: int, strip: bool = True
          ) -> Iterator[tuple[int, list[str]]]:
  """The non-blank rows of an `open_csv` reader, by physical line.

  Args:
    reader: the reader `open_csv` yields.
    *columns: positions of the cells wanted (from its header).
    strip: strip spaces from the cells (False: keep them exactly as
      written, e.g. ids in a file hcd wrote itself).

  Yields:
    (line, cells): the row's physical line, as an editor numbers it, and
    its cells at `columns` ("" where the row is too short).
  """
  for row in reader:
    if not row:  # A blank line.
      continue
    got = [row[c] if len(row) > c else "" for c in columns]
    yield reader.line_num, [c.strip() for c in got] if strip else got


_LABEL_COLUMNS = ("id", "label")
_LABELS_WHAT = "labels CSV"
_LABEL_VALUES = {"0": 0, "1": 1}


def read_labels_csv(path: str) -> tuple[dict[str, int], list[Problem]]:
  """Reads and validates a Kaggle labels CSV (`id,label`).

  Args:
    path: the CSV file.

  Returns:
    (labels by id, problems) where problems lists rows that are invalid
    (duplicate ids, labels outside {0,1}). Raising on them is the caller's
    choice (see `kaggle_records`).

  Raises:
    DataError: unreadable or malformed file, or missing `id`/`label`
      columns.
  """
  with open_csv(path, _LABEL_COLUMNS, _LABELS_WHAT) as (reader, header):
    fast = _parse_valid_labels(reader, header.index("id"),
                               header.index("label"))
  if fast is not None:
    return fast, []
  # Some row has a problem: reread row by row to name each one.
  with open_csv(path, _LABEL_COLUMNS, _LABELS_WHAT) as (reader, header):
    return _parse_labels(path, reader, header.index("id"),
                         header.index("label"))


def _parse_valid_labels(reader, i_id: int, i_label: int
                        ) -> dict[str, int] | None:
  """Labels by id if no row has a problem, else None (see `_parse_labels`).

  The common case in whole-list operations, ~3x faster than the row-by-row
  loop of `_parse_labels`, which names the rows at fault.
  """
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


def _parse_labels(path: str, reader, i_id: int, i_label: int
                  ) -> tuple[dict[str, int], list[Problem]]:
  labels: dict[str, int] = {}
  problems: list[Problem] = []
  first_row: dict[str, int] = {}
  for rowno, (rid, raw) in cells(reader, i_id, i_label):
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
                   skip_invalid: bool = False,
                   skip_hint: str | None = SKIP_INVALID_HINT
                   ) -> tuple[list[Record], list[Problem]]:
  """Lists a split of the Kaggle layout, joining labels by id.

  Over 60 lines only for documenting each argument.

  Args:
    data_dir: directory holding `train/`, `test/` and `train_labels.csv`.
    split: "train" or "test" (any sub-directory name works).
    labels_csv: labels file; defaults to `<data_dir>/train_labels.csv` for
      the train split and none for other splits.
    skip_invalid: report invalid rows, ids without files, files without
      labels and files sharing an id (`a.tif`, `a.png`) as problems, and
      leave those ids out, instead of raising.
    skip_hint: how the caller's user asks for `skip_invalid` (it ends the
      error's message, in parentheses); None when the caller has no way to.

  Returns:
    (records sorted by id, problems).

  Raises:
    DataError: missing directory, or (unless skip_invalid) files sharing an
      id or any label problem, naming the rows and files.
  """
  image_dir = os.path.join(data_dir, split)
  if not os.path.isdir(image_dir):
    raise DataError(f"{image_dir}: no such directory (expected the Kaggle "
                    f"layout <data_dir>/{split}/<id>.tif)")
  by_id, shared = image_files(image_dir)
  if shared and not skip_invalid:
    raise _shared_ids_error(image_dir, shared, skip_hint)
  prefix = os.path.join(image_dir, "")
  shared_problems = [Problem(i, prefix + n, _shared_reason(i, names), "id")
                     for i, names in shared.items() for n in names]
  if labels_csv is None and split == "train":
    labels_csv = os.path.join(data_dir, LABELS_CSV)
  if labels_csv is None:
    return ([Record(i, prefix + by_id[i]) for i in sorted(by_id)],
            shared_problems)

  labels, problems = read_labels_csv(labels_csv)
  # Set operations: this join runs on 220k ids before any tool can start
  # working. A shared id has its files (and its own problems) already.
  no_file = sorted(labels.keys() - by_id.keys() - shared.keys())
  problem_ids = {p.id for p in problems}
  no_label = sorted(by_id.keys() - labels.keys() - problem_ids)
  problems += [Problem(i, labels_csv, "id has no image file") for i in no_file]
  problems += [Problem(i, prefix + by_id[i],
                       f"file has no label in {labels_csv}")
               for i in no_label]
  if problems and not skip_invalid:
    lines = [f"  {text.shown(p.path)}: {text.shown(p.id)}: {p.reason}"
             for p in problems[:20]]
    more = len(problems) - len(lines)
    raise DataError(
        f"{labels_csv}: {len(problems)} label problem(s) for {image_dir}:\n" +
        "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else "") +
        (f"\n({skip_hint})" if skip_hint else ""))
  bad = {p.id for p in problems}
  records = [Record(i, prefix + by_id[i], labels[i])
             for i in sorted((by_id.keys() & labels.keys()) - bad)]
  return records, problems + shared_problems


def folder_records(data_dir: str, split: str) -> list[Record]:
  """Lists a class-folder split `<data_dir>/<split>/<label>/*`.

  Returns:
    records sorted by id, with ids "<label>/<stem>".

  Raises:
    DataError: missing split directory, a class folder that is not 0 or 1,
      files of one class folder sharing an id (`a.tif`, `a.png`), or no
      images at all.
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
    records += image_records(os.path.join(split_dir, name), f"{name}/",
                             int(name))
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
                 skip_invalid: bool = False,
                 skip_hint: str | None = SKIP_INVALID_HINT
                 ) -> tuple[list[Record], list[Problem], str]:
  """Lists a split in whichever layout `data_dir` uses.

  Args:
    data_dir: the data directory.
    split: the split (a sub-directory of data_dir).
    labels_csv: see `kaggle_records`.
    skip_invalid: see `kaggle_records` (the class-folder layout has no label
      problems; files sharing an id there always raise).
    skip_hint: see `kaggle_records`.

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
                                       skip_invalid, skip_hint)
  return records, problems, layout
