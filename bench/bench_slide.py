#!/usr/bin/env python3
"""Whole-slide throughput: hcd_slide against hcd_predict, and the tile supply.

  .venv/bin/python bench/bench_slide.py [--model=resnet] [--batch_size=256]
      [--tta=1] [--repeats=3] [--big]

Generated slides (hcd.eval.slide_synth) of real PCam patches
(../shared/data/pcam96_jpeg/train, tiled over a square of about 9,500 x
9,500 level-0 pixels at 0.486 um/px with a white margin, levels at
downsamples 1, 2 and 8, so the 0.972 um/px level is read without
resampling), under bench_out/slide/:

  supply  tiles/s of the tile pipeline alone (OpenSlide block reads,
          resample, tissue-filtered tiles, batches; no model), with 1
          reader thread (per core) and with one per core; for a JPEG slide,
          an uncompressed one, and a JPEG slide without the 0.972 level
          (read at 0.486 and resampled 2x)
  e2e     hcd.eval.slide.run_slides on the JPEG slide (tiles/s over tissue
          detection + prediction, the figure summary.json reports) against
          hcd.eval.predict.predict on TFRecord shards of as many patches
          (hcd_predict's path and images/s), same model, batch and TTA,
          alternated A/B --repeats times after a warm-up of each; medians
          and their ratio
  --big   peak RSS and wall time of the `hcd_slide` command (a subprocess)
          on a sparse 100,000 x 100,000 px slide at 0.243 um/px (levels at
          downsamples 1, 4, 16, 64; tissue in three 6,000-px squares)

The model is untrained (this measures the pipeline, not accuracy). The
results go to bench_out/slide/results.json and are printed.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top

TRAIN = os.path.join(os.path.dirname(ROOT), "shared", "data", "pcam96_jpeg",
                     "train")
SIDE = 11000  # Level-0 pixels of the benchmark slide.
MARGIN = 768


def machine() -> str:
  """CPU model, core count and the SIMD flags that matter for TF."""
  model, flags = platform.processor(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name") and model in ("", "x86_64"):
          model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
          if f in flags]
  return f"{model}, {os.cpu_count()} cores, {'/'.join(simd) or 'no AVX2'}"


def patches(n: int) -> np.ndarray:
  """n real PCam training patches (both classes), decoded."""
  from hcd.data import decode  # pylint: disable=g-import-not-at-top
  files = []
  for c in ("0", "1"):
    d = os.path.join(TRAIN, c)
    files += [os.path.join(d, f) for f in sorted(os.listdir(d))[:n // 2]]
  return np.stack([decode.read_image(f) for f in files])


def make_slide(path, pix, mpp, side, downsamples, compression, boxes):
  """A slide of PCam patches (2 level-0 px per patch px) in `boxes`."""
  from hcd.eval import slide_synth  # pylint: disable=g-import-not-at-top
  if os.path.exists(path):
    return path
  parts = [slide_synth.mosaic_content(
      pix, box, lambda r, c, k=k: r * 131 + c * 17 + k * 1000, patch_px=192)
           for k, box in enumerate(boxes)]

  def content(d, y, x, h, w):
    for part in parts:
      tile = part(d, y, x, h, w)
      if tile is not None:
        return tile  # Boxes never share a tile here.
    return None

  tmp = path + ".tmp"
  slide_synth.write_tiled(tmp, side, side, mpp, downsamples, content,
                          compression)
  os.replace(tmp, path)
  return path


def supply(path, batch_size, parallelism, repeats):
  """Median tiles/s of the tile pipeline alone, and the tile count."""
  from hcd.eval import slide  # pylint: disable=g-import-not-at-top
  from hcd.eval import slide_pipeline  # pylint: disable=g-import-not-at-top
  plan = slide.plan_slide(path, slide.SlideConfig(progress=False))
  rates = []
  for rep in range(repeats + 1):  # The first is a warm-up.
    ds = slide_pipeline.tile_dataset(plan.slide, plan.geom, plan.blocks,
                                     batch_size, parallelism)
    t0, n = time.perf_counter(), 0
    for b in ds:
      n += int(b.shape[0])
    if rep:
      rates.append(n / (time.perf_counter() - t0))
  plan.close()
  return statistics.median(rates), n, plan.geom.level


def shards_of(pix, n, out):
  """TFRecord shards of n patches (the PCam patches, cycled)."""
  from hcd.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from hcd.data import writer  # pylint: disable=g-import-not-at-top
  if not os.path.exists(manifest_lib.manifest_path(out, "test")):
    imgs = pix[np.arange(n) % len(pix)]
    writer.write_arrays(imgs, [f"p{k}" for k in range(n)], [-1] * n, out,
                        "test", num_shards=4)
  return out


def e2e(args, model_path, slide_path, shard_dir, n):
  """Alternates hcd_slide and hcd_predict runs; their medians and ratio."""
  from hcd.eval import inputs  # pylint: disable=g-import-not-at-top
  from hcd.eval import predict  # pylint: disable=g-import-not-at-top
  from hcd.eval import slide  # pylint: disable=g-import-not-at-top
  cfg = slide.SlideConfig(batch_size=args.batch_size, tta=args.tta,
                          progress=False)
  models = [predict.load_model(model_path)]
  rates = {"slide": [], "predict": []}
  for rep in range(args.repeats + 1):  # The first pair is a warm-up.
    out = os.path.join(args.out_dir, "e2e_out")
    shutil.rmtree(out, ignore_errors=True)
    r = slide.run_slides([model_path], [slide_path], out, cfg,
                         log=lambda _: None)
    s = r.summaries[0]
    src = inputs.shards_source(shard_dir, "test", args.batch_size)
    t0 = time.perf_counter()
    p = predict.predict(models, src.dataset, args.tta, progress=False)
    ips = len(p.ids) / (time.perf_counter() - t0)
    print(f"  rep {rep}: hcd_slide {s['tiles_per_s']:.0f} tiles/s "
          f"({s['tissue_tiles']} tiles), hcd_predict {ips:.0f} images/s "
          f"({len(p.ids)})" + (" (warm-up)" if not rep else ""), flush=True)
    if rep:
      rates["slide"].append(s["tiles_per_s"])
      rates["predict"].append(ips)
  med = {k: statistics.median(v) for k, v in rates.items()}
  return {"runs": rates, "median": med,
          "ratio": med["slide"] / med["predict"], "tiles": n}


def big(args, model_path, pix):
  """Peak RSS and wall of `hcd_slide` on a sparse 100k x 100k slide."""
  side = 100_000
  boxes = [(10_000, 10_000, 16_000, 16_000), (50_000, 30_000, 56_000, 36_000),
           (80_000, 85_000, 86_000, 91_000)]
  path = make_slide(os.path.join(args.out_dir, "big100k.tif"), pix, 0.243,
                    side, (1, 4, 16, 64), "jpeg", boxes)
  out = os.path.join(args.out_dir, "big_out")
  shutil.rmtree(out, ignore_errors=True)
  t0 = time.perf_counter()
  r = subprocess.run(
      [sys.executable, "-c", "from hcd.cli.slide_main import run; run()",
       f"--model_path={model_path}", f"--slides={path}", f"--out_dir={out}",
       f"--batch_size={args.batch_size}", f"--tta={args.tta}",
       "--noprogress"], capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if r.returncode:
    raise SystemExit(r.stderr[-2000:])
  rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  with open(os.path.join(out, "big100k", "summary.json"),
            encoding="utf-8") as f:
    s = json.load(f)
  return {"peak_rss_gib": rss, "wall_s": wall,
          "file_mb": os.path.getsize(path) / 1e6, "tiles": s["tissue_tiles"],
          "heatmap_shape": s["heatmap_shape"], "level": s["level"],
          "tiles_per_s": s["tiles_per_s"]}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out_dir", default=os.path.join(ROOT, "bench_out",
                                                   "slide"))
  p.add_argument("--model", default="resnet")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--tta", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--big", action="store_true")
  p.add_argument("--skip_e2e", action="store_true")
  p.add_argument("--only_big", action="store_true",
                 help="only the 100k-px slide's peak RSS (implies --big)")
  args = p.parse_args()
  import hcd  # pylint: disable=g-import-not-at-top,unused-import
  from hcd import models  # pylint: disable=g-import-not-at-top
  os.makedirs(args.out_dir, exist_ok=True)
  res = {"machine": machine(), "model": args.model,
         "batch_size": args.batch_size, "tta": args.tta}
  print(res["machine"], flush=True)
  pix = patches(2000)
  model_path = os.path.join(args.out_dir, f"{args.model}.keras")
  if not os.path.exists(model_path):
    models.standard_model(models.build_model(args.model)).save(model_path)
  box = [(MARGIN, MARGIN, SIDE - MARGIN, SIDE - MARGIN)]
  slides = {
      "jpeg": make_slide(os.path.join(args.out_dir, "pcam_jpeg.tif"), pix,
                         0.486, SIDE, (1, 2, 8), "jpeg", box),
      "raw": make_slide(os.path.join(args.out_dir, "pcam_raw.tif"), pix,
                        0.486, SIDE, (1, 2, 8), None, box),
      "jpeg_resample2x": make_slide(
          os.path.join(args.out_dir, "pcam_jpeg_nolevel.tif"), pix, 0.486,
          SIDE, (1, 4, 16), "jpeg", box),
  }
  res["supply"] = {}
  for name, path in slides.items() if not args.only_big else ():
    for par in (1, os.cpu_count()):
      rate, n, level = supply(path, args.batch_size, par, args.repeats)
      res["supply"][f"{name}_threads{par}"] = {
          "tiles_per_s": rate, "tiles_per_s_per_core": rate / par,
          "tiles": n, "level": level}
      print(f"supply {name}, {par} thread(s): {rate:.0f} tiles/s "
            f"({n} tiles, level {level})", flush=True)
  if not args.skip_e2e and not args.only_big:
    n = res["supply"]["jpeg_threads1"]["tiles"]
    shard_dir = shards_of(pix, n, os.path.join(args.out_dir, f"shards{n}"))
    res["e2e"] = e2e(args, model_path, slides["jpeg"], shard_dir, n)
    print(f"e2e: hcd_slide {res['e2e']['median']['slide']:.0f} tiles/s, "
          f"hcd_predict {res['e2e']['median']['predict']:.0f} images/s, "
          f"ratio {res['e2e']['ratio']:.3f}", flush=True)
  if args.big or args.only_big:
    res["big"] = big(args, model_path, pix)
    print(f"big: {res['big']}", flush=True)
  name = "results_big.json" if args.only_big else "results.json"
  with open(os.path.join(args.out_dir, name), "w",
            encoding="utf-8") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
