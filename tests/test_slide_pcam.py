"""Whole-slide coordinates proven on real PCam patches (issue 30, item 5).

A slide is made of real PCam patches from ../shared/data/pcam96_jpeg/valid,
laid out in a grid at 0.486 um/px (every patch upsampled 2x) with the
0.972 um/px level present, stored losslessly. hcd_slide at --stride=96
must give every tile exactly the probability hcd_evaluate gives the patch
it covers (same model, same TTA; float tolerance), and the same AUC. The
patches are placed in a shuffled order in a grid that is not square, and
each differs from the others, so a transposed, shifted or mis-scaled grid
reads other pixels and fails; the test checks that it would.
"""

import os

import numpy as np
import pytest
from sklearn import metrics

from hcd import rundir
from hcd.data import decode
from hcd.eval import evaluate
from hcd.eval import inputs
from hcd.eval import slide
from hcd.eval import slide_synth

import evalutil

VALID = evalutil.SHARED_DATA / "pcam96_jpeg" / "valid"
ROWS, COLS = 6, 8  # 48 patches, 24 of each class.
TTA = 8


@pytest.mark.skipif(not VALID.is_dir(), reason=evalutil.NO_SHARED)
def test_slide_tiles_equal_hcd_evaluate_on_the_patches(tmp_path):
  run = evalutil.make_run(str(tmp_path / "tiny"), evalutil.tiny_model())
  model = rundir.model_file(run)
  n = ROWS * COLS
  files = [(VALID / str(c) / f) for c in (0, 1)
           for f in sorted(os.listdir(VALID / str(c)))[:n // 2]]
  labels = np.repeat([0, 1], n // 2)
  # hcd_evaluate's input: the patches under new names p00..p47, so its ids
  # say which patch is which.
  for k, (f, y) in enumerate(zip(files, labels)):
    folder = tmp_path / "data" / "valid" / str(y)
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(f, folder / f"p{k:02d}.jpg")
  source = inputs.open_source(data_dir=str(tmp_path / "data"), split="valid",
                              batch_size=32, progress=False)
  met = evaluate.evaluate([model], source, str(tmp_path / "eval"), TTA,
                          progress=False)
  ids, _, eval_probs = rundir.read_predictions(
      str(tmp_path / "eval" / rundir.EVAL_PREDICTIONS))
  by_id = {i.split("/")[-1]: p for i, p in zip(ids, eval_probs)}  # "1/p30"
  assert len(by_id) == n
  # The slide: patch order[r * COLS + c] at grid cell (r, c), pixels
  # decoded by the decoder of record (what hcd_evaluate reads).
  order = np.random.default_rng(0).permutation(n)
  pixels = np.stack([decode.read_image(str(files[k])) for k in order])
  levels = slide_synth.patch_grid_levels(
      pixels.reshape(ROWS, COLS, 96, 96, 3), upsample=2)
  path = slide_synth.write_tiled(
      str(tmp_path / "pcam.tif"), COLS * 192, ROWS * 192, 0.486, (1, 2),
      slide_synth.array_content(levels), compression="zlib")
  result = slide.run_slides(
      [model], [path], str(tmp_path / "out"),
      slide.SlideConfig(stride=96, min_tissue=0, tta=TTA, batch_size=20,
                        progress=False), log=lambda _: None)
  s = result.summaries[0]
  assert (s["level"], s["heatmap_shape"]) == (1, [ROWS, COLS])
  tiles = np.genfromtxt(tmp_path / "out" / "pcam" / "tiles.csv",
                        delimiter=",", names=True)
  assert len(tiles) == n and (tiles["size"] == 192).all()
  # Level-0 corner (x, y) = 192 * (col, row): the patch placed there.
  r, c = (tiles["y"] / 192).astype(int), (tiles["x"] / 192).astype(int)
  np.testing.assert_array_equal(tiles["y"], r * 192)
  np.testing.assert_array_equal(tiles["x"], c * 192)
  want = np.array([by_id[f"p{order[i * COLS + j]:02d}"]
                   for i, j in zip(r, c)])
  np.testing.assert_allclose(tiles["prob"], want, atol=2e-5)
  got_labels = labels[order[r * COLS + c]]
  assert metrics.roc_auc_score(got_labels, tiles["prob"]) == pytest.approx(
      met["roc_auc"], abs=1e-6)
  # A transposed or shifted grid would have to pass the same comparison.
  heat = np.load(tmp_path / "out" / "pcam" / "heatmap.npy")
  expect = want.reshape(ROWS, COLS)  # Tiles are row-major.
  np.testing.assert_allclose(heat, expect, atol=2e-5)
  spread = np.abs(expect[:, :ROWS] - expect[:, :ROWS].T).max()
  assert spread > 100 * 2e-5, "the patches' probabilities must differ"
  assert np.abs(expect[:, 1:] - expect[:, :-1]).max() > 100 * 2e-5
