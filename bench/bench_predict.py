#!/usr/bin/env python3
"""Prediction throughput: input paths against the model's own compute rate.

  .venv/bin/python bench/bench_predict.py [--num_test=8192]
      [--models=model1,resnet] [--e2e_images=1024]

Measures, on synthetic Kaggle-layout TIFFs (tools/make_synthetic's
generator) under bench_out/predict/ and TFRecord shards of the same pixels:

  input  images/s of each input path alone (no model):
           shards        TFRecord blocks -> parse -> batches
           tiff_decode   tf.data: read_file + hcd.data.decode.tf_decode_images
                         (plain strips sliced under the check's proofs)
           tiff_check    the up-front imagecodecs pass over every file
           tiff_total    check + decode, as hcd_predict --data_dir runs them
  model  images/s of the model on an in-memory uint8 batch (TTA 1 and 8):
         the ceiling for any input path
  e2e    hcd.eval.predict.predict() from shards and from the TIFF folder at
         TTA 1 and 8, on the first --e2e_images images

With --submission=N, instead: one `hcd_predict` command (a subprocess, as
a user runs it) on a synthetic Kaggle test folder of N TIFFs with TTA 8 and
the workspace's sample_submission.csv, timed, and the submission validated
(N=57458 is the Kaggle test set's size). --submission_model picks the
model (an untrained one: this measures the pipeline, not accuracy).

Every number is the median of --repeats runs after a warm-up. The TIFFs are
read from the page cache (they were just written or read); a cold disk is
slower. The target is input >= 5x model (prediction bound by compute).
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top


def _median_rate(fn, n, repeats):
  fn()  # Warm-up: graph tracing, file cache, thread pools.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return n / statistics.median(times)


def _drain(dataset):
  n = 0
  for b in dataset:
    n += int(b["image"].shape[0])
  return n


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out_dir", default=os.path.join(ROOT, "bench_out",
                                                   "predict"))
  p.add_argument("--num_test", type=int, default=8192)
  p.add_argument("--models", default="model1,resnet")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--e2e_images", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default=None, help="also write results here")
  p.add_argument("--submission", type=int, default=0)
  p.add_argument("--submission_model", default="tiny")
  args = p.parse_args()
  if args.submission:
    return submission_run(args)

  # Before TensorFlow: its oneDNN default (hcd/__init__.py).
  import hcd  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from hcd import models  # pylint: disable=g-import-not-at-top
  from hcd.data import decode  # pylint: disable=g-import-not-at-top
  from hcd.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from hcd.data import pipeline  # pylint: disable=g-import-not-at-top
  from hcd.data import synthetic  # pylint: disable=g-import-not-at-top
  from hcd.data import writer  # pylint: disable=g-import-not-at-top
  from hcd.eval import inputs  # pylint: disable=g-import-not-at-top
  from hcd.eval import predict  # pylint: disable=g-import-not-at-top

  data = os.path.join(args.out_dir, f"data{args.num_test}")
  shard_dir = os.path.join(args.out_dir, f"shards{args.num_test}")
  synthetic.write_workspace(data, 0, args.num_test, seed=0, progress=True)
  records = inputs.folder_records(data, "test")
  if not os.path.exists(manifest_lib.manifest_path(shard_dir, "test")):
    imgs = np.stack([decode.read_image(r.path) for r in records])
    writer.write_arrays(imgs, [r.id for r in records], [-1] * len(records),
                        shard_dir, "test", num_shards=4)
    del imgs
  n, bs, reps = len(records), args.batch_size, args.repeats
  res = {"machine": f"{os.cpu_count()} CPU cores, "
                    f"{len(tf.config.list_physical_devices('GPU'))} GPU",
         "num_test": n, "batch_size": bs, "repeats": reps,
         "input": {}, "model": {}, "e2e": {}}

  sh = lambda: _drain(inputs.shards_source(shard_dir, "test", bs).dataset)
  res["input"]["shards"] = _median_rate(sh, n, reps)
  layouts = inputs.check_images(records, progress=False).layouts
  dec = lambda: _drain(pipeline.folder_dataset(records, bs, layouts))
  res["input"]["tiff_decode"] = _median_rate(dec, n, reps)
  chk = lambda: inputs.check_images(records, progress=False)
  res["input"]["tiff_check"] = _median_rate(chk, n, reps)
  res["input"]["tiff_total"] = 1 / (1 / res["input"]["tiff_decode"] +
                                    1 / res["input"]["tiff_check"])
  print(json.dumps(res["input"]), flush=True)

  batch = tf.constant(np.stack([decode.read_image(r.path)
                                for r in records[:bs]]))
  sub = records[:args.e2e_images]
  sub_shards = os.path.join(args.out_dir, f"shards_e2e{len(sub)}")
  if not os.path.exists(manifest_lib.manifest_path(sub_shards, "test")):
    writer.write_arrays(np.stack([decode.read_image(r.path) for r in sub]),
                        [r.id for r in sub], [-1] * len(sub), sub_shards,
                        "test", num_shards=2)
  for name in args.models.split(","):
    model = models.build_model(name)
    res["model"][name] = {}
    res["e2e"][name] = {}
    for tta in (1, 8):
      fn = predict.make_predict_fn([model], tta)
      steps = 2 if tta == 1 else 1
      def compute(fn=fn, steps=steps):
        for _ in range(steps):
          fn(batch).numpy()
      res["model"][name][f"tta{tta}"] = _median_rate(compute, steps * bs,
                                                     reps)
      for kind in ("shards", "tiff"):
        def e2e(kind=kind, fn=fn):
          if kind == "shards":
            src = inputs.shards_source(sub_shards, "test", bs)
          else:
            checked = inputs.check_images(sub, progress=False)
            src = inputs.Source(pipeline.folder_dataset(sub, bs,
                                                        checked.layouts),
                                len(sub), "tiff")
          predict.predict([model], src.dataset, progress=False,
                          predict_fn=fn)
        res["e2e"][name][f"{kind}_tta{tta}"] = _median_rate(
            e2e, len(sub), max(1, reps - 2))
      print(name, json.dumps(res["model"][name]), json.dumps(
          res["e2e"][name]), flush=True)

  print("\n| path | images/s | x model1 TTA1 |")
  base = res["model"].get("model1", next(iter(res["model"].values())))["tta1"]
  for k, v in res["input"].items():
    print(f"| input {k} | {v:,.0f} | {v / base:.1f}x |")
  for name, r in res["model"].items():
    for k, v in r.items():
      print(f"| model {name} {k} (in-memory) | {v:,.1f} | |")
    for k, v in res["e2e"][name].items():
      ceiling = r["tta1" if k.endswith("tta1") else "tta8"]
      print(f"| e2e {name} {k} | {v:,.1f} | {v / ceiling:.0%} of model |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)


def submission_run(args):
  """One hcd_predict command over N TIFFs with TTA 8, timed and validated."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  from hcd import models  # pylint: disable=g-import-not-at-top
  from hcd.data import synthetic  # pylint: disable=g-import-not-at-top
  from hcd.eval import submission  # pylint: disable=g-import-not-at-top
  data = os.path.join(args.out_dir, f"data{args.submission}")
  t0 = time.perf_counter()
  synthetic.write_workspace(data, 0, args.submission, seed=1, progress=True)
  print(f"data: {time.perf_counter() - t0:.0f} s", flush=True)
  run = os.path.join(args.out_dir, f"run_{args.submission_model}")
  os.makedirs(run, exist_ok=True)
  keras.utils.set_random_seed(0)
  models.build_model(args.submission_model).save(
      os.path.join(run, "best.keras"))
  out = os.path.join(args.out_dir, f"submission{args.submission}.csv")
  sample = os.path.join(data, "sample_submission.csv")
  cmd = [os.path.join(os.path.dirname(sys.executable), "hcd_predict"),
         f"--workdir={run}", f"--data_dir={data}", "--split=test",
         "--tta=8", f"--sample_submission={sample}", f"--out={out}",
         f"--batch_size={args.batch_size}"]
  print("$ " + " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True)
  wall = time.perf_counter() - t0
  summary = submission.validate_submission(
      out, submission.read_sample_ids(sample))
  print(json.dumps({"images": args.submission, "model":
                    args.submission_model, "tta": 8, "wall_s": wall,
                    "images_per_s": args.submission / wall,
                    "validated": summary}))


if __name__ == "__main__":
  main()
