#!/usr/bin/env python3
"""Benchmark of tools/make_shards: images/s, whole command, warm page cache.

  .venv/bin/python bench/bench_shards.py [--num_images=100000] [--repeats=3]
      [--full_images=220025] [--workers=2] [--baseline_images=100000] [--keep]

Steps (every timed step is a whole command in a subprocess, start-up and
imports included):
  1. tools/make_synthetic writes a synthetic Kaggle workspace of
     --full_images training patches (skipped when already there); a second
     workspace of the first --num_images files is made of hard links.
  2. The files are read once so the page cache is warm, as after a scan.
  3. baseline: the textbook conversion, in one process: Pillow decode, one
     tf.train.Example per image, tf.io.TFRecordWriter (same images).
  4. tools/make_shards on --num_images, --repeats times (median).
  5. tools/make_shards on --full_images once, then tools/make_shards --verify,
     then the same make_shards command again (up to date: writes nothing).
Wall time depends on what else runs on the machine, so the table also gives
the CPU time of each command (its processes, user + system) and the load
average when it started. Prints a markdown table and writes results.json to --work_dir. Generated data
is deleted at the end unless --keep.
"""

import argparse
import csv
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
TOOLS = os.path.join(ROOT, "tools")

_BASELINE = r"""
import csv, sys
import numpy as np
import tensorflow as tf
from PIL import Image
data, out = sys.argv[1], sys.argv[2]
with open(data + "/train_labels.csv") as f:
  rows = list(csv.DictReader(f))
def _bytes(v):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
with tf.io.TFRecordWriter(out) as w:
  for row in rows:
    img = np.array(Image.open(data + "/train/" + row["id"] + ".tif"))
    ex = tf.train.Example(features=tf.train.Features(feature={
        "image": _bytes(img.tobytes()), "id": _bytes(row["id"].encode()),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(
            value=[int(row["label"])]))}))
    w.write(ex.SerializeToString())
"""


def _env():
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _cpu():
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _timed(argv):
  """Runs a command; returns (wall s, CPU s of it and its children, stdout)."""
  c0, t0 = _cpu(), time.perf_counter()
  p = subprocess.run(argv, capture_output=True, text=True, env=_env(),
                     cwd=ROOT, check=False)
  dt, cpu = time.perf_counter() - t0, _cpu() - c0
  if p.returncode != 0:
    sys.exit(f"bench_shards: {' '.join(argv)} failed:\n{p.stdout}{p.stderr}")
  return dt, cpu, p.stdout.strip()


def _workspace(path, n):
  subprocess.run([sys.executable, os.path.join(TOOLS, "make_synthetic"),
                  f"--out_dir={path}", f"--num_train={n}", "--num_test=0",
                  "--workers=2", "--noprogress"], check=True, env=_env())


def _subset(full, path, n):
  """A workspace of the first n images of `full`, as hard links."""
  marker = os.path.join(path, "subset.json")
  if os.path.exists(marker):
    return
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(os.path.join(path, "train"))
  with open(os.path.join(full, "train_labels.csv")) as f:
    rows = list(csv.reader(f))
  header, rows = rows[0], sorted(rows[1:])[:n]
  for i, _ in rows:
    os.link(os.path.join(full, "train", i + ".tif"),
            os.path.join(path, "train", i + ".tif"))
  with open(os.path.join(path, "train_labels.csv"), "w", newline="") as f:
    csv.writer(f).writerows([header] + rows)
  with open(marker, "w") as f:
    json.dump({"of": full, "n": n}, f)


def _warm(path):
  d = os.path.join(path, "train")
  t0 = time.perf_counter()
  n = 0
  for name in os.listdir(d):
    with open(os.path.join(d, name), "rb") as f:
      f.read()
    n += 1
  return n, time.perf_counter() - t0


def _make(data, out, workers):
  """Times tools/make_shards from scratch (the output is deleted first)."""
  shutil.rmtree(out, ignore_errors=True)
  return _timed([sys.executable, os.path.join(TOOLS, "make_shards"),
                 f"--data_dir={data}", "--split=train", f"--out_dir={out}",
                 f"--workers={workers}", "--noprogress"])


def _load():
  return os.getloadavg()[0]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--work_dir", default=os.path.join(ROOT, "bench_out",
                                                     "shards_bench"))
  ap.add_argument("--num_images", type=int, default=100_000)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--full_images", type=int, default=220_025)
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--baseline_images", type=int, default=100_000,
                  help="0 skips the baseline")
  ap.add_argument("--keep", action="store_true",
                  help="keep the generated data")
  args = ap.parse_args()
  w = args.work_dir
  os.makedirs(w, exist_ok=True)
  full = os.path.join(w, f"ws_{args.full_images}")
  sub = os.path.join(w, f"ws_{args.num_images}")
  out = os.path.join(w, "shards")
  t0 = time.perf_counter()
  _workspace(full, args.full_images)
  print(f"workspace {full}: {time.perf_counter() - t0:.0f} s", flush=True)
  _subset(full, sub, args.num_images)
  res = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs",
         "workers": args.workers, "load_start": _load()}
  n, dt = _warm(sub)
  print(f"warm read of {n} files: {dt:.1f} s ({n / dt:,.0f} files/s)")
  rows = []

  if args.baseline_images:
    base = os.path.join(w, f"ws_base_{args.baseline_images}")
    _subset(full, base, args.baseline_images)
    _warm(base)
    os.makedirs(out, exist_ok=True)
    load = _load()
    dt, cpu, _ = _timed([sys.executable, "-c", _BASELINE, base,
                         os.path.join(out, "baseline.tfrecord")])
    res["baseline"] = {"images": args.baseline_images, "seconds": dt,
                       "cpu_s": cpu, "img_per_s": args.baseline_images / dt,
                       "load": load}
    rows.append(("baseline: Pillow + one tf.Example per image, 1 process",
                 args.baseline_images, dt, cpu, load, ""))
    print(f"baseline: {args.baseline_images} images in {dt:.1f} s "
          f"({args.baseline_images / dt:,.0f} img/s, CPU {cpu:.1f} s, "
          f"load {load:.1f})", flush=True)
    if base != sub:
      shutil.rmtree(base)
    os.remove(os.path.join(out, "baseline.tfrecord"))

  runs = []
  for r in range(args.repeats):
    load = _load()
    dt, cpu, msg = _make(sub, out, args.workers)
    runs.append((dt, cpu, load))
    print(f"make_shards {args.num_images} run {r + 1}: {dt:.2f} s "
          f"({args.num_images / dt:,.0f} img/s, CPU {cpu:.1f} s, load "
          f"{load:.1f}) | {msg.splitlines()[0]}", flush=True)
  med = statistics.median(t for t, _, _ in runs)
  cpu_med = statistics.median(c for _, c, _ in runs)
  res["make_shards"] = {"images": args.num_images, "runs": runs,
                        "median_s": med, "median_cpu_s": cpu_med,
                        "img_per_s": args.num_images / med}
  ratio = (f"{args.num_images / med / res['baseline']['img_per_s']:.1f}x"
           if "baseline" in res else "")
  rows.append((f"tools/make_shards --workers={args.workers}, median of "
               f"{args.repeats} ({', '.join(f'{t:.1f}' for t, _, _ in runs)}"
               f" s)", args.num_images, med, cpu_med,
               statistics.median(x for _, _, x in runs), ratio))

  _warm(full)
  load = _load()
  dt, cpu, msg = _make(full, out, args.workers)
  print(f"make_shards {args.full_images}: {dt:.2f} s "
        f"({args.full_images / dt:,.0f} img/s, CPU {cpu:.1f} s, load "
        f"{load:.1f}) | {msg.splitlines()[0]}", flush=True)
  with open(os.path.join(out, "hcd-train.manifest.json")) as f:
    manifest = json.load(f)
  rows.append((f"tools/make_shards --workers={args.workers}, full size "
               f"({len(manifest['shards'])} shards of "
               f"{manifest['shards'][0]['bytes'] / 1e6:.0f} MB)",
               args.full_images, dt, cpu, load, ""))
  vload = _load()
  vt, vcpu, vmsg = _timed([sys.executable, os.path.join(TOOLS, "make_shards"),
                           "--verify", f"--out_dir={out}",
                           f"--workers={args.workers}", "--noprogress"])
  print(f"verify: {vt:.2f} s (CPU {vcpu:.1f} s) | {vmsg}", flush=True)
  rows.append(("tools/make_shards --verify (sha256, parse, counts)",
               manifest["num_examples"], vt, vcpu, vload, ""))
  rt, rcpu, rmsg = _timed([sys.executable, os.path.join(TOOLS, "make_shards"),
                           f"--data_dir={full}", "--split=train",
                           f"--out_dir={out}", "--noprogress"])
  print(f"rerun: {rt:.2f} s | {rmsg}", flush=True)
  rows.append(("rerun on finished output (up to date, writes nothing)",
               args.full_images, rt, rcpu, _load(), ""))
  res["full"] = {"images": args.full_images, "seconds": dt, "cpu_s": cpu,
                 "img_per_s": args.full_images / dt, "verify_s": vt,
                 "verify_cpu_s": vcpu, "rerun_s": rt,
                 "num_shards": len(manifest["shards"]),
                 "in_shards": manifest["num_examples"],
                 "excluded": len(manifest["excluded"])}

  # On a shared machine wall time measures the neighbours too; CPU time
  # (user + system, all processes of the command) does not.
  print("\n| command | images | wall time | images/s | CPU time | images per "
        "CPU second | load avg at start | wall-time speed-up vs baseline |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for name, n, t, c, ld, ratio in rows:
    print(f"| {name} | {n:,} | {t:.2f} s | {n / t:,.0f} | {c:.1f} s | "
          f"{n / c:,.0f} | {ld:.1f} | {ratio} |")
  with open(os.path.join(w, "results.json"), "w") as f:
    json.dump(res, f, indent=1)
  if not args.keep:
    for p in (full, sub, out):
      shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
  main()
