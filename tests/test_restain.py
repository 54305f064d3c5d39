"""Tests for hcd.eval.restain and hcd_evaluate --restain_to.

Synthetic H&E images are made by Beer-Lambert from known stain vectors and
concentrations, so what the re-staining must give is known exactly.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hcd import rundir
from hcd.data import decode
from hcd.data import writer
from hcd.eval import evaluate
from hcd.eval import inputs
from hcd.eval import restain

import evalutil  # pylint: disable=g-bad-import-order

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SLIDE = SHARED / "wsi" / "CMU-1-Small-Region.svs"
PCAM_VALID = SHARED / "pcam96_jpeg" / "valid"


def _he(h, e):
  m = np.array([h, e], float).T
  return m / np.linalg.norm(m, axis=0)


# Ruifrok & Johnston's H&E vectors, and a bluer, pinker other lab.
HE_SPLIT = _he([0.65, 0.70, 0.29], [0.07, 0.99, 0.11])
HE_OTHER = _he([0.55, 0.78, 0.30], [0.20, 0.95, 0.25])


def _stained(he, conc):
  """uint8 pixels (..., 3) of concentrations (..., 2) (Beer-Lambert, Io 240)."""
  return np.clip(np.rint(240 * np.exp(-(conc @ he.T))) - 1, 0,
                 255).astype(np.uint8)


def _conc(n, seed, scale=1.5):
  """Concentrations with pure H and pure E pixels among the mixtures."""
  c = np.random.default_rng(seed).uniform(0, scale, (n, 2))
  c[:n // 4, 1] = 0
  c[n // 4:n // 2, 0] = 0
  return c


def test_macenko_recovers_the_stains_and_maps_to_the_target():
  conc = _conc(120_000, seed=1)
  split = _stained(HE_SPLIT, conc)
  target = _stained(HE_OTHER, _conc(120_000, seed=2))
  m = restain.StainMapping.fit("macenko", restain.tissue_pixels(split),
                               restain.tissue_pixels(target))
  # Haematoxylin (the first vector) as made, up to the estimate's noise.
  np.testing.assert_allclose(np.asarray(m.params["split_stain_vectors"])[:, 0],
                             HE_SPLIT[:, 0], atol=0.02)
  np.testing.assert_allclose(
      np.asarray(m.params["target_stain_vectors"]), HE_OTHER, atol=0.02)
  # The same tissue as the other lab would have stained it.
  out = m.apply(split[:5000])
  want = _stained(HE_OTHER, conc[:5000])
  before = np.abs(split[:5000].astype(int) - want).mean()
  after = np.abs(out.astype(int) - want).mean()
  assert after < 1.0 and after < before / 5, (before, after)


def test_reinhard_moves_the_split_statistics_to_the_target():
  from torchstain.numpy.utils.rgb2lab import rgb2lab  # pylint: disable=g-import-not-at-top
  from torchstain.numpy.utils.split import lab_split  # pylint: disable=g-import-not-at-top
  split = _stained(HE_SPLIT, _conc(60_000, seed=3))
  target = _stained(HE_OTHER, _conc(60_000, seed=4, scale=1.0))
  m = restain.StainMapping.fit("reinhard", split, target)
  out = m.apply(split)
  got = [(c.mean(), c.std()) for c in lab_split(rgb2lab(out / 255))]
  want = list(zip(m.params["target_lab_mean"], m.params["target_lab_std"]))
  before = list(zip(m.params["split_lab_mean"], m.params["split_lab_std"]))
  for (gm, gs), (wm, ws), (bm, _) in zip(got, want, before):
    assert abs(gm - wm) < 1.5 and abs(gs - ws) < 0.1 * ws + 0.5, (got, want)
    assert abs(bm - wm) > abs(gm - wm)  # It moved towards the target.


@pytest.mark.parametrize("method", restain.METHODS)
def test_one_mapping_keeps_the_differences_between_patches(method):
  """A pale patch stays paler than a dark one (per-patch fits lose this)."""
  pale = _stained(HE_SPLIT, _conc(96 * 96, seed=5, scale=0.4))
  dark = _stained(HE_SPLIT, _conc(96 * 96, seed=6, scale=1.4))
  target = _stained(HE_OTHER, _conc(50_000, seed=7))
  split = np.concatenate([pale, dark])
  m = restain.StainMapping.fit(method, restain.tissue_pixels(split),
                               restain.tissue_pixels(target))
  out = m.apply(np.stack([pale, dark]).reshape(2, 96, 96, 3))
  assert out.dtype == np.uint8 and out.shape == (2, 96, 96, 3)
  assert out[0].mean() > out[1].mean() + 20


def test_the_mapping_runs_inside_tf_data_as_eagerly():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = _stained(HE_SPLIT, _conc(5 * 96 * 96, seed=8)).reshape(
      5, 96, 96, 3)
  target = _stained(HE_OTHER, _conc(20_000, seed=9))
  ds = tf.data.Dataset.from_tensor_slices(
      {"image": images, "label": np.arange(5), "id": [b"a"] * 5}).batch(2)
  for method in restain.METHODS:
    m = restain.StainMapping.fit(method, images.reshape(-1, 3), target)
    got = np.concatenate([b["image"].numpy() for b in
                          restain.restained_dataset(ds, m)])
    np.testing.assert_array_equal(got, m.apply(images))


def _pyramid(path, img, levels=3):
  """A tiled pyramidal TIFF: level 0 plus halvings, as slides are stored."""
  with tifffile.TiffWriter(path) as tif:
    tif.write(img, tile=(64, 64), subifds=levels - 1, photometric="rgb")
    for k in range(1, levels):
      tif.write(img[::2 ** k, ::2 ** k], tile=(64, 64), subfiletype=1,
                photometric="rgb")
  return path


def test_stain_sources_slide_folder_and_errors(tmp_path, monkeypatch):
  img = _stained(HE_OTHER, _conc(512 * 512, seed=10)).reshape(512, 512, 3)
  slide = _pyramid(str(tmp_path / "slide.tif"), img)
  # Level 0 holds 262,144 px; with a cap of 100,000 the 256 x 256 level is
  # read (the most detailed that fits).
  monkeypatch.setattr(restain, "_MAX_SLIDE_PIXELS", 100_000)
  px = restain.source_pixels(slide)
  assert px.dtype == np.uint8 and px.shape[1] == 3
  assert 1000 < len(px) <= 256 * 256
  folder = tmp_path / "patches" / "1"
  folder.mkdir(parents=True)
  for k in range(3):
    (folder / f"p{k}.tif").write_bytes(decode.encode_tiff(img[:96, 96 * k:
                                                              96 * (k + 1)]))
  assert len(restain.source_pixels(str(tmp_path / "patches"))) > 1000
  with pytest.raises(restain.RestainError, match="no such slide or folder"):
    restain.source_pixels(str(tmp_path / "nothing.svs"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(restain.RestainError, match="no images"):
    restain.source_pixels(str(tmp_path / "empty"))
  white = str(tmp_path / "white.tif")
  tifffile.imwrite(white, np.full((200, 200, 3), 250, np.uint8))
  with pytest.raises(restain.RestainError, match="0 tissue pixels"):
    restain.source_pixels(white)
  text = tmp_path / "notes.svs"
  text.write_text("not a slide")
  with pytest.raises(restain.RestainError, match="notes.svs: cannot read"):
    restain.source_pixels(str(text))
  with pytest.raises(ValueError, match="reinhard"):
    restain.check_methods(["vahadane"])


@pytest.fixture(name="stained_split")
def _stained_split(tmp_path):
  """Shards whose label is the amount of haematoxylin, and a run."""
  rng = np.random.default_rng(11)
  labels = np.array([0, 1] * 16)
  conc = rng.uniform(0.1, 0.6, (32, 96, 96, 2))
  conc[labels == 1, ..., 0] += 0.5
  imgs = _stained(HE_SPLIT, conc)
  ids = [f"{k:040x}" for k in range(32)]
  writer.write_arrays(imgs, ids, labels, str(tmp_path / "sh"), "valid", 2)
  run = evalutil.make_run(str(tmp_path / "run"),
                          evalutil.invariant_model(seed=1))
  slide = _pyramid(str(tmp_path / "other_lab.tif"), _stained(
      HE_OTHER, _conc(256 * 256, seed=12)).reshape(256, 256, 3), levels=2)
  return str(tmp_path / "sh"), run, slide


def test_evaluate_scores_the_restained_split_beside_the_clean(stained_split,
                                                              tmp_path):
  shards, run, slide = stained_split
  source = inputs.open_source(shards_dir=shards, split="valid", batch_size=8)
  out = tmp_path / "eval"
  result = evaluate.evaluate([rundir.model_file(run)], source, str(out),
                             tta=2, progress=False, restain_to=slide)
  saved = json.loads((out / "metrics.json").read_text())
  assert set(saved["restained"]) == set(restain.METHODS)
  for method, m in saved["restained"].items():
    assert m["method"] == method and m["source"] == os.path.abspath(slide)
    assert m["num_examples"] == 32
    assert m["auc_drop"] == pytest.approx(result["roc_auc"] - m["roc_auc"])
  # Re-stained images are other pixels, so the model's probabilities move.
  assert (saved["restained"]["macenko"]["log_loss"] !=
          pytest.approx(saved["log_loss"], abs=1e-6))
  assert (out / "restain.png").stat().st_size > 1000


def test_cli_restain_to_a_missing_source_fails_before_loading(stained_split,
                                                              tmp_path):
  shards, run, _ = stained_split
  code = "from hcd.cli.evaluate_main import run; run()"
  r = subprocess.run(
      [sys.executable, "-c", code, f"--workdir={run}", f"--shards_dir={shards}",
       "--split=valid", f"--out_dir={tmp_path / 'e'}", "--noprogress",
       f"--restain_to={tmp_path / 'missing.svs'}"], capture_output=True,
      text=True, env=evalutil.ENV, cwd=str(evalutil.REPO), timeout=240)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
      f"hcd_evaluate: error: {tmp_path / 'missing.svs'}: no such slide or "
      f"folder (--restain_to)")
  assert not (tmp_path / "e" / "metrics.json").exists()


@pytest.mark.skipif(not SLIDE.exists() or not PCAM_VALID.exists(),
                    reason="needs ../shared/data (the real CMU slide and PCam "
                    "valid patches)")
def test_real_slide_stain_is_h_and_e():
  """The CMU slide and PCam valid: both estimates are H&E-like."""
  target = restain.source_pixels(str(SLIDE))
  files = sorted(PCAM_VALID.glob("*/*.jpg"))[::30]
  imgs = np.stack([decode.read_image(str(f)) for f in files])
  split = restain.tissue_pixels(imgs.reshape(-1, 3))
  m = restain.StainMapping.fit("macenko", split, target)

  def degrees(a, b):
    a, b = np.asarray(a) / np.linalg.norm(a), np.asarray(b) / np.linalg.norm(b)
    return np.degrees(np.arccos(np.clip(a @ b, -1, 1)))

  for key in ("split_stain_vectors", "target_stain_vectors"):
    he = np.asarray(m.params[key])
    # Haematoxylin absorbs red most, eosin green: closer to its own
    # reference vector than to the other stain's.
    assert degrees(he[:, 0], HE_SPLIT[:, 0]) < degrees(he[:, 0],
                                                       HE_SPLIT[:, 1]), key
    assert degrees(he[:, 1], HE_SPLIT[:, 1]) < degrees(he[:, 1],
                                                       HE_SPLIT[:, 0]), key
  out = m.apply(imgs[:20])
  assert out.shape == imgs[:20].shape and np.abs(
      out.astype(int) - imgs[:20]).mean() > 3


def test_report_shows_the_restained_aucs_side_by_side(stained_split,
                                                      tmp_path):
  from hcd.eval import report  # pylint: disable=g-import-not-at-top
  shards, run, slide = stained_split
  other = evalutil.make_run(str(tmp_path / "other"),
                            evalutil.invariant_model(seed=2))
  source = inputs.open_source(shards_dir=shards, split="valid", batch_size=8)
  result = evaluate.evaluate([rundir.model_file(run)], source,
                             rundir.RunDir(run).eval, tta=1, progress=False,
                             restain_to=slide)
  out = report.compare_runs([run, other], str(tmp_path / "reports"))
  table = open(out["markdown"]).read()
  assert "| Macenko AUC | Reinhard AUC | mean of clean and re-stained |" in (
      table)
  with open(out["csv"], newline="") as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  aucs = [result["roc_auc"]] + [result["restained"][m]["roc_auc"]
                                for m in ("macenko", "reinhard")]
  assert float(rows["run"]["shift_mean_auc"]) == pytest.approx(
      np.mean(aucs))
  assert float(rows["run"]["restained_reinhard_auc"]) == pytest.approx(
      aucs[2])
  assert rows["other"]["shift_mean_auc"] == ""  # Not evaluated re-stained.
  assert rows["run"]["eval_tta"] == "1"
  assert (f"Best mean of clean and re-stained AUC: **run**, "
          f"{np.mean(aucs):.4f}") in table
