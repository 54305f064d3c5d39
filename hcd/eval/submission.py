"""The Kaggle submission: `id,label` with label the probability of tumour.

The notebook's two mistakes are made impossible here: labels are written as
probabilities at full precision (AUC needs the ranking; rounding to 0/1
throws it away), and rows are matched to ids by id, in the order of
`sample_submission.csv`, never by file-listing position. Any missing, extra
or duplicate id refuses the write with the ids listed.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from hcd import fileio
from hcd import text
from hcd.data import sources

HEADER = ("id", "label")
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
# The split a Kaggle sample submission lists the ids of.
SAMPLE_SPLIT = "test"


class SubmissionError(ValueError):
  """An invalid submission; the message lists the offending ids or rows."""


def _listing(items: Sequence[str], limit: int = 10) -> str:
  items = list(items)
  head = ", ".join(map(text.shown, items[:limit]))
  return head + (f" (+{len(items) - limit} more)" if len(items) > limit
                 else "")


def duplicates(ids: Sequence[str]) -> list[str]:
  """Returns the ids that occur more than once, in first-occurrence order."""
  seen, dup = set(), {}
  for i in ids:
    if i in seen:
      dup[i] = None
    seen.add(i)
  return list(dup)


def read_sample_ids(path: str) -> list[str]:
  """Reads the ids of a sample submission, in its order.

  Args:
    path: a CSV with an `id` column (Kaggle's sample_submission.csv).

  Returns:
    The ids.

  Raises:
    SubmissionError: unreadable or malformed file, no `id` column, empty
      ids (row numbers), duplicates or no rows.
  """
  with sources.open_csv(path, ("id",), "sample submission",
                        SubmissionError) as (reader, header):
    ids, empty = [], []
    # sources.cells: blank lines skipped, rows named by their physical line,
    # as in every other CSV hcd reads.
    for line, (rid,) in sources.cells(reader, header.index("id")):
      if not rid:
        empty.append(str(line))
      ids.append(rid)
  if empty:
    raise SubmissionError(f"{path}: empty id on row(s) {_listing(empty)}")
  if not ids:
    raise SubmissionError(f"{path}: no rows")
  dup = duplicates(ids)
  if dup:
    raise SubmissionError(f"{path}: {len(dup)} duplicate id(s): "
                          f"{_listing(dup)}")
  return ids


def kaggle_sample_submission(data_dir: str | None, split: str) -> str | None:
  """The sample submission a Kaggle-layout data directory ships, if any.

  Args:
    data_dir: the --data_dir predicted from (None: none).
    split: the split predicted.

  Returns:
    `<data_dir>/sample_submission.csv` when it exists and the split is the
    Kaggle layout's test split (the one that file lists); else None.
  """
  if not data_dir or split != SAMPLE_SPLIT:
    return None
  path = os.path.join(data_dir, SAMPLE_SUBMISSION_CSV)
  if (not os.path.isfile(path) or
      not os.path.isdir(os.path.join(data_dir, split)) or
      sources.detect_layout(data_dir, split) != sources.LAYOUT_KAGGLE):
    return None
  return path


def check_ids(ids: Sequence[str], expected: Sequence[str] | None) -> None:
  """Checks predicted ids are exactly the expected ones, each once.

  Args:
    ids: ids that have predictions.
    expected: the sample submission's ids (None: only duplicates checked).

  Raises:
    SubmissionError: listing duplicate, missing and extra ids.
  """
  errors = []
  dup = duplicates(ids)
  if dup:
    errors.append(f"{len(dup)} duplicate id(s): {_listing(dup)}")
  if expected is not None:
    have, want = set(ids), set(expected)
    missing = [i for i in expected if i not in have]
    extra = [i for i in ids if i not in want]
    if missing:
      errors.append(f"{len(missing)} missing id(s) (in the sample submission, "
                    f"not predicted): {_listing(missing)}")
    if extra:
      errors.append(f"{len(extra)} extra id(s) (predicted, not in the sample "
                    f"submission): {_listing(extra)}")
  if errors:
    counts = f"{len(ids)} ids predicted" + (
        f", {len(expected)} expected" if expected is not None else "")
    raise SubmissionError(f"submission refused ({counts}):\n  " +
                          "\n  ".join(errors))


def check_probs(ids: Sequence[str], probs) -> np.ndarray:
  """Checks there is one finite probability in [0, 1] per id.

  Returns:
    probs as float64 [n].

  Raises:
    SubmissionError: length mismatch, or NaN/out-of-range values (ids
      listed).
  """
  probs = np.asarray(probs, dtype=np.float64).reshape(-1)
  if len(probs) != len(ids):
    raise SubmissionError(f"{len(ids)} ids but {len(probs)} probabilities")
  bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
  if bad.any():
    idx = np.nonzero(bad)[0]
    raise SubmissionError(
        f"{len(idx)} probabilit(y/ies) not a number in [0, 1]: " +
        _listing([f"{ids[i]}={probs[i].item()!r}" for i in idx]))
  return probs


def order_like(ids: Sequence[str], probs, expected: Sequence[str] | None
               ) -> tuple[list[str], np.ndarray]:
  """Validates and reorders predictions to the expected id order.

  Args:
    ids: predicted ids (any order).
    probs: their probabilities.
    expected: sample submission ids, or None to keep the given order.

  Returns:
    (ids, probs) in the expected order.

  Raises:
    SubmissionError: see check_ids and check_probs.
  """
  probs = check_probs(ids, probs)
  check_ids(ids, expected)
  if expected is None:
    return list(ids), probs
  pos = {i: k for k, i in enumerate(ids)}
  order = np.fromiter((pos[i] for i in expected), np.int64, len(expected))
  return list(expected), probs[order]


def write_submission(path: str, ids: Sequence[str], probs,
                     expected: Sequence[str] | None = None) -> str:
  """Validates, orders and atomically writes a submission CSV.

  Probabilities are written with `repr` (shortest exact float64 text), so
  nothing is rounded; an id holding a comma, quote or line break is quoted
  (the csv module), so `read_submission` reads back exactly these rows.

  Args:
    path: the CSV to write (its directory is created).
    ids: predicted ids.
    probs: their probabilities.
    expected: the sample submission's ids and order (None: keep order).

  Returns:
    path.

  Raises:
    SubmissionError: invalid ids or probabilities; nothing is written.
  """
  ids, probs = order_like(ids, probs, expected)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fileio.atomic_write_csv(path, [HEADER] + [
      (i, repr(float(p))) for i, p in zip(ids, probs)])
  return path


def read_submission(path: str) -> tuple[list[str], np.ndarray]:
  """Reads a submission CSV back: (ids, probabilities).

  Args:
    path: the submission CSV (a byte-order mark is allowed).

  Returns:
    (ids, probabilities float64 [n]), in file order.

  Raises:
    SubmissionError: missing or malformed file, wrong header, or a label
      that is not a number (row named).
  """
  ids, probs = [], []
  with sources.open_csv(path, HEADER, "submission",
                        SubmissionError) as (reader, header):
    if tuple(header) != HEADER:
      raise SubmissionError(f"{path}: header {header}, expected "
                            f"{list(HEADER)}")
    for line, (rid, label, extra) in sources.cells(reader, 0, 1, 2,
                                                   strip=False):
      if extra:
        raise SubmissionError(f"{path}:{line}: expected 2 columns, got more")
      try:
        probs.append(float(label))
      except ValueError:
        raise SubmissionError(f"{path}:{line}: label {label!r} is not a "
                              f"number") from None
      ids.append(rid)
  return ids, np.asarray(probs, np.float64)


def validate_submission(path: str, expected: Sequence[str] | None = None
                        ) -> dict:
  """Validates a written submission file against the sample's ids/order.

  Args:
    path: the submission CSV.
    expected: the sample submission's ids (None: ids only checked unique).

  Returns:
    A summary: num_rows, min, max, mean, num_distinct, rounded (True when
    every label is exactly 0 or 1, which wastes the AUC metric).

  Raises:
    SubmissionError: header, id set, id order or probability problems.
  """
  ids, probs = read_submission(path)
  check_probs(ids, probs)
  check_ids(ids, expected)
  if expected is not None and list(ids) != list(expected):
    first = next(k for k, (a, b) in enumerate(zip(ids, expected)) if a != b)
    raise SubmissionError(f"{path}: ids are not in the sample submission's "
                          f"order (first difference at row {first + 2}: "
                          f"{text.shown(ids[first])} vs "
                          f"{text.shown(expected[first])})")
  return {
      "num_rows": len(ids),
      "min": float(probs.min()) if len(probs) else None,
      "max": float(probs.max()) if len(probs) else None,
      "mean": float(probs.mean()) if len(probs) else None,
      "num_distinct": int(len(np.unique(probs))),
      "rounded": bool(len(probs) and np.isin(probs, (0.0, 1.0)).all()),
  }
