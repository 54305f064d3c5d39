"""Whole-slide inference: a patch model's tumour heatmap of every slide.

  run_slides(model_paths, slide_paths, out_dir, SlideConfig(tta=8))

For each slide: open it (hcd.eval.slide_read), find tissue on a
low-resolution view, lay the tile grid at the model's resolution
(hcd.eval.slide_grid), predict every kept tile through a tf.data pipeline
whose region reads overlap the model (hcd.eval.slide_pipeline) with the
models, TTA and prediction step of hcd_predict (hcd.eval.predict), and write
the outputs (hcd.eval.slide_outputs).

Resuming. A slide's tiles are predicted in chunks of whole read blocks; each
finished chunk's probabilities are saved atomically under
`<slide>/.parts/`, beside a `plan.json` that records what they depend on
(models, TTA, resolution, grid, tissue settings). A rerun skips a slide
whose summary.json has the same fingerprint, continues a slide from its
saved chunks, and starts over when the settings changed. A bad slide is
one line naming the file and the reason; the other slides go on.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os
import time
from typing import Callable, Sequence

import numpy as np

from hcd import fileio
from hcd import progress as progress_lib
from hcd import rundir
from hcd.eval import predict
from hcd.eval import slide_grid
from hcd.eval import slide_outputs as outputs
from hcd.eval import slide_pipeline
from hcd.eval import slide_read
from hcd.eval.slide_read import SlideError

PARTS = ".parts"
WORKER_ENV = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")


@dataclasses.dataclass(frozen=True)
class SlideConfig:
  """How slides are tiled and predicted (hcd_slide's flags).

  Attributes:
    target_mpp: microns per pixel of the tiles (the model's resolution).
    mpp: level-0 microns per pixel for slides without one (None: refuse
      them).
    stride: target pixels between tiles.
    min_tissue: smallest tissue fraction of a predicted tile.
    threshold: probability from which a cell counts as tumour.
    batch_size: tiles per model batch.
    tta: dihedral views per model (1, 2, 4, 8).
    top_k: tiles averaged for score_topk_mean.
    chunk_tiles: tiles per resumable chunk.
    parallelism: blocks read at once (None: the CPU count).
    jit_compile: XLA-compile the prediction step.
    progress: show progress bars.
  """
  target_mpp: float = 0.972
  mpp: float | None = None
  stride: int = 32
  min_tissue: float = 0.1
  threshold: float = 0.5
  batch_size: int = 256
  tta: int = 1
  top_k: int = 10
  chunk_tiles: int = 4096
  parallelism: int | None = None
  jit_compile: bool = False
  progress: bool = True


def check_config(cfg: SlideConfig) -> None:
  """Checks the settings before any slide or model is read.

  Raises:
    ValueError: naming the flag, what is allowed and the value.
  """
  predict.tta_transforms(cfg.tta)
  checks = [
      ("target_mpp", cfg.target_mpp > 0, "a positive resolution in um/px"),
      ("mpp", cfg.mpp is None or cfg.mpp > 0, "a positive resolution"),
      ("stride", 1 <= cfg.stride <= 4 * slide_grid.TILE,
       f"target pixels between tiles, 1 to {4 * slide_grid.TILE}"),
      ("min_tissue", 0 <= cfg.min_tissue <= 1, "a fraction in [0, 1]"),
      ("threshold", 0 <= cfg.threshold <= 1, "a probability in [0, 1]"),
      ("batch_size", cfg.batch_size >= 1, "tiles per batch, >= 1"),
  ]
  for name, ok, what in checks:
    value = getattr(cfg, name)
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
      raise ValueError(f"--{name} must be {what}, got {value!r}")


def list_slides(spec: str) -> list[str]:
  """The slide files of --slides: a glob pattern or a CSV of paths.

  A CSV has a `path` (or `slide`) column, or paths in its first column;
  relative paths are taken from the CSV's folder.

  Raises:
    ValueError: nothing matches, or a CSV without paths.
  """
  if spec.lower().endswith(".csv") and os.path.isfile(spec):
    with open(spec, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
    head = [h.strip().lower() for h in rows[0]] if rows else []
    col = next((head.index(c) for c in ("path", "slide") if c in head), None)
    body = rows[1:] if col is not None else rows
    base = os.path.dirname(os.path.abspath(spec))
    paths = [os.path.join(base, r[col or 0].strip()) for r in body
             if r and r[col or 0].strip()]
    if not paths:
      raise ValueError(f"--slides={spec}: the CSV lists no slide paths (a "
                       f"'path' column, or paths in the first column)")
    return paths
  paths = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
  if not paths:
    raise ValueError(f"--slides={spec}: the pattern matches no file")
  return paths


def slide_name(path: str) -> str:
  """A slide's name: its file name without the extension."""
  return os.path.splitext(os.path.basename(path))[0]


def check_names(paths: Sequence[str]) -> None:
  """Refuses two slides whose outputs would share a folder.

  Raises:
    ValueError: naming both files.
  """
  seen = {}
  for p in paths:
    other = seen.setdefault(slide_name(p), p)
    if other != p:
      raise ValueError(f"{p} and {other} have the same name, so their "
                       f"outputs would share a folder; rename one")


def read_labels(path: str) -> dict[str, int]:
  """Slide labels from a CSV with columns slide,label (0 or 1).

  The slide column holds names (file names without extension) or paths.

  Raises:
    ValueError: no such columns or a label that is not 0/1, naming the row.
  """
  labels = {}
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not {"slide", "label"} <= set(reader.fieldnames or ()):
      raise ValueError(f"{path}: needs the columns slide,label, has "
                       f"{reader.fieldnames}")
    for n, row in enumerate(reader, 2):
      if row["label"].strip() not in ("0", "1"):
        raise ValueError(f"{path}: line {n}: label {row['label']!r} is not "
                         f"0 or 1")
      labels[slide_name(row["slide"].strip())] = int(row["label"])
  return labels


def worker_share(paths: Sequence[str], num_workers: int,
                 worker_index: int | None) -> tuple[list[str], int]:
  """The slides of one worker of several: every num_workers-th, sorted.

  Args:
    paths: every slide of the set.
    num_workers: hosts sharing the set.
    worker_index: this host's index; None: from JOB_COMPLETION_INDEX (a
      Kubernetes Indexed Job) or SLURM_ARRAY_TASK_ID (minus
      SLURM_ARRAY_TASK_MIN), else 0.

  Returns:
    (this worker's slides, its index).

  Raises:
    ValueError: an index outside [0, num_workers).
  """
  if num_workers < 1:
    raise ValueError(f"--num_workers must be >= 1, got {num_workers}")
  if worker_index is None:
    worker_index = 0
    for env in WORKER_ENV:
      if os.environ.get(env, "").strip():
        worker_index = int(os.environ[env])
        if env == "SLURM_ARRAY_TASK_ID":
          worker_index -= int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        break
  if not 0 <= worker_index < num_workers:
    raise ValueError(f"--worker_index must be in [0, {num_workers}) for "
                     f"--num_workers={num_workers}, got {worker_index}")
  return sorted(paths)[worker_index::num_workers], worker_index


def fingerprint(model_paths: Sequence[str], cfg: SlideConfig) -> dict:
  """What a slide's tile probabilities depend on (resume and skip check)."""
  models = []
  for p in model_paths:
    st = os.stat(p)
    models.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
  return {"models": models, "tta": cfg.tta, "target_mpp": cfg.target_mpp,
          "mpp": cfg.mpp, "stride": cfg.stride,
          "min_tissue": cfg.min_tissue, "chunk_tiles": cfg.chunk_tiles,
          "tile": slide_grid.TILE, "mask_cell": slide_grid.MASK_CELL}


@dataclasses.dataclass
class SlidePlan:
  """A slide opened and planned: what to read, in which chunks."""
  path: str
  slide: object
  geom: slide_read.Geometry
  view: np.ndarray
  mask: np.ndarray
  grid: slide_grid.Grid
  blocks: list
  chunks: list
  gate: slide_pipeline.ReadGate = dataclasses.field(
      default_factory=slide_pipeline.ReadGate)

  def close(self) -> None:
    """Closes the slide once no read of it is in flight."""
    self.gate.close()
    self.slide.close()


def plan_slide(path: str, cfg: SlideConfig) -> SlidePlan:
  """Opens a slide, finds its tissue and plans its tiles.

  Raises:
    SlideError: unreadable slide or no resolution (see slide_read).
  """
  slide = slide_read.open_slide(path)
  try:
    mpp0 = slide_read.slide_mpp(slide, path, cfg.mpp)
    geom = slide_read.plan_geometry(slide, mpp0, cfg.target_mpp)
    view = slide_read.low_res_view(slide, geom, slide_grid.MASK_CELL)
  except SlideError:
    slide.close()  # Nothing reads it in another thread yet.
    raise
  except Exception as e:  # OpenSlideError: a tile it cannot decode.
    slide.close()
    raise SlideError(f"{path}: cannot read the slide's pixels ({e}); the "
                     f"file may be truncated or corrupt: copy it again"
                     ) from None
  mask = slide_grid.tissue_mask(view)
  grid = slide_grid.make_grid(geom.width, geom.height, cfg.stride, mask,
                              cfg.min_tissue)
  per_side = slide_grid.block_cells(cfg.stride, geom.level_per_target)
  blocks = slide_grid.make_blocks(grid, per_side)
  return SlidePlan(path, slide, geom, view, mask, grid, blocks,
                   slide_grid.chunk_blocks(blocks, cfg.chunk_tiles))


def _part(parts_dir: str, k: int) -> str:
  return os.path.join(parts_dir, f"part-{k:05d}.npy")


def _open_parts(parts_dir: str, fp: dict, num_chunks: int) -> list[int]:
  """Prepares the chunk folder; returns the chunks still to predict."""
  state = os.path.join(parts_dir, "plan.json")
  want = dict(fp, num_chunks=num_chunks)
  if os.path.isfile(state):
    with open(state, encoding="utf-8") as f:
      if json.load(f) != want:  # Settings changed: the parts are stale.
        fileio.remove_path(parts_dir)
  os.makedirs(parts_dir, exist_ok=True)
  fileio.remove_stale_tmp(parts_dir)
  if not os.path.isfile(state):
    fileio.atomic_write_text(state, json.dumps(want))
  return [k for k in range(num_chunks) if not os.path.isfile(_part(parts_dir,
                                                                    k))]


def predict_chunks(plan: SlidePlan, parts_dir: str, todo: Sequence[int],
                   predict_fn: Callable, cfg: SlideConfig, bar) -> None:
  """Predicts the chunks `todo`, saving each as it completes.

  Raises:
    SlideError: a region OpenSlide cannot read (named with the slide).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  blocks = [plan.blocks[b] for k in todo for b in plan.chunks[k]]
  sizes = [sum(len(plan.blocks[b].cells) for b in plan.chunks[k])
           for k in todo]
  ds = slide_pipeline.tile_dataset(plan.slide, plan.geom, blocks,
                                   cfg.batch_size, cfg.parallelism, plan.gate)
  pending, current = [], 0
  try:
    for batch in ds:
      pending.append(predict_fn(batch).numpy().astype(np.float32))
      bar.update(len(pending[-1]))
      got = np.concatenate(pending)
      while current < len(todo) and len(got) >= sizes[current]:
        outputs.save_npy(_part(parts_dir, todo[current]), got[:sizes[current]])
        got = got[sizes[current]:]
        current += 1
      pending = [got]
  except tf.errors.OpError as e:
    cause = predict.pipeline_error_cause(e.message, "OpenSlideError")
    raise SlideError(f"{plan.path}: cannot read a region of the slide "
                     f"({cause}); the file may be truncated or corrupt: "
                     f"copy it again") from None


def finish_slide(plan: SlidePlan, probs: np.ndarray, slide_dir: str,
                 cfg: SlideConfig, extra: dict) -> dict:
  """Writes every output of a slide, summary.json last.

  Returns:
    The summary.
  """
  name = slide_name(plan.path)
  g, geom = plan.grid, plan.geom
  f0 = geom.level0_per_target
  # Probabilities arrive in block order; outputs are row-major.
  cells = slide_grid.plan_cells(plan.blocks)
  order = np.argsort(cells, kind="stable")
  cells, probs = cells[order], probs[order]
  outputs.write_tiles_csv(os.path.join(slide_dir, "tiles.csv"), cells, probs,
                          g.cols, g.stride, f0)
  heat = outputs.heatmap_array(g.rows, g.cols, cells, probs)
  outputs.save_npy(os.path.join(slide_dir, "heatmap.npy"), heat)
  outputs.save_mask_png(os.path.join(slide_dir, "tissue_mask.png"), plan.mask)
  outputs.plot_heatmap(os.path.join(slide_dir, "heatmap.png"), heat, name)
  outputs.plot_overlay(os.path.join(slide_dir, "overlay.png"), plan.view,
                       heat, g.stride, name)
  polygons = outputs.region_polygons(heat, cfg.threshold, g.stride, f0)
  outputs.write_geojson(os.path.join(slide_dir, "regions.geojson"), polygons,
                        cfg.threshold)
  cell_mm2 = (g.stride * cfg.target_mpp / 1000) ** 2
  summary = dict(
      slide=name, path=os.path.abspath(plan.path),
      **outputs.slide_scores(probs, cfg.threshold, cfg.top_k, cell_mm2),
      top_k=cfg.top_k, threshold=cfg.threshold, grid_tiles=g.rows * g.cols,
      tissue_tiles=len(cells), regions=len(polygons), mpp=geom.mpp0,
      level=geom.level, level_downsample=geom.level_downsample,
      level0_dimensions=list(plan.slide.dimensions),
      heatmap_shape=[g.rows, g.cols], **extra)
  rundir.write_json(os.path.join(slide_dir, "summary.json"), summary)
  return summary


def process_slide(path: str, out_dir: str, predict_fn: Callable,
                  cfg: SlideConfig, fp: dict) -> tuple[dict, str]:
  """One slide end to end (or nothing, when it is already finished).

  Returns:
    (summary, "done" | "skipped" | "resumed").

  Raises:
    SlideError: a slide that cannot be used (named, with a remedy).
  """
  slide_dir = os.path.join(out_dir, slide_name(path))
  done = os.path.join(slide_dir, "summary.json")
  if os.path.isfile(done):
    with open(done, encoding="utf-8") as f:
      summary = json.load(f)
    if summary.get("fingerprint") == fp:
      return summary, "skipped"
  t0 = time.perf_counter()
  plan = plan_slide(path, cfg)
  try:
    return _predict_planned(plan, slide_dir, predict_fn, cfg, fp, t0)
  finally:
    plan.close()


def _predict_planned(plan: SlidePlan, slide_dir: str, predict_fn: Callable,
                     cfg: SlideConfig, fp: dict, t0: float
                     ) -> tuple[dict, str]:
  """process_slide's prediction and outputs, for an opened slide."""
  path = plan.path
  parts_dir = os.path.join(slide_dir, PARTS)
  todo = _open_parts(parts_dir, fp, len(plan.chunks))
  total = len(slide_grid.plan_cells(plan.blocks))
  resumed = len(todo) < len(plan.chunks)
  with progress_lib.bar(total=total, unit="tile", desc=slide_name(path),
                        enabled=cfg.progress, leave=False) as bar:
    bar.update(total - sum(len(plan.blocks[b].cells) for k in todo
                           for b in plan.chunks[k]))
    predict_chunks(plan, parts_dir, todo, predict_fn, cfg, bar)
  probs = np.concatenate([np.load(_part(parts_dir, k))
                          for k in range(len(plan.chunks))] or
                         [np.zeros(0, np.float32)]).astype(np.float64)
  seconds = time.perf_counter() - t0
  predicted = sum(len(plan.blocks[b].cells) for k in todo
                  for b in plan.chunks[k])
  summary = finish_slide(plan, probs, slide_dir, cfg, {
      "seconds": seconds, "tiles_per_s": predicted / seconds,
      "resumed_chunks": len(plan.chunks) - len(todo), "tta": cfg.tta,
      "stride": cfg.stride, "target_mpp": cfg.target_mpp,
      "min_tissue": cfg.min_tissue, "fingerprint": fp})
  fileio.remove_path(parts_dir)
  return summary, "resumed" if resumed else "done"


@dataclasses.dataclass
class SetResult:
  """What run_slides did.

  Attributes:
    summaries: one per finished slide of this worker (skipped ones too).
    failed: (path, one-line reason) per slide that could not be used.
    rows_csv: this worker's rows file.
    metrics: the slide-level AUC (slide_outputs.slide_auc) when labels
      were given and this is the only worker, else None.
    worker_index: this worker's index.
  """
  summaries: list
  failed: list
  rows_csv: str
  metrics: dict | None
  worker_index: int


def run_slides(model_paths: Sequence[str], slide_paths: Sequence[str],
               out_dir: str, cfg: SlideConfig,
               labels: dict[str, int] | None = None, num_workers: int = 1,
               worker_index: int | None = None,
               log: Callable[[str], None] = print) -> SetResult:
  """Predicts this worker's share of the slides; a bad slide is skipped.

  Args:
    model_paths: .keras files (several: an ensemble, averaged).
    slide_paths: every slide of the set (each worker takes its share).
    out_dir: where `<slide name>/` folders and the rows file go.
    cfg: the SlideConfig.
    labels: slide name -> 0/1, for the slide-level AUC.
    num_workers: hosts sharing the set.
    worker_index: this host's index (None: from the environment).
    log: receives one line per slide: what was done, or why not.

  Returns:
    A SetResult.

  Raises:
    ValueError: bad settings or worker index, or two slides sharing a
      name (before any model is loaded).
    hcd.rundir.RunError: a model that does not load.
  """
  check_config(cfg)
  check_names(slide_paths)
  mine, index = worker_share(slide_paths, num_workers, worker_index)
  models = [predict.load_model(p) for p in model_paths]
  fn = predict.make_predict_fn(models, cfg.tta, cfg.jit_compile)
  fp = fingerprint(model_paths, cfg)
  os.makedirs(out_dir, exist_ok=True)
  fileio.remove_stale_tmp(out_dir)
  summaries, failed = [], []
  with progress_lib.bar(mine, unit="slide", desc="slides",
                        enabled=cfg.progress) as bar:
    for path in bar:
      try:
        summary, how = process_slide(path, out_dir, fn, cfg, fp)
      except (SlideError, OSError) as e:
        reason = (f"{e.filename or path}: {e.strerror}"
                  if isinstance(e, OSError) and e.strerror else str(e))
        failed.append((path, reason))
        log(f"error: {reason}")
        continue
      summaries.append(summary)
      log(_slide_line(summary, how, out_dir))
  rows_csv = outputs.worker_csv(out_dir, index, num_workers)
  outputs.write_rows(rows_csv, summaries, labels)
  metrics = None
  if labels and num_workers == 1:
    metrics = write_metrics(out_dir, summaries, labels)
  return SetResult(summaries, failed, rows_csv, metrics, index)


def _slide_line(s: dict, how: str, out_dir: str) -> str:
  where = os.path.join(out_dir, s["slide"])
  if how == "skipped":
    return f"{s['slide']}: already done ({where}/summary.json); skipped"
  score = "n/a" if s["score_max"] is None else f"{s['score_max']:.3f}"
  return (f"{s['slide']}: {s['tissue_tiles']} tissue tiles, max "
          f"{score}, tumour {s['tumour_area_mm2']:.3f} mm2, "
          f"{s['tiles_per_s']:.0f} tiles/s"
          + (" (resumed)" if how == "resumed" else "") + f" -> {where}/")


def write_metrics(out_dir: str, rows: Sequence[dict],
                  labels: dict[str, int]) -> dict:
  """Writes slide_metrics.json (slide-level ROC-AUC); returns it."""
  metrics = outputs.slide_auc(rows, labels)
  rundir.write_json(os.path.join(out_dir, outputs.METRICS_JSON), metrics)
  return metrics


def merge(out_dir: str, labels: dict[str, int] | None = None
          ) -> tuple[str, dict | None]:
  """Joins the workers' rows into slides.csv (and the AUC, with labels).

  Returns:
    (slides.csv path, metrics or None).

  Raises:
    FileNotFoundError: no rows in out_dir.
  """
  rows = outputs.merge_rows(out_dir, joined=False)
  path = os.path.join(out_dir, outputs.SLIDES_CSV)
  fileio.atomic_write_csv(path, [outputs.SLIDE_COLUMNS] + [
      [r.get(c, "") if c != "label" or not labels else
       labels.get(r["slide"], "") for c in outputs.SLIDE_COLUMNS]
      for r in rows])
  return path, (write_metrics(out_dir, rows, labels) if labels else None)
