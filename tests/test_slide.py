"""Tests for whole-slide inference (hcd_slide, hcd.eval.slide*).

Generated slides (tiled pyramidal TIFFs, hcd.eval.slide_synth) test what
the real slide cannot: several levels and the level chosen, a known tumour
region in level-0 coordinates, no tissue, no resolution, resuming a killed
run and splitting a set over workers. The real Aperio slide in
../shared/data/wsi runs end to end through the `hcd_slide` command, beside
broken files that must each be one error line.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hcd import rundir
from hcd.eval import slide
from hcd.eval import slide_grid
from hcd.eval import slide_outputs
from hcd.eval import slide_read

import evalutil
import slideutil

CMU = evalutil.SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
  return slideutil.colour_run(tmp_path_factory.mktemp("run") / "colour")


@pytest.fixture(scope="module")
def tumour_svs(tmp_path_factory):
  return slideutil.tumour_slide(tmp_path_factory.mktemp("slides") /
                                "tumour.tif")


def _cfg(**kw):
  kw.setdefault("progress", False)
  return slide.SlideConfig(**kw)


def _run(run, paths, out, **kw):
  lines = []
  workers = {k: kw.pop(k) for k in ("num_workers", "worker_index",
                                    "labels") if k in kw}
  result = slide.run_slides([rundir.model_file(run)], [str(p) for p in paths],
                            str(out), _cfg(**kw), log=lines.append,
                            **workers)
  return result, lines


def test_otsu_separates_tissue_and_blank_has_none():
  view = np.full((40, 60, 3), 245, np.uint8)
  view[10:30, 5:25] = slideutil.PINK
  view[5:15, 40:55] = slideutil.PURPLE
  mask = slide_grid.tissue_mask(view)
  want = np.zeros((40, 60), bool)
  want[10:30, 5:25] = want[5:15, 40:55] = True
  np.testing.assert_array_equal(mask, want)
  assert not slide_grid.tissue_mask(np.full((8, 8, 3), 250, np.uint8)).any()


def test_blocks_hold_every_kept_tile_once_at_its_corner():
  mask = np.random.default_rng(0).random((60, 50)) > 0.6
  grid = slide_grid.make_grid(400, 480, 32, mask, 0.3)
  assert (grid.rows, grid.cols) == ((480 - 96) // 32 + 1, (400 - 96) // 32 + 1)
  blocks = slide_grid.make_blocks(grid, 5)
  cells = slide_grid.plan_cells(blocks)
  assert len(cells) == len(set(cells.tolist())) == grid.keep.sum() > 50
  np.testing.assert_array_equal(np.sort(cells), grid.kept)
  for b in blocks:
    i, j = np.divmod(b.cells, grid.cols)
    np.testing.assert_array_equal(b.box[1] + b.offsets[:, 0], i * 32)
    np.testing.assert_array_equal(b.box[0] + b.offsets[:, 1], j * 32)
  # Tissue fraction = mask pixels under the tile (8 target px per pixel).
  i, j = divmod(int(grid.kept[3]), grid.cols)
  under = mask[i * 4:i * 4 + 12, j * 4:j * 4 + 12]
  assert grid.tissue[i, j] == pytest.approx(under.mean())


def test_level_closest_to_the_target_is_read(tumour_svs):
  s = slide_read.open_slide(tumour_svs)
  assert s.level_count == 3
  mpp = slide_read.slide_mpp(s, tumour_svs)
  assert mpp == pytest.approx(0.25, rel=1e-4)
  g = slide_read.plan_geometry(s, mpp, 0.972)
  assert (g.level, g.level_downsample) == (2, 4.0)
  assert g.level_per_target == pytest.approx(0.972, rel=1e-4)
  assert g.level0_per_target == pytest.approx(3.888, rel=1e-4)
  g = slide_read.plan_geometry(s, mpp, 0.5)
  assert (g.level, g.level_per_target) == (1, 1.0)
  # A tie (2x finer, 2x coarser) reads the finer level, downsampled.
  g = slide_read.plan_geometry(s, mpp, 0.5 ** 0.5)  # 0.5 and 1.0: a tie.
  assert g.level == 1
  assert g.level_per_target == pytest.approx(2 ** 0.5)
  # --mpp wins over the metadata.
  assert slide_read.slide_mpp(s, tumour_svs, 0.3) == 0.3


def test_known_tumour_region_in_level0_coordinates(tmp_path, colour_run,
                                                   tumour_svs):
  # The colour model gives 0.72 to a tile half pink, half purple: at that
  # threshold a region's edge is where the tissue changes.
  result, lines = _run(colour_run, [tumour_svs], tmp_path, threshold=0.72)
  assert not result.failed and "tumour:" in lines[0]
  d = tmp_path / "tumour"
  s = json.loads((d / "summary.json").read_text())
  assert s["level"] == 2 and s["tissue_tiles"] > 500
  with open(d / "tiles.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == s["tissue_tiles"]
  xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
  size = float(rows[0]["size"])
  assert size == pytest.approx(96 * 3.888, abs=0.01)
  prob = np.array([float(r["prob"]) for r in rows])
  c = xy + size / 2  # Tile centres, level 0.
  # Tiles whose every pixel lies in the tumour (a margin of one patch, the
  # 96-px cells the slide is drawn in) score high, tiles far from it low.
  tx0, ty0, tx1, ty1 = 1600, 1000, 3000, 2000
  half = size / 2 + 48
  inside = ((c[:, 0] - half >= tx0) & (c[:, 0] + half <= tx1) &
            (c[:, 1] - half >= ty0) & (c[:, 1] + half <= ty1))
  in_tissue = ((xy >= 400).all(1) & (xy[:, 0] + size <= 3600) &
               (xy[:, 1] + size <= 3200))  # No white background in the tile.
  outside = in_tissue & (
      (c[:, 0] + half < tx0) | (c[:, 0] - half > tx1) |
      (c[:, 1] + half < ty0) | (c[:, 1] - half > ty1))
  assert inside.sum() > 20 and outside.sum() > 200
  assert prob[inside].min() > 0.9 and prob[outside].max() < 0.3
  # No tile outside the tissue box; none outside the slide.
  assert (xy.min(0) >= 400 - size).all() and (xy + size <= [4000, 3600]).all()
  # One region, around the tumour box (within a tile).
  geo = json.loads((d / "regions.geojson").read_text())
  assert len(geo["features"]) == 1 and s["regions"] == 1
  ring = np.array(geo["features"][0]["geometry"]["coordinates"][0])
  assert (ring[0] == ring[-1]).all()
  np.testing.assert_allclose([*ring.min(0), *ring.max(0)],
                             [tx0, ty0, tx1, ty1], atol=size / 2 + 48)
  # Drawn in 96-px patches: the purple ones span x 1552-2992, y 976-2032.
  area = 1440 * 1056 * 0.25 ** 2 / 1e6
  assert s["tumour_area_mm2"] == pytest.approx(area, rel=0.1)
  heat = np.load(d / "heatmap.npy")
  assert heat.shape == tuple(s["heatmap_shape"])
  assert np.isfinite(heat).sum() == s["tissue_tiles"]
  assert np.nanmax(heat) == pytest.approx(s["score_max"])
  for name in ("heatmap.png", "overlay.png", "tissue_mask.png"):
    assert (d / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not [p for p in os.listdir(d) if ".tmp-" in p or p == ".parts"]


def test_blank_slide_has_no_tiles_and_no_score(tmp_path, colour_run):
  path = slideutil.blank_slide(tmp_path / "blank.tif")
  result, _ = _run(colour_run, [path], tmp_path / "out")
  s = result.summaries[0]
  assert s["tissue_tiles"] == 0 and s["score_max"] is None
  assert np.isnan(np.load(tmp_path / "out" / "blank" / "heatmap.npy")).all()


def test_no_resolution_refused_by_name_unless_mpp(tmp_path, colour_run):
  path = str(tmp_path / "nores.tif")
  shutil.copy(slideutil.tumour_slide(tmp_path / "x.tif", mpp=None,
                                     size=(1600, 1200),
                                     tissue=(0, 0, 1600, 1200),
                                     tumour=(0, 0, 0, 0),
                                     downsamples=(1,)), path)
  result, lines = _run(colour_run, [path], tmp_path / "a")
  assert result.failed and lines == [
      f"error: {path}: no resolution (microns per pixel) in the slide's "
      f"metadata; pass --mpp=<microns per level-0 pixel> if you know it "
      f"(e.g. 0.25 for 40x, 0.5 for 20x)"]
  assert not os.path.exists(tmp_path / "a" / "nores")
  result, _ = _run(colour_run, [path], tmp_path / "b", mpp=0.486)
  s = result.summaries[0]
  assert s["mpp"] == 0.486 and s["level_downsample"] == 1.0
  # 1600 px at 0.486 um/px = 800 px at 0.972: (800 - 96) // 32 + 1 columns.
  assert s["heatmap_shape"] == [(600 - 96) // 32 + 1, (800 - 96) // 32 + 1]


def test_corrupt_tile_mid_slide_is_one_line_and_the_next_slide_goes_on(
    tmp_path, colour_run, tumour_svs):
  """A tile that fails while reader threads are busy: no abort, one line."""
  import tifffile  # pylint: disable=g-import-not-at-top
  path = slideutil.tumour_slide(tmp_path / "bad.tif",
                                downsamples=(1, 2, 4, 16))
  with tifffile.TiffFile(path) as t:  # Level 2 is read for the tiles.
    page = t.pages[2]
    k = len(page.dataoffsets) // 2
    start, count = page.dataoffsets[k], page.databytecounts[k]
  data = bytearray(open(path, "rb").read())
  data[start + 20:start + count] = bytes(count - 20)
  open(path, "wb").write(data)
  result, lines = _run(colour_run, [path, tumour_svs], tmp_path / "out")
  assert [s["slide"] for s in result.summaries] == ["tumour"]
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1 and "\n" not in errors[0]
  assert errors[0].startswith(f"error: {path}: cannot read a region of the "
                              f"slide (")
  assert errors[0].endswith("truncated or corrupt: copy it again")


class _Killed(Exception):
  pass


def test_killed_run_resumes_from_its_chunks(tmp_path, colour_run,
                                            tumour_svs, monkeypatch):
  kw = dict(batch_size=16, chunk_tiles=20, stride=96)
  full, _ = _run(colour_run, [tumour_svs], tmp_path / "full", **kw)
  want = (tmp_path / "full" / "tumour" / "tiles.csv").read_text()
  plan = slide.plan_slide(str(tumour_svs), _cfg(**kw))
  sizes = np.cumsum([sum(len(plan.blocks[b].cells) for b in c)
                     for c in plan.chunks])
  # Killed while predicting the batch after the first chunk's last one.
  kill_at = sizes[0] // 16 + 2
  saved = int((sizes <= (kill_at - 1) * 16).sum())
  assert 1 <= saved < len(sizes)
  real = slide.predict.make_predict_fn
  calls = []

  def dying(*a, **k):
    fn = real(*a, **k)

    def step(batch):
      calls.append(1)
      if len(calls) == kill_at:
        raise _Killed()
      return fn(batch)
    return step

  monkeypatch.setattr(slide.predict, "make_predict_fn", dying)
  out = tmp_path / "resumed"
  with pytest.raises(_Killed):
    _run(colour_run, [tumour_svs], out, **kw)
  d = out / "tumour"
  assert sorted(os.listdir(d)) == [".parts"]  # Nothing under a final name.
  assert sorted(os.listdir(d / ".parts")) == [
      f"part-{k:05d}.npy" for k in range(saved)] + ["plan.json"]
  monkeypatch.setattr(slide.predict, "make_predict_fn", real)
  result, lines = _run(colour_run, [tumour_svs], out, **kw)
  assert "(resumed)" in lines[0]
  assert result.summaries[0]["resumed_chunks"] == saved
  assert (d / "tiles.csv").read_text() == want
  assert not (d / ".parts").exists()
  # Finished: a rerun skips it; other settings start it over.
  _, lines = _run(colour_run, [tumour_svs], out, **kw)
  assert "already done" in lines[0]
  _, lines = _run(colour_run, [tumour_svs], out, **dict(kw, stride=64))
  assert "already done" not in lines[0] and "(resumed)" not in lines[0]
  assert full.summaries[0]["tissue_tiles"] == sizes[-1]


def test_workers_share_the_set_and_merge_joins_them(tmp_path, colour_run,
                                                    tumour_svs, monkeypatch):
  paths = []
  for k in range(3):
    paths.append(tmp_path / f"s{k}.tif")
    os.symlink(tumour_svs, paths[-1])
  paths.append(slideutil.blank_slide(tmp_path / "s3.tif"))
  out = tmp_path / "out"
  labels = {"s0": 1, "s1": 1, "s2": 0, "s3": 0}
  monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
  r1, _ = _run(colour_run, paths, out, num_workers=2, labels=labels)
  monkeypatch.delenv("JOB_COMPLETION_INDEX")
  r0, _ = _run(colour_run, paths, out, num_workers=2, worker_index=0)
  assert r1.worker_index == 1 and r0.metrics is None
  assert sorted(s["slide"] for s in r0.summaries) == ["s0", "s2"]
  assert sorted(s["slide"] for s in r1.summaries) == ["s1", "s3"]
  assert os.path.basename(r1.rows_csv) == "slides-worker-1-of-2.csv"
  csv_path, metrics = slide.merge(str(out), labels)
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["slide"] for r in rows] == ["s0", "s1", "s2", "s3"]
  assert [r["label"] for r in rows] == ["1", "1", "0", "0"]
  # s0-s2 are one slide: the AUC is that of (high, high, high, none).
  assert metrics["num_slides"] == 3 and metrics["unlabelled"] == ["s3"]
  assert metrics["roc_auc"] == 0.5
  # hcd_report --slides_dirs shows the AUC and the rows.
  md = open(slide_outputs.write_slides_report([str(out)],
                                              str(tmp_path / "rep"))).read()
  assert "Slide-level ROC-AUC (score_max): 0.5000 over 3" in md
  assert all(f"| s{k} | {labels[f's{k}']} |" in md for k in range(4))
  with pytest.raises(ValueError, match="worker_index must be in"):
    slide.worker_share(paths, 2, 2)


def test_slides_from_a_csv_or_pattern_and_labels_checked(tmp_path):
  (tmp_path / "a").mkdir()
  for name in ("x.svs", "y.svs"):
    (tmp_path / "a" / name).write_text("")
  (tmp_path / "set.csv").write_text("path,label\na/y.svs,1\na/x.svs,0\n")
  assert slide.list_slides(str(tmp_path / "set.csv")) == [
      str(tmp_path / "a" / "y.svs"), str(tmp_path / "a" / "x.svs")]
  assert slide.list_slides(str(tmp_path / "a" / "*.svs")) == [
      str(tmp_path / "a" / "x.svs"), str(tmp_path / "a" / "y.svs")]
  with pytest.raises(ValueError, match="matches no file"):
    slide.list_slides(str(tmp_path / "*.ndpi"))
  with pytest.raises(ValueError, match="same name"):
    slide.check_names(["a/x.svs", "b/x.tif"])
  labels = tmp_path / "labels.csv"
  labels.write_text("slide,label\na/x.svs,1\ny,0\n")
  assert slide.read_labels(str(labels)) == {"x": 1, "y": 0}
  labels.write_text("slide,label\nx,yes\n")
  with pytest.raises(ValueError, match="line 2: label 'yes' is not 0 or 1"):
    slide.read_labels(str(labels))


def test_bad_settings_name_the_flag():
  for kw, flag in [({"stride": 0}, "--stride"), ({"tta": 3}, "--tta"),
                   ({"min_tissue": 1.5}, "--min_tissue"),
                   ({"target_mpp": -1.0}, "--target_mpp")]:
    with pytest.raises(ValueError, match=flag):
      slide.check_config(_cfg(**kw))


@pytest.mark.skipif(not CMU.is_file(), reason=evalutil.NO_SHARED)
def test_cli_real_slide_end_to_end_and_bad_files_one_line_each(
    tmp_path, colour_run):
  """hcd_slide on the real Aperio slide, beside three broken files."""
  d = tmp_path / "slides"
  d.mkdir()
  os.symlink(CMU, d / "cmu.svs")
  (d / "notes.svs").write_text("not a slide\n")
  good = slideutil.tumour_slide(tmp_path / "t.tif", size=(2000, 1600),
                                tissue=(0, 0, 2000, 1600))
  data = open(good, "rb").read()
  (d / "truncated.tif").write_bytes(data[:len(data) // 3])
  shutil.copy(slideutil.blank_slide(tmp_path / "b.tif", mpp=None),
              d / "nores.tif")
  labels = tmp_path / "labels.csv"
  labels.write_text("slide,label\ncmu,1\n")
  out = tmp_path / "out"
  r = subprocess.run(
      [sys.executable, "-c", "from hcd.cli.slide_main import run; run()",
       f"--workdir={colour_run}", f"--slides={d}/*", f"--out_dir={out}",
       "--tta=2", "--noprogress", f"--labels_csv={labels}"],
      capture_output=True, text=True, env=evalutil.ENV, timeout=240)
  assert r.returncode == 1, r.stderr
  errors = [l for l in r.stderr.splitlines() if "hcd_slide: error:" in l]
  assert len(errors) == 4, r.stderr
  for name, words in [("notes.svs", "not a slide format"),
                      ("truncated.tif", "truncated or corrupt"),
                      ("nores.tif", "pass --mpp")]:
    assert any(f"{d / name}: " in l and words in l for l in errors), errors
  assert "3 of 4 slide(s) failed" in errors[-1]
  s = json.loads((out / "cmu" / "summary.json").read_text())
  assert s["level"] == 0 and s["mpp"] == pytest.approx(0.499)
  # 2220 x 2967 px at 0.499 um/px is 1139 x 1523 px at 0.972.
  assert s["heatmap_shape"] == [(1523 - 96) // 32 + 1, (1139 - 96) // 32 + 1]
  assert 300 < s["tissue_tiles"] < s["grid_tiles"]
  assert sorted(os.listdir(out)) == ["cmu", "slide_metrics.json",
                                     "slides.csv"]
  # One labelled slide: no AUC, and the reason.
  metrics = json.loads((out / "slide_metrics.json").read_text())
  assert metrics["roc_auc"] is None and "one class" in metrics["why"]
  with open(out / "slides.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["slide"], r["label"]) for r in rows] == [("cmu", "1")]
  assert "cmu: " in r.stdout and "tiles/s" in r.stdout
