"""Run directories (written by hcd_train) and saved models, read-only.

A run directory holds `config.json`, `history.csv`/`history.json`,
`metrics.json`, `best.keras` and `model.keras` (see CONTRACTS / WORKSPACE).
Models are loaded with `keras.saving.load_model(safe_mode=True)`: hcd models
contain only standard Keras layers, so nothing arbitrary is deserialised.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any, Sequence

from hcd.data.features import IMAGE_SHAPE

# --model=best|final -> file in the run directory.
MODEL_FILES = {"best": "best.keras", "final": "model.keras"}


class RunError(ValueError):
  """A missing or unusable run directory or model; names the path."""


def model_file(workdir: str, which: str = "best") -> str:
  """Returns the path of a run's saved model.

  Args:
    workdir: the run directory.
    which: "best" (best.keras, best validation AUC) or "final" (model.keras).

  Returns:
    The existing .keras path.

  Raises:
    RunError: unknown `which`, missing run directory, or missing model file
      (the message lists the .keras files the run does have).
  """
  if which not in MODEL_FILES:
    raise RunError(f"unknown model choice {which!r}; choose one of "
                   f"{sorted(MODEL_FILES)}")
  if not os.path.isdir(workdir):
    raise RunError(f"{workdir}: run directory does not exist")
  path = os.path.join(workdir, MODEL_FILES[which])
  if not os.path.isfile(path):
    have = sorted(f for f in os.listdir(workdir) if f.endswith(".keras"))
    other = "final" if which == "best" else "best"
    if MODEL_FILES[other] in have:
      hint = f"; it has {have} (try --model={other})"
    elif have:
      hint = f"; it has {have} (pass one with --model_path)"
    else:
      hint = "; it has no .keras model (did training finish?)"
    raise RunError(f"{path}: no {which} model in run {workdir}{hint}")
  return path


def resolve_model_paths(workdirs: Sequence[str] = (),
                        model_paths: Sequence[str] = (),
                        which: str = "best") -> list[str]:
  """Resolves run directories and .keras files to a list of model files.

  Args:
    workdirs: run directories (each contributes its `which` model).
    model_paths: .keras files given directly.
    which: "best" or "final".

  Returns:
    Model paths, runs first, in the order given.

  Raises:
    RunError: nothing given, or any run/model that does not exist.
  """
  paths = [model_file(w, which) for w in workdirs]
  for p in model_paths:
    if not os.path.isfile(p):
      raise RunError(f"{p}: model file does not exist")
    if not p.endswith(".keras"):
      raise RunError(f"{p}: expected a .keras model file")
    paths.append(p)
  if not paths:
    raise RunError("no model given: pass a run directory (--workdir) or a "
                   ".keras file (--model_path)")
  return paths


def check_model(model, name: str = "model") -> None:
  """Checks a model maps uint8 [B, 96, 96, 3] to probabilities [B, 1].

  Raises:
    RunError: naming the model and the mismatching input or output.
  """
  inputs = getattr(model, "inputs", None) or []
  if len(inputs) != 1:
    raise RunError(f"{name}: expected one input, found {len(inputs)}")
  shape = tuple(inputs[0].shape[1:])
  dtype = str(getattr(inputs[0], "dtype", ""))
  if shape != IMAGE_SHAPE or "uint8" not in dtype:
    raise RunError(f"{name}: input is {dtype} {shape}; hcd models take uint8 "
                   f"{IMAGE_SHAPE} (raw pixels, rescaled inside the model)")
  out = tuple(model.outputs[0].shape[1:]) if getattr(model, "outputs",
                                                       None) else None
  if out != (1,):
    raise RunError(f"{name}: output shape {out}; expected (1,), the "
                   f"probability of tumour")


def load_model(path: str):
  """Loads a .keras model in safe mode and checks its signature.

  Args:
    path: a .keras file.

  Returns:
    The keras.Model (not compiled).

  Raises:
    RunError: missing file, a file Keras cannot load (or that needs unsafe
      deserialisation), or a model that is not uint8 -> probability.
  """
  import keras  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise RunError(f"{path}: model file does not exist")
  try:
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
  except Exception as e:  # Keras raises many types for a bad archive.
    raise RunError(f"{path}: cannot load model in Keras safe mode: "
                   f"{type(e).__name__}: {e}") from None
  check_model(model, path)
  return model


@dataclasses.dataclass
class Run:
  """What a run directory records (missing parts are empty)."""
  workdir: str
  config: dict[str, Any]
  history: list[dict[str, Any]]
  metrics: dict[str, Any]


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise RunError(f"{path}: invalid JSON: {e}") from None


def _number(v):
  """CSV cell -> int/float/None, leaving other strings alone."""
  if v is None or v == "":
    return None
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(
      v).lower() else f


def _history_rows(obj, path: str) -> list[dict[str, Any]]:
  # Accept rows, {"history": rows} and Keras-style {"metric": [values]}.
  if isinstance(obj, dict) and isinstance(obj.get("history"), list):
    obj = obj["history"]
  if isinstance(obj, dict):
    n = {len(v) for v in obj.values() if isinstance(v, list)}
    if len(n) != 1:
      raise RunError(f"{path}: history columns have unequal lengths")
    rows = [{k: v[i] for k, v in obj.items()} for i in range(n.pop())]
    for i, r in enumerate(rows):
      r.setdefault("epoch", i + 1)
    return rows
  if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
    return obj
  raise RunError(f"{path}: expected a list of per-epoch rows")


def read_config(workdir: str) -> dict[str, Any]:
  """Returns a run's config.json ({} when it has none).

  Raises:
    RunError: missing run directory or invalid JSON.
  """
  if not os.path.isdir(workdir):
    raise RunError(f"{workdir}: run directory does not exist")
  path = os.path.join(workdir, "config.json")
  return _read_json(path) if os.path.isfile(path) else {}


def read_history(workdir: str) -> list[dict[str, Any]]:
  """Reads a run's per-epoch history (history.json, else history.csv).

  Returns:
    One dict per epoch ([] when the run has no history file).

  Raises:
    RunError: a history file that cannot be parsed.
  """
  jpath = os.path.join(workdir, "history.json")
  cpath = os.path.join(workdir, "history.csv")
  if os.path.isfile(jpath):
    return _history_rows(_read_json(jpath), jpath)
  if os.path.isfile(cpath):
    with open(cpath, newline="", encoding="utf-8") as f:
      return [{k: _number(v) for k, v in row.items()}
              for row in csv.DictReader(f)]
  return []


def read_run(workdir: str) -> Run:
  """Reads config.json, history and metrics.json of a run directory.

  Raises:
    RunError: missing directory, a directory with none of those files, or
      an unparsable file (named).
  """
  if not os.path.isdir(workdir):
    raise RunError(f"{workdir}: run directory does not exist")
  cfg_path = os.path.join(workdir, "config.json")
  met_path = os.path.join(workdir, "metrics.json")
  config = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
  metrics = _read_json(met_path) if os.path.isfile(met_path) else {}
  history = read_history(workdir)
  if not (config or metrics or history):
    raise RunError(f"{workdir}: not a run directory (no config.json, "
                   f"history.csv/json or metrics.json)")
  return Run(workdir, config, history, metrics)


def finite(v) -> float | None:
  """Returns v as a finite float, or None."""
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None
