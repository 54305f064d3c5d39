#!/usr/bin/env python3
"""Benchmark: tools/scan_quality against the notebook's bad-image loop.

  .venv/bin/python bench/bench_scan.py          # 100,000 images, 3 repeats
  .venv/bin/python bench/bench_scan.py --full   # + 220,025 once (--cleanup
                                                # deletes the data after)

Both methods read the same synthetic Kaggle-layout files, written once by
tools/make_synthetic under bench_out/ (git-ignored), with a warm page cache,
in one run, alternating so that load from other processes hits both alike.

  notebook  the notebook's loop exactly as written: a pandas DataFrame of
            train_labels.csv, `Image.open(path + train.iloc[i]['id'] +
            '.tif')`, `np.array`, then the max/min test. Timed in-process
            (read_csv + loop): no interpreter start-up, which favours it.
  scan      the whole `tools/scan_quality --workers=2` command as a
            subprocess: wall time including Python start-up, imports,
            listing, labels join, the scan, scan.csv and scan_summary.json.

The two must flag the same images (checked). Results go to
bench_out/bench_scan.json and are printed as a markdown table, then as one
JSON line per size, `{"bench_scan": {...}}`, with both median timings, the
ratio, the CPU time per image and the 1-minute load average around the runs
(the ratio depends on what else the machine runs: report it with the load).
"""

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import pandas as pd
from absl import app
from absl import flags
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NUM_IMAGES = flags.DEFINE_integer("num_images", 100_000, "Images in the "
                                   "repeated comparison.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs of each method.")
_FULL = flags.DEFINE_bool("full", False, "Also run both once on a full-size "
                          "workspace (220,025 train + 57,458 test).")
_WORKERS = flags.DEFINE_integer("workers", 2, "scan_quality --workers.")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "bench_out"),
                           "Where workspaces and results go.")
_CLEANUP = flags.DEFINE_bool("cleanup", False, "Delete the generated "
                             "workspaces at the end.")


def machine() -> dict:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f
                 if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.
          python_version(), "numpy": np.__version__,
          "platform": platform.platform()}


def load() -> float:
  return round(os.getloadavg()[0], 2)


def make_workspace(path: str, num_train: int, num_test: int) -> float | None:
  """Runs tools/make_synthetic; returns its wall time (None if it existed)."""
  done = os.path.exists(os.path.join(path, "sample_submission.csv"))
  t0 = time.perf_counter()
  subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_synthetic"),
                  f"--out_dir={path}", f"--num_train={num_train}",
                  f"--num_test={num_test}", "--seed=0"], check=True)
  return None if done else time.perf_counter() - t0


def warm(data_dir: str) -> float:
  """Reads every training file once (page cache); returns files/s."""
  d = os.path.join(data_dir, "train")
  names = os.listdir(d)
  t0 = time.perf_counter()
  for n in names:
    with open(os.path.join(d, n), "rb") as f:
      f.read()
  return len(names) / (time.perf_counter() - t0)


def notebook(data_dir: str) -> tuple[float, float, set]:
  """The notebook's loop, as written; returns (seconds, CPU s, flagged ids)."""
  c0 = time.process_time()
  t0 = time.perf_counter()
  path = os.path.join(data_dir, "train") + "/"
  train = pd.read_csv(os.path.join(data_dir, "train_labels.csv"))
  bad = []
  for i in range(len(train)):
    im = np.array(Image.open(path + train.iloc[i]["id"] + ".tif"))
    if im.max() < 10 or im.min() > 245:
      bad.append(i)
  seconds = time.perf_counter() - t0
  return seconds, time.process_time() - c0, set(train.iloc[bad]["id"])


def _children_cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def scan_command(data_dir: str, out_dir: str) -> tuple[float, float, set]:
  """The whole tools/scan_quality command; returns (s, CPU s, flagged ids)."""
  cmd = [sys.executable, os.path.join(ROOT, "tools", "scan_quality"),
         f"--data_dir={data_dir}", "--split=train", f"--out_dir={out_dir}",
         f"--workers={_WORKERS.value}", "--noprogress"]
  c0 = _children_cpu()
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  seconds = time.perf_counter() - t0
  cpu = _children_cpu() - c0  # The command and its worker processes.
  df = pd.read_csv(os.path.join(out_dir, "scan.csv"),
                   usecols=["id", "dark", "bright"])
  return seconds, cpu, set(df["id"][df["dark"] | df["bright"]])


def compare(data_dir: str, repeats: int, tag: str) -> dict:
  n = sum(1 for _ in os.scandir(os.path.join(data_dir, "train")))
  read_rate = warm(data_dir)
  times = {"notebook": [], "scan": []}
  cpu = {"notebook": [], "scan": []}
  loads = [load()]
  for r in range(repeats):
    t_nb, c_nb, flagged_nb = notebook(data_dir)
    t_sc, c_sc, flagged_sc = scan_command(
        data_dir, os.path.join(_OUT.value, f"scan_{tag}"))
    if flagged_nb != flagged_sc:
      raise SystemExit(f"bench_scan: the methods disagree on {tag}: notebook "
                       f"{sorted(flagged_nb)} vs scan {sorted(flagged_sc)}")
    times["notebook"].append(t_nb)
    times["scan"].append(t_sc)
    cpu["notebook"].append(c_nb)
    cpu["scan"].append(c_sc)
    loads.append(load())
    print(f"[{tag} {r + 1}/{repeats}] notebook {t_nb:.2f} s "
          f"({n / t_nb:,.0f} img/s), scan_quality {t_sc:.2f} s "
          f"({n / t_sc:,.0f} img/s), flagged {len(flagged_sc)}; CPU s "
          f"notebook {c_nb:.1f}, scan_quality {c_sc:.1f}", flush=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
  return {"images": n, "repeats": repeats, "seconds": times, "median_s": med,
          "cpu_s": cpu, "median_cpu_s": med_cpu,
          "cpu_us_per_img": {k: 1e6 * v / n for k, v in med_cpu.items()},
          "img_per_s": {k: n / v for k, v in med.items()},
          "ratio": med["notebook"] / med["scan"], "flagged": len(flagged_sc),
          "read_only_files_per_s": read_rate, "load_avg_1m": loads}


def markdown(results: dict) -> str:
  m = results["machine"]
  lines = [
      f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; "
      f"`tools/scan_quality --workers={results['workers']}`; warm page cache; "
      f"synthetic Kaggle-layout TIFFs (tools/make_synthetic).",
      "",
      "| images | method | median wall (s) | img/s | runs (s) | ratio | "
      "CPU µs/img |",
      "|---|---|---|---|---|---|---|",
  ]
  for tag, r in results["runs"].items():
    for k, label in (("notebook", "notebook loop (PIL, `train.iloc[i]`)"),
                     ("scan", "`tools/scan_quality` (whole command)")):
      runs = ", ".join(f"{t:.2f}" for t in r["seconds"][k])
      ratio = f"**{r['ratio']:.1f}x**" if k == "scan" else "1x"
      lines.append(f"| {r['images']:,} | {label} | {r['median_s'][k]:.2f} | "
                   f"{r['img_per_s'][k]:,.0f} | {runs} | {ratio} | "
                   f"{r['cpu_us_per_img'][k]:.0f} |")
  for tag, s in results.get("generate_s", {}).items():
    if s:
      lines.append(f"\n`tools/make_synthetic` {tag}: {s:.0f} s wall.")
  loads = [x for r in results["runs"].values() for x in r["load_avg_1m"]]
  lines.append(f"\n1-minute load average during the runs: {min(loads)}-"
               f"{max(loads)} (other processes share the 2 cores).")
  return "\n".join(lines)


def json_line(run: dict) -> str:
  """One JSON line: the medians of both methods, their ratio and the load."""
  return json.dumps({"bench_scan": {
      "images": run["images"], "repeats": run["repeats"],
      "notebook_s": round(run["median_s"]["notebook"], 3),
      "scan_quality_s": round(run["median_s"]["scan"], 3),
      "ratio": round(run["ratio"], 2),
      "notebook_runs_s": [round(t, 3) for t in run["seconds"]["notebook"]],
      "scan_quality_runs_s": [round(t, 3) for t in run["seconds"]["scan"]],
      "cpu_us_per_img": {k: round(v, 1)
                         for k, v in run["cpu_us_per_img"].items()},
      "load_avg_1m": run["load_avg_1m"], "workers": _WORKERS.value}})


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  results = {"machine": machine(), "workers": _WORKERS.value, "runs": {},
             "generate_s": {}}
  n = _NUM_IMAGES.value
  ws = os.path.join(_OUT.value, f"ws_{n // 1000}k")
  results["generate_s"][f"{n:,} train"] = make_workspace(ws, n, 0)
  results["runs"][f"{n}"] = compare(ws, _REPEATS.value, f"{n // 1000}k")
  workspaces = [ws]
  if _FULL.value:
    full = os.path.join(_OUT.value, "ws_full")
    results["generate_s"]["220,025 train + 57,458 test"] = make_workspace(
        full, 220_025, 57_458)
    results["runs"]["220025"] = compare(full, 1, "full")
    workspaces.append(full)
  with open(os.path.join(_OUT.value, "bench_scan.json"), "w") as f:
    json.dump(results, f, indent=1)
  print("\n" + markdown(results))
  for run in results["runs"].values():
    print(json_line(run), flush=True)
  if _CLEANUP.value:
    for w in workspaces:
      shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
