#!/usr/bin/env python3
"""Recipe study: each training lever alone and combined, on real PCam patches.

  .venv/bin/python bench/recipe_study.py --shards_dir=bench_out/pcam/shards \
      --out_dir=bench_out/pcam/study --experiments=baseline,ema,mixup [--epochs=10]

The shards come from `../shared/data/pcam96_jpeg` (tools/make_shards
--split=train and --split=valid). Every experiment is the base flagfile
(hcd/configs/resnet.flags unless --base) plus the flags of its row in
EXPERIMENTS below, trained on `train` and validated on `valid` only (model
selection never sees anything else). Per experiment this runs the real CLIs:

  hcd_train    --flagfile=<base> --val_split=valid <lever flags>
  hcd_evaluate --model=final --tta=1 and --tta=8 on valid

With --members=N each experiment is trained N times (seeds 1..N), with
--ensemble_bases=a.flags,b.flags once on each of those flagfiles; the row
scores the ensemble of the members (hcd_evaluate --ensemble), its cost is
their sum.

and appends one JSON row to <out_dir>/results.jsonl: valid AUC of the final
model with and without 8x dihedral TTA, wall and CPU minutes of hcd_train,
its median images/s, the best epoch, and the 1-minute load average before
and after (other processes on the box inflate wall time; CPU time less so).
Experiments already in results.jsonl are skipped, so the study resumes.
`--table` prints the markdown table of everything recorded.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (what it tests, extra hcd_train flags). Each row changes one thing
# relative to "baseline" unless its name says "combined". Rows of levers
# that lost and were removed from hcd (P4M ResNet, cutmix, centre crop,
# foveated input, strided stems, progressive resizing, centre pooling) are
# gone with them; their figures stay in BENCHMARKS.md.
EXPERIMENTS = {
    "baseline": ("resnet.flags as shipped (D4, stain 0.05, cosine 2e-3, "
                 "batch 64)", []),
    "ema": ("+ weight EMA, decay 0.999 (validate/save the average)",
            ["--ema_decay=0.999"]),
    "mixup": ("+ mixup, alpha 0.2", ["--mix=mixup", "--mix_alpha=0.2"]),
    "hsv": ("+ HSV: brightness/contrast/saturation 0.1, hue 0.04",
            ["--color_jitter=0.1", "--hue_jitter=0.04"]),
    "up128": ("input upsampled to 128 px (1.8x compute)",
              ["--model_override=size=128"]),
    "down64": ("input resized to 64 px in the model (keeps the context "
               "ring; 2.0x faster per image on an AVX2 CPU)",
               ["--model_override=size=64"]),
    "down72": ("input resized to 72 px in the model (1.4x faster per "
               "image on an AVX2 CPU)", ["--model_override=size=72"]),
    "budget29": ("--time_budget_min=29: as many epochs as fit, annealed "
                 "(29 min of epochs + start-up and artifacts ~ 30 wall-min)",
                 ["--time_budget_min=29"]),
    "down64_budget29": ("combined: input resized to 64 px + "
                        "--time_budget_min=29",
                        ["--model_override=size=64", "--time_budget_min=29"]),
    "down72_budget29": ("combined: input resized to 72 px + "
                        "--time_budget_min=29",
                        ["--model_override=size=72", "--time_budget_min=29"]),
    "down64_bs128_budget29": ("combined: input resized to 64 px + batch 128, "
                              "lr 4e-3 + --time_budget_min=29",
                              ["--model_override=size=64", "--batch_size=128",
                               "--learning_rate=0.004",
                               "--time_budget_min=29"]),
    "down72_bs128_budget29": ("combined: input resized to 72 px + batch 128, "
                              "lr 4e-3 + --time_budget_min=29",
                              ["--model_override=size=72", "--batch_size=128",
                               "--learning_rate=0.004",
                               "--time_budget_min=29"]),
    "down64_bs256_budget29": ("combined: input resized to 64 px + batch 256, "
                              "lr 8e-3 + --time_budget_min=29",
                              ["--model_override=size=64", "--batch_size=256",
                               "--learning_rate=0.008",
                               "--time_budget_min=29"]),
    "down48_bs128_budget29": ("combined: input resized to 48 px + batch 128, "
                              "lr 4e-3 + --time_budget_min=29 (0.56x the "
                              "compute of 64 px: more epochs)",
                              ["--model_override=size=48", "--batch_size=128",
                               "--learning_rate=0.004",
                               "--time_budget_min=29"]),
    "down64_bs128_budget29_stain0": ("pcam_cpu.flags without H&E stain "
                                     "jitter (0 instead of 0.05)",
                                     ["--model_override=size=64",
                                      "--batch_size=128",
                                      "--learning_rate=0.004",
                                      "--time_budget_min=29",
                                      "--stain_jitter=0"]),
    "stain0": ("no H&E stain jitter", ["--stain_jitter=0"]),
    "narrow_cpu": ("with --base=pcam_cpu.flags: stages of 32/64/128 channels "
                   "instead of 48/96/192 (0.55x the multiply-adds per image), "
                   "so the 29-minute budget holds more epochs",
                   ["--model_override=widths=(32,64,128)"]),
    "narrow_cpu_seed7": ("narrow_cpu with another seed (initial weights, "
                         "data order, augmentation draws)",
                         ["--model_override=widths=(32,64,128)",
                          "--seed=7"]),
    "narrower_cpu": ("with --base=pcam_cpu.flags: stages of 24/48/96 "
                     "channels (about 0.4x the multiply-adds per image)",
                     ["--model_override=widths=(24,48,96)"]),
    "narrow_cpu_stain": ("narrow_cpu with H&E stain jitter 0.05 again: at "
                         "~20 epochs the narrow net over-fits late, where "
                         "the jitter may pay for its slower fitting",
                         ["--model_override=widths=(32,64,128)",
                          "--stain_jitter=0.05"]),
    "narrow_cpu_sgd": ("narrow_cpu with SGD + Nesterov momentum 0.9 in "
                       "place of AdamW: peak lr 0.1 at batch 128, weight "
                       "decay 5e-4 (the classic ResNet recipe; Adam is known "
                       "to generalise worse on image classifiers)",
                       ["--model_override=widths=(32,64,128)",
                        "--optimizer=sgd", "--learning_rate=0.1",
                        "--weight_decay=0.0005"]),
    "sgd": ("SGD + Nesterov momentum 0.9 in place of AdamW: peak lr 0.05 "
            "at batch 64 (0.1 per 128), weight decay 5e-4",
            ["--optimizer=sgd", "--learning_rate=0.05",
             "--weight_decay=0.0005"]),
    "narrow72_cpu": ("narrow_cpu with the input resized to 72 px instead of "
                     "64 (1.27x the pixels): the wide stages scored best at "
                     "72 px when the epochs matched (eighth session)",
                     ["--model_override=widths=(32,64,128)",
                      "--model_override=size=72"]),
    "as_is": ("the --base flagfile unchanged (with --base=pcam.flags: the "
              "shipped recipe at its full budget)", []),
    "stain0.1": ("stronger H&E stain jitter (0.1)", ["--stain_jitter=0.1"]),
    "color0.1": ("+ brightness/contrast/saturation jitter 0.1",
                 ["--color_jitter=0.1"]),
    "ls0.1": ("label smoothing 0.1", ["--label_smoothing=0.1"]),
    "bs128": ("batch 128, lr 4e-3 (linear scaling)",
              ["--batch_size=128", "--learning_rate=0.004"]),
    "bs32": ("batch 32, lr 1e-3", ["--batch_size=32", "--learning_rate=0.001"]),
    "lr1e-3": ("peak lr 1e-3", ["--learning_rate=0.001"]),
    "wd": ("AdamW weight decay 0.05", ["--weight_decay=0.05"]),
    "wide": ("wider stages 96/192/384 (~2x compute)",
             ["--model_override=widths=(96,192,384)"]),
    "deep_narrow": ("2 blocks/stage at 48/96/192 (~equal compute)",
                    ["--model_override=widths=(48,96,192)",
                     "--model_override=blocks_per_stage=2"]),
    "bf16": ("bfloat16 mixed precision (fast on CPUs with AMX / "
             "AVX512-BF16 and on GPUs)", ["--mixed_precision=bf16"]),
    "bf16_wd": ("combined: bf16 + AdamW weight decay 0.05",
                ["--mixed_precision=bf16", "--weight_decay=0.05"]),
    "bf16_deep_narrow": ("combined: bf16 + 2 blocks/stage at 48/96/192",
                         ["--mixed_precision=bf16",
                          "--model_override=widths=(48,96,192)",
                          "--model_override=blocks_per_stage=2"]),
    "bf16_deep_narrow_ema": ("combined: bf16 + 2 blocks/stage at 48/96/192 "
                             "+ weight EMA 0.9995",
                             ["--mixed_precision=bf16",
                              "--model_override=widths=(48,96,192)",
                              "--model_override=blocks_per_stage=2",
                              "--ema_decay=0.9995"]),
    "bf16_deep_narrow_bs128": ("combined: bf16 + 2 blocks/stage at 48/96/192 "
                               "+ batch 128, lr 4e-3",
                               ["--mixed_precision=bf16",
                                "--model_override=widths=(48,96,192)",
                                "--model_override=blocks_per_stage=2",
                                "--batch_size=128", "--learning_rate=0.004"]),
    "bf16_bs128": ("combined: bf16 + batch 128, lr 4e-3",
                   ["--mixed_precision=bf16", "--batch_size=128",
                    "--learning_rate=0.004"]),
    # Rows for --base=pcam.flags at its full budget (issue 8, AMX sessions;
    # wd_hsv ran on pcam.flags before it took --weight_decay=0.05).
    "seed7": ("the --base recipe with another training seed (seed noise)",
              ["--seed=7"]),
    "wd_hsv": ("+ AdamW weight decay 0.05 + HSV: brightness/contrast/"
               "saturation 0.1, hue 0.04",
               ["--weight_decay=0.05", "--color_jitter=0.1",
                "--hue_jitter=0.04"]),
    "wd0.1": ("weight decay 0.1 instead of the base's (pcam.flags: 0.05)",
              ["--weight_decay=0.1"]),
    "wd0": ("no weight decay (plain Adam) instead of the base's 0.05",
            ["--weight_decay=0"]),
    "drop0": ("no dropout before the classifier (0 instead of 0.3)",
              ["--model_override=dropout=0"]),
    # For boxes without bf16 hardware, where pcam.flags' 22 epochs take hours:
    # which shape gives more at a fixed 30 minutes (pass --epochs to fit).
    "shallow_wide": ("the compact ResNet's default shape (1 block/stage at "
                     "64/128/256; 1.27x the base's images/s in bf16 on AMX)",
                     ["--model_override=widths=(64,128,256)",
                      "--model_override=blocks_per_stage=1"]),
}


def _bin(name: str) -> str:
  cand = os.path.join(os.path.dirname(sys.executable), name)
  return cand if os.path.exists(cand) else name


def _children_cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _evaluate(out_root: str, run_dirs: list[str], tta: int,
              shards_dir: str) -> float:
  """Valid AUC of the final model of a run, or of several runs' mean."""
  out = os.path.join(out_root, f"eval_final_tta{tta}")
  source = ([f"--ensemble={','.join(run_dirs)}"] if len(run_dirs) > 1
            else [f"--workdir={run_dirs[0]}"])
  subprocess.run([_bin("hcd_evaluate"), *source,
                  "--model=final", "--split=valid", f"--tta={tta}",
                  f"--shards_dir={shards_dir}", f"--out_dir={out}",
                  "--noprogress"], check=True,
                 stdout=subprocess.DEVNULL)
  with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
    return json.load(f)["roc_auc"]


def _stem(flagfile: str) -> str:
  return os.path.splitext(os.path.basename(flagfile))[0]


def run_name(name: str, args) -> str:
  """The row's name: the experiment's, marked when it is an ensemble."""
  if args.ensemble_bases:
    return f"{name}_ens_" + "+".join(_stem(b) for b in args.ensemble_bases)
  return f"{name}_x{args.members}" if args.members > 1 else name


def run_experiment(name: str, args) -> dict:
  """Trains and evaluates one experiment; returns its result row.

  An ensemble row trains several members one after another and is scored
  as the ensemble hcd_evaluate --ensemble makes of their final models (mean
  probability); its wall and CPU minutes are the members' sum, its epochs
  and images/s their mean. The members: with args.members = N > 1, the row
  N times with seeds 1..N (runs/<row>/seed<N>); with args.ensemble_bases,
  the row once on each of those base flagfiles (runs/<row>/<flagfile>).
  """
  desc, extra = EXPERIMENTS[name]
  row_name = run_name(name, args)
  workdir = os.path.join("runs", row_name)
  if os.path.exists(workdir):  # A half-finished run: start it over.
    shutil.rmtree(workdir)
  if args.ensemble_bases:
    members = [(b, [], _stem(b)) for b in args.ensemble_bases]
  elif args.members > 1:
    members = [(args.base, [f"--seed={s}"], f"seed{s}")
               for s in range(1, args.members + 1)]
  else:
    members = [(args.base, [], None)]
  load0 = os.getloadavg()[0]
  cpu0, t0 = _children_cpu(), time.perf_counter()
  mets, run_dirs = [], []
  for base, member_flags, sub in members:
    member_dir = os.path.join(workdir, sub) if sub else workdir
    cmd = [_bin("hcd_train"), f"--flagfile={base}",
           f"--shards_dir={os.path.abspath(args.shards_dir)}",
           "--val_split=valid", f"--workdir={member_dir}",
           f"--log_every_steps={args.log_every_steps}"]
    if args.epochs:
      cmd.append(f"--epochs={args.epochs}")
    cmd += extra + member_flags
    print(f"[{row_name}] {' '.join(cmd)}", flush=True)
    log_name = f"{row_name}_{sub}" if sub else row_name
    with open(os.path.join("logs", f"{log_name}.log"), "w") as log:
      subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(member_dir, "metrics.json"),
              encoding="utf-8") as f:
      mets.append(json.load(f))
    run_dirs.append(member_dir)
  wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
  load1 = os.getloadavg()[0]
  met = mets[0]
  mean = lambda key: sum(m[key] for m in mets) / len(mets)
  single = len(mets) == 1
  row = {
      "name": row_name, "description": desc, "flags": extra,
      "members": [sub for _, _, sub in members if sub],
      "epochs": mean("epochs"), "num_params": met.get("num_params"),
      "wall_min": wall / 60, "cpu_min": cpu / 60,
      "images_per_s": mean("images_per_s"),
      "val_auc": _evaluate(workdir, run_dirs, 1, args.shards_dir),
      "val_auc_tta8": _evaluate(workdir, run_dirs, 8, args.shards_dir),
      "member_val_auc": [m.get("roc_auc") for m in mets],
      "best_epoch": met.get("best_epoch") if single else None,
      "best_val_auc": met.get("best_val_auc") if single else None,
      "load_before": load0, "load_after": load1, "commit": _git_commit(),
      "base": ",".join(args.ensemble_bases) or args.base,
  }
  print(f"[{row_name}] valid AUC {row['val_auc']:.4f} (TTA8 "
        f"{row['val_auc_tta8']:.4f}), {row['wall_min']:.1f} wall-min, "
        f"{row['images_per_s']:.0f} img/s", flush=True)
  return row


def read_results(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def table(rows: list[dict]) -> str:
  lines = ["| lever | valid AUC | valid AUC, 8x TTA | wall min | CPU min | "
           "images/s | epochs | load |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['name']}: {r['description']} | {r['val_auc']:.4f} | "
        f"{r['val_auc_tta8']:.4f} | {r['wall_min']:.1f} | {r['cpu_min']:.1f} "
        f"| {r['images_per_s']:.0f} | {r['epochs']} | "
        f"{r['load_before']:.1f}-{r['load_after']:.1f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shards_dir", required=True)
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--experiments", default="baseline",
                      help=f"comma-separated, from {list(EXPERIMENTS)}")
  parser.add_argument("--base", default="resnet.flags",
                      help="the flagfile every experiment starts from")
  parser.add_argument("--epochs", type=int, default=0,
                      help="override the flagfile's epochs (0: keep)")
  parser.add_argument("--members", type=int, default=1,
                      help="train each experiment N times (seeds 1..N) and "
                      "score the ensemble of the N final models (row "
                      "<name>_x<N>)")
  parser.add_argument("--ensemble_bases", type=lambda v: [b for b in
                                                          v.split(",") if b],
                      default=[], help="comma-separated flagfiles: train each "
                      "row once on each (in place of --base) and score the "
                      "ensemble of their final models (row "
                      "<name>_ens_<a>+<b>)")
  parser.add_argument("--log_every_steps", type=int, default=100)
  parser.add_argument("--table", action="store_true",
                      help="print the recorded results and exit")
  args = parser.parse_args()
  if args.members < 1:
    parser.error(f"--members must be >= 1, got {args.members}")
  if args.ensemble_bases and args.members > 1:
    parser.error("--members and --ensemble_bases exclude each other")
  stems = [_stem(b) for b in args.ensemble_bases]
  if len(set(stems)) < len(stems):
    parser.error(f"--ensemble_bases names a flagfile twice: {stems} (each "
                 f"member's run directory is named after its flagfile)")
  os.makedirs(os.path.join(args.out_dir, "logs"), exist_ok=True)
  results_path = os.path.abspath(os.path.join(args.out_dir, "results.jsonl"))
  if args.table:
    print(table(read_results(results_path)))
    return
  names = [n for n in args.experiments.split(",") if n]
  unknown = [n for n in names if n not in EXPERIMENTS]
  if unknown:
    parser.error(f"unknown experiment(s) {unknown}; known: "
                 f"{list(EXPERIMENTS)}")
  args.shards_dir = os.path.abspath(args.shards_dir)
  os.chdir(args.out_dir)
  subprocess.run([sys.executable, "-m", "hcd.configs", "--out_dir=.",
                  "--overwrite"],
                 check=True, stdout=subprocess.DEVNULL)
  # Checked here, after the shipped flagfiles were copied in: a missing one
  # would otherwise fail only after the members before it had trained.
  missing = [b for b in args.ensemble_bases or [args.base]
             if not os.path.isfile(b)]
  if missing:
    parser.error(f"flagfile(s) {missing} not found in {os.getcwd()} (the "
                 f"shipped ones are copied there; give others by path)")
  done = {r["name"] for r in read_results(results_path)}
  for name in names:
    if run_name(name, args) in done:
      print(f"[{run_name(name, args)}] already in {results_path}; skipping",
            flush=True)
      continue
    row = run_experiment(name, args)
    with open(results_path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
  print(table(read_results(results_path)))


if __name__ == "__main__":
  main()
