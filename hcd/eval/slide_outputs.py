"""The files hcd_slide writes for a slide, and the table of all slides.

Per slide, under `<out_dir>/<slide name>/`, each written atomically
(temporary name, then rename; hcd.fileio):

  tiles.csv        x,y,size,prob: tile corner and side in level-0 pixels,
                   probability of tumour, one row per tissue tile
  heatmap.npy      float32 [rows, cols], one cell per stride step, NaN
                   where no tile was predicted (no tissue)
  heatmap.png      the same, coloured
  overlay.png      the heatmap over a low-resolution view of the slide
  tissue_mask.png  the tissue mask (white: tissue), one pixel per 8 target
                   pixels
  regions.geojson  polygons around cells at or above the threshold, level-0
                   coordinates (QuPath: File > Import objects)
  summary.json     slide score and counts; written last, so its presence
                   means the slide is finished

and for the set, `slides.csv` (one row per slide; a worker of several
writes `slides-worker-<i>-of-<n>.csv`, joined by `merge_rows`) and, with
labels, `slide_metrics.json` with the slide-level ROC-AUC. hcd_report
--slides_dirs shows both (`write_slides_report`).
"""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import Sequence

import numpy as np

from hcd import fileio
from hcd import plots
from hcd.eval import slide_grid

SLIDE_COLUMNS = ("slide", "path", "score_max", "score_topk_mean",
                 "tumour_area_mm2", "tissue_tiles", "tumour_tiles",
                 "tiles_per_s", "seconds", "label")
SLIDES_CSV = "slides.csv"
METRICS_JSON = "slide_metrics.json"
# Largest side of the overlay's background image, in pixels: the figure is
# 800 px wide, and matplotlib holds several float copies of the image while
# it resamples (a 3,000-px view of a 100k-px slide cost ~0.3 GiB more).
OVERLAY_MAX_PX = 1000


def _num(v: float) -> str:
  """A level-0 coordinate: an integer where it is one, else 2 decimals."""
  r = round(float(v), 2)
  return str(int(r)) if r == int(r) else f"{r:.2f}"


def write_tiles_csv(path: str, cells: np.ndarray, probs: np.ndarray,
                    cols: int, stride: int, level0_per_target: float) -> None:
  """Writes tiles.csv (x,y,size,prob) for the predicted cells.

  Args:
    path: the CSV.
    cells: flat grid indices, ascending.
    probs: probability of each cell's tile.
    cols: grid columns.
    stride: target pixels between tiles.
    level0_per_target: level-0 pixels per target pixel.
  """
  f = level0_per_target
  size = _num(slide_grid.TILE * f)
  rows = [("x", "y", "size", "prob")]
  for cell, p in zip(cells.tolist(), probs.tolist()):
    i, j = divmod(cell, cols)
    rows.append((_num(j * stride * f), _num(i * stride * f), size, repr(p)))
  fileio.atomic_write_csv(path, rows)


def heatmap_array(rows: int, cols: int, cells: np.ndarray,
                  probs: np.ndarray) -> np.ndarray:
  """float32 [rows, cols]: probabilities at `cells`, NaN elsewhere."""
  heat = np.full(rows * cols, np.nan, np.float32)
  heat[cells] = probs
  return heat.reshape(rows, cols)


def save_npy(path: str, array: np.ndarray) -> None:
  """np.save, atomically."""
  with fileio.atomic_path(path, suffix=".npy") as tmp:
    np.save(tmp, array)


def save_mask_png(path: str, mask: np.ndarray) -> None:
  """The tissue mask as an 8-bit PNG (255 tissue, 0 not), atomically."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with fileio.atomic_path(path, suffix=".png") as tmp:
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp)


def _figure(figsize):
  """A matplotlib Figure on the Agg canvas (no pyplot), as hcd.plots."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=figsize, dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _cell_extent(rows: int, cols: int, stride: int):
  """imshow extent (target px) of the cells' centre squares."""
  pad = (slide_grid.TILE - stride) / 2
  return (pad, pad + cols * stride, pad + rows * stride, pad)


def plot_heatmap(path: str, heat: np.ndarray, title: str) -> str:
  """heatmap.png: probabilities coloured, no-tissue cells blank."""
  fig = _figure((7, 7 * heat.shape[0] / max(heat.shape[1], 1) + 0.5))
  ax = fig.add_subplot()
  im = ax.imshow(np.ma.masked_invalid(heat), cmap="inferno", vmin=0, vmax=1,
                 interpolation="nearest")
  fig.colorbar(im, ax=ax, shrink=0.8, label="probability of tumour")
  ax.set_title(title)
  ax.set_axis_off()
  return plots.save_png(fig, path)


def plot_overlay(path: str, view: np.ndarray, heat: np.ndarray, stride: int,
                 title: str) -> str:
  """overlay.png: the heatmap (half transparent) over the slide's view."""
  step = max(1, -(-max(view.shape[:2]) // OVERLAY_MAX_PX))
  view = view[::step, ::step]
  cell = slide_grid.MASK_CELL * step  # Target px per view pixel.
  h, w = view.shape[:2]
  fig = _figure((8, 8 * h / max(w, 1) + 0.5))
  ax = fig.add_subplot()
  ax.imshow(view, extent=(0, w * cell, h * cell, 0), interpolation="nearest")
  im = ax.imshow(np.ma.masked_invalid(heat), cmap="inferno", vmin=0, vmax=1,
                 alpha=0.5, interpolation="nearest",
                 extent=_cell_extent(*heat.shape, stride))
  ax.set_xlim(0, w * cell)
  ax.set_ylim(h * cell, 0)
  fig.colorbar(im, ax=ax, shrink=0.8, label="probability of tumour")
  ax.set_title(title)
  ax.set_axis_off()
  return plots.save_png(fig, path)


def region_polygons(heat: np.ndarray, threshold: float, stride: int,
                    level0_per_target: float) -> list[list[list]]:
  """Polygons around heatmap cells at or above `threshold`.

  contourpy (matplotlib's contouring engine) traces the filled region
  z >= threshold of the heatmap, sampled at the tiles' centres; no-tissue
  cells count as 0.

  Args:
    heat: the heatmap (NaN: no tissue).
    threshold: probability of a tumour cell.
    stride: target pixels between cells.
    level0_per_target: level-0 pixels per target pixel.

  Returns:
    GeoJSON polygon coordinates: per polygon, its outer ring then its
    holes, each a closed list of [x, y] in level-0 pixels.
  """
  import contourpy  # pylint: disable=g-import-not-at-top
  z = np.nan_to_num(heat.astype(np.float64), nan=0.0)
  if z.size == 0 or not (z >= threshold).any():
    return []
  # Zero border: every region closes inside the slide.
  z = np.pad(z, 1)
  centre = slide_grid.TILE / 2
  xs = ((np.arange(z.shape[1]) - 1) * stride + centre) * level0_per_target
  ys = ((np.arange(z.shape[0]) - 1) * stride + centre) * level0_per_target
  gen = contourpy.contour_generator(
      xs, ys, z, fill_type=contourpy.FillType.OuterOffset)
  points, offsets = gen.filled(threshold, max(2.0, float(z.max()) + 1))
  polygons = []
  for pts, offs in zip(points, offsets):
    rings = [np.round(pts[a:b], 2).tolist()
             for a, b in zip(offs[:-1], offs[1:])]
    polygons.append([r + [r[0]] if r[0] != r[-1] else r for r in rings])
  return polygons


def write_geojson(path: str, polygons: list, threshold: float) -> None:
  """regions.geojson: one QuPath annotation feature per polygon."""
  features = [{
      "type": "Feature",
      "geometry": {"type": "Polygon", "coordinates": rings},
      "properties": {"objectType": "annotation",
                     "classification": {"name": "Tumor",
                                        "color": [200, 0, 0]},
                     "threshold": threshold},
  } for rings in polygons]
  fileio.atomic_write_text(path, json.dumps(
      {"type": "FeatureCollection", "features": features}))


def slide_scores(probs: np.ndarray, threshold: float, top_k: int,
                 cell_mm2: float) -> dict:
  """The slide's score, top-k mean and tumour area from its tile probs."""
  if not len(probs):
    return {"score_max": None, "score_topk_mean": None,
            "tumour_area_mm2": 0.0, "tumour_tiles": 0}
  top = np.sort(probs)[::-1][:top_k]
  tumour = int((probs >= threshold).sum())
  return {"score_max": float(top[0]), "score_topk_mean": float(top.mean()),
          "tumour_area_mm2": tumour * cell_mm2, "tumour_tiles": tumour}


def write_rows(path: str, summaries: Sequence[dict],
               labels: dict | None = None) -> str:
  """Writes one row per slide summary (SLIDE_COLUMNS), atomically."""
  rows = [SLIDE_COLUMNS]
  for s in sorted(summaries, key=lambda s: s["slide"]):
    s = dict(s, label=(labels or {}).get(s["slide"], ""))
    rows.append(tuple("" if s.get(c) is None else s.get(c)
                      for c in SLIDE_COLUMNS))
  fileio.atomic_write_csv(path, rows)
  return path


def read_rows(path: str) -> list[dict]:
  """The rows of a slides CSV."""
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def worker_csv(out_dir: str, index: int, num: int) -> str:
  """Where worker `index` of `num` writes its rows."""
  if num == 1:
    return os.path.join(out_dir, SLIDES_CSV)
  return os.path.join(out_dir, f"slides-worker-{index}-of-{num}.csv")


def merge_rows(out_dir: str, joined: bool = True) -> list[dict]:
  """Joins the workers' rows (or the single slides.csv) of an out_dir.

  Args:
    out_dir: an hcd_slide --out_dir.
    joined: take slides.csv when it is at least as new as every worker's
      rows (`hcd_slide --merge` wrote it from them, with labels); False:
      always join the workers' rows when there are any.

  Raises:
    FileNotFoundError: no rows file in out_dir.
  """
  parts = sorted(glob.glob(os.path.join(out_dir, "slides-worker-*.csv")))
  single = os.path.join(out_dir, SLIDES_CSV)
  if os.path.isfile(single) and (not parts or joined and all(
      os.path.getmtime(single) >= os.path.getmtime(p) for p in parts)):
    parts = [single]
  if not parts:
    raise FileNotFoundError(2, "no slides.csv or slides-worker-*.csv (run "
                            "hcd_slide first)", out_dir)
  rows = {}
  for p in parts:
    for r in read_rows(p):
      rows[r["slide"]] = r
  return [rows[k] for k in sorted(rows)]


def slide_auc(rows: Sequence[dict], labels: dict) -> dict:
  """Slide-level ROC-AUC of score_max (the Camelyon16 slide metric).

  Args:
    rows: slide rows (`merge_rows` or summaries).
    labels: slide name -> 0/1.

  Returns:
    {"roc_auc", "num_slides", "num_positive", "unlabelled", "score"}; the
    AUC is None (with "why") when the labelled slides hold one class only.
  """
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  y, s, unlabelled = [], [], []
  for r in rows:
    if r["slide"] in labels and r.get("score_max") not in (None, ""):
      y.append(int(labels[r["slide"]]))
      s.append(float(r["score_max"]))
    else:
      unlabelled.append(r["slide"])
  out = {"roc_auc": None, "num_slides": len(y), "num_positive": sum(y),
         "unlabelled": unlabelled, "score": "score_max"}
  if len(set(y)) < 2:
    out["why"] = "the labelled slides hold one class only"
  else:
    out["roc_auc"] = float(metrics.roc_auc_score(y, s))
  return out


def _fmt(value, fmt: str) -> str:
  try:
    return fmt.format(float(value))
  except (TypeError, ValueError):
    return "-"


def slides_markdown(out_dir: str) -> str:
  """A markdown section for one hcd_slide --out_dir: AUC and slide table.

  Raises:
    FileNotFoundError: no rows in out_dir.
  """
  rows = merge_rows(out_dir)
  lines = [f"## Slides: {out_dir}", ""]
  path = os.path.join(out_dir, METRICS_JSON)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      m = json.load(f)
    auc = _fmt(m.get("roc_auc"), "{:.4f}")
    lines += [f"Slide-level ROC-AUC ({m.get('score')}): {auc} over "
              f"{m.get('num_slides')} labelled slides "
              f"({m.get('num_positive')} with tumour)"
              + (f"; {m['why']}" if m.get("why") else ""), ""]
  lines += ["| slide | label | max | top-k mean | tumour mm² | tissue tiles "
            "| tiles/s |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['slide']} | {r.get('label') or '-'} | "
        f"{_fmt(r['score_max'], '{:.3f}')} | "
        f"{_fmt(r['score_topk_mean'], '{:.3f}')} | "
        f"{_fmt(r['tumour_area_mm2'], '{:.3f}')} | {r['tissue_tiles']} | "
        f"{_fmt(r['tiles_per_s'], '{:.0f}')} |")
  return "\n".join(lines) + "\n"


def write_slides_report(out_dirs: Sequence[str], report_dir: str) -> str:
  """Writes <report_dir>/slides.md for hcd_slide output folders.

  Returns:
    The path written.

  Raises:
    FileNotFoundError: a folder without rows (named).
  """
  path = os.path.join(report_dir, "slides.md")
  os.makedirs(report_dir, exist_ok=True)
  fileio.atomic_write_text(path, "\n".join(
      slides_markdown(d) for d in out_dirs))
  return path
