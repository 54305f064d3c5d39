#!/usr/bin/env python3
"""Benchmark: hcd's tf.data input pipeline vs the notebook's ImageDataGenerator.

  .venv/bin/python bench/input_pipeline.py --data_dir=DIR --shards_dir=DIR
      [--batch_size=32] [--seconds=5] [--repeats=3]

Both read the same images: DIR holds a Kaggle-layout split (train/<id>.tif
+ train_labels.csv, e.g. from tools/make_synthetic) and --shards_dir its
shards (tools/make_shards --split=train). Measured in one run, in turn,
--repeats times (so load from other processes hits all alike), each for
about --seconds after a warm-up; the number is the median images/s.

  idg          the notebook's loader: ImageDataGenerator(rescale=1/255,
               horizontal_flip=True, vertical_flip=True).flow_from_dataframe
               (batch 32, binary labels, shuffled), float32 batches
  hcd          hcd.data.pipeline.train_dataset as hcd_train runs it
               (--cache: selected blocks kept in memory), uint8 batches of
               static shape, consumed inside a tf.function as the training
               loop consumes them
  hcd_nocache  the same reading the shards on every pass (page cache warm)

Every image of the split is used (no validation hold-out, no balancing), so
all loaders do the same work per image. The last line printed is a JSON
object with hcd_img_s, idg_img_s and ratio (= hcd / idg), plus the rest.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Before TensorFlow: its oneDNN default (hcd/__init__.py).
import hcd  # pylint: disable=g-import-not-at-top,unused-import
import pandas as pd  # pylint: disable=g-import-not-at-top
import tensorflow as tf

from hcd.data import pipeline
from hcd.data import subsets
from hcd.data import manifest as manifest_lib


def idg_loader(data_dir, batch_size, exclude=()):
  """The notebook's generator over <data_dir>/train (an endless iterator)."""
  from tensorflow.keras.preprocessing.image import ImageDataGenerator  # pylint: disable=g-import-not-at-top
  df = pd.read_csv(os.path.join(data_dir, "train_labels.csv"), dtype=str)
  # The images make_shards excluded (dark/bright/...) are not in the shards.
  df = df[~df["id"].isin(set(exclude))]
  df["filename"] = df["id"] + ".tif"
  gen = ImageDataGenerator(rescale=1.0 / 255, horizontal_flip=True,
                           vertical_flip=True)
  return gen.flow_from_dataframe(
      df, directory=os.path.join(data_dir, "train"), x_col="filename",
      y_col="label", target_size=(96, 96), batch_size=batch_size,
      class_mode="binary", shuffle=True, seed=1), len(df)


def measure_idg(it, batch_size, seconds):
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    x, _ = next(it)
    n += len(x)
  return n / (time.perf_counter() - t0)


def hcd_consumer(plan, batch_size, cache):
  ds = pipeline.train_dataset(plan, batch_size, seed=1, cache=cache)
  it = iter(ds)

  @tf.function
  def take(n):
    total = tf.constant(0.0)
    for _ in tf.range(n):
      b = next(it)
      # Touch every batch, as a train step would consume it.
      total += tf.reduce_sum(tf.cast(b["label"], tf.float32) * b["weight"]) + (
          tf.cast(b["image"][0, 0, 0, 0], tf.float32))
    return total

  return take


def measure_hcd(take, batch_size, seconds, chunk=100):
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    take(tf.constant(chunk)).numpy()
    n += chunk * batch_size
  return n / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--shards_dir", required=True)
  parser.add_argument("--split", default="train")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=5.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
      "--no_idg", action="store_true",
      help="time hcd's pipelines alone (the ImageDataGenerator's background "
      "work in the same process slowed TensorFlow 2.21's cached pipeline by "
      "about 14%% and 2.17's by less; see BENCHMARKS.md)")
  args = parser.parse_args()

  plan = subsets.make_plan(args.shards_dir, args.split, balance="none",
                           split_spec=subsets.SplitSpec(val_fraction=0.0))
  manifest = manifest_lib.load_manifest(args.shards_dir, args.split)
  idg_it, idg_n = None, plan.train.num_examples
  if not args.no_idg:
    idg_it, idg_n = idg_loader(args.data_dir, args.batch_size,
                               [e["id"] for e in manifest["excluded"]])
  if idg_n != plan.train.num_examples:
    sys.exit(f"{args.data_dir} has {idg_n} labelled images but the shards "
             f"hold {plan.train.num_examples}: not the same images")
  loaders = {} if args.no_idg else {
      "idg": lambda: measure_idg(idg_it, args.batch_size, args.seconds),
  }
  takes = {"hcd": hcd_consumer(plan.train, args.batch_size, cache=True),
           "hcd_nocache": hcd_consumer(plan.train, args.batch_size,
                                       cache=False)}
  # Warm up: first pass fills the cache; the TIFFs enter the page cache.
  t0 = time.perf_counter()
  takes["hcd"](tf.constant(plan.train.num_examples // args.batch_size + 1))
  first_pass = plan.train.num_examples / (time.perf_counter() - t0)
  takes["hcd_nocache"](tf.constant(50))
  if not args.no_idg:
    measure_idg(idg_it, args.batch_size, 1.0)
  for name, take in takes.items():
    loaders[name] = (lambda t: lambda: measure_hcd(t, args.batch_size,
                                                   args.seconds))(take)
  rates = {k: [] for k in loaders}
  for r in range(args.repeats):
    for name, fn in loaders.items():
      rates[name].append(fn())
      print(f"repeat {r + 1}: {name:12s} {rates[name][-1]:10,.0f} img/s",
            flush=True)
  med = {k: statistics.median(v) for k, v in rates.items()}
  idg = med.get("idg")
  result = {
      "hcd_img_s": med["hcd"], "idg_img_s": idg,
      "ratio": med["hcd"] / idg if idg else None,
      "hcd_nocache_img_s": med["hcd_nocache"],
      "ratio_nocache": med["hcd_nocache"] / idg if idg else None,
      "hcd_first_pass_img_s": first_pass,
      "runs": {k: [round(x) for x in v] for k, v in rates.items()},
      "num_images": plan.train.num_examples, "batch_size": args.batch_size,
      "cpus": os.cpu_count(), "machine": platform.machine(),
      "load_avg_1m": os.getloadavg()[0], "tensorflow": tf.__version__,
  }
  text = f"hcd {med['hcd']:,.0f} img/s (no cache {med['hcd_nocache']:,.0f})"
  if idg:
    text += (f" vs ImageDataGenerator {idg:,.0f} img/s: "
             f"{result['ratio']:.1f}x ({result['ratio_nocache']:.1f}x)")
  print(text)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
