"""Flags of hcd_train, defined once; turned into a TrainConfig here.

Defaults are the notebook's experiment (model1, Adam 0.9/0.999, batch 32,
10 epochs, flips, undersampling, 20% validation, seed 123). Flagfiles in
hcd/configs/ (copied to a workspace by `python -m hcd.configs`) set them
explicitly; flags on the command line override a flagfile:

  hcd_train --flagfile=model1.flags --epochs=2 --workdir=runs/try

Library code never reads these flags: `config_from_flags` builds the
TrainConfig that hcd.train.loop takes.
"""

from __future__ import annotations

import ast
import datetime
import sys

from absl import flags

from hcd import models
from hcd.train.config import ConfigError
from hcd.train.config import TrainConfig

FLAGS = flags.FLAGS

# --- data ---
flags.DEFINE_string("shards_dir", "shards",
                    "Directory with the shard manifests (tools/make_shards).")
flags.DEFINE_string("workdir", "",
                    "Run directory for checkpoints and artifacts; default "
                    "runs/<model>. An existing run there is resumed.")
flags.DEFINE_string("train_split", "train", "Shard split to train on.")
flags.DEFINE_string(
    "val_split", "", "Separate shard split to validate on (e.g. valid). "
    "Empty: hold out --val_fraction of --train_split by id hash.")
flags.DEFINE_float("val_fraction", 0.2,
                   "Fraction of ids (or groups) held out for validation; 0 "
                   "trains on everything without validation.")
flags.DEFINE_integer("split_seed", 123,
                     "Salt of the id hash that splits train/validation.")
flags.DEFINE_string("group_csv", "",
                    "CSV with columns id,group (e.g. slide): no group is "
                    "split between training and validation.")
flags.DEFINE_enum("balance", "undersample", ["undersample", "none", "reweight"],
                  "Class balance of the training subset: undersample the "
                  "majority class to equal counts (the notebook), none, or "
                  "reweight examples by inverse class frequency.")
flags.DEFINE_boolean("cache", True,
                     "Keep the selected training images in memory after the "
                     "first pass (uint8: 27.6 KB per image).")
flags.DEFINE_integer("shuffle_blocks", 16,
                     "Blocks of <=256 images in the shuffle buffer.")
flags.DEFINE_integer("mix_size", 1024,
                     "Images permuted together before batching.")

# --- model and optimisation ---
flags.DEFINE_enum("model", "model1", models.model_names(),
                  "Model from the hcd.models table (python -m hcd.models).")
flags.DEFINE_multi_string(
    "model_override", [], "Model builder argument as key=value (a Python "
    "literal), e.g. --model_override=dropout=0.3; repeatable.")
flags.DEFINE_integer("seed", 123, "Seed of initialisation, shuffling, "
                     "augmentation and undersampling.")
flags.DEFINE_integer("batch_size", 32, "Global batch size (all replicas).")
flags.DEFINE_integer("epochs", 10, "Epochs to train.")
flags.DEFINE_integer("steps_per_epoch", 0,
                     "Steps per epoch; 0: one pass over the training subset.")
flags.DEFINE_integer("val_steps", 0,
                     "Validation steps per epoch; 0: the whole subset.")
flags.DEFINE_float("learning_rate", None,
                   "Peak learning rate; default: the model's (hcd.models).")
flags.DEFINE_float("adam_beta1", 0.9, "Adam beta_1.")
flags.DEFINE_float("adam_beta2", 0.999, "Adam beta_2.")
flags.DEFINE_float("adam_epsilon", 1e-7, "Adam epsilon.")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (0: off).")
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"],
                  "Learning-rate schedule: constant, or linear warm-up then "
                  "cosine decay to 0 over all steps.")
flags.DEFINE_float("warmup_epochs", 0.0, "Warm-up epochs (cosine schedule).")
flags.DEFINE_float("label_smoothing", 0.0, "Binary label smoothing.")

# --- augmentation (in the train step, on the accelerator) ---
flags.DEFINE_boolean("flips", True,
                     "Random horizontal and vertical flips (the notebook).")
flags.DEFINE_boolean("rot90", False,
                     "Random 90-degree rotations (with --flips: the full "
                     "dihedral group D4).")
flags.DEFINE_float("color_jitter", 0.0,
                   "Brightness/contrast/saturation jitter strength "
                   "(0: off, ~0.1 mild).")
flags.DEFINE_float("stain_jitter", 0.0,
                   "H&E stain jitter sigma (0: off, ~0.05 'HED-light'); "
                   "helps on slides from other labs.")

# --- runtime ---
flags.DEFINE_enum("strategy", "auto",
                  ["auto", "mirrored", "multiworker", "one_device"],
                  "Distribution strategy; auto: multiworker with a TF_CONFIG "
                  "cluster, mirrored with several devices, else one device.")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "XLA-compile the per-replica step; auto: on with a GPU, "
                  "off on the CPU (XLA measured 3-4x slower there).")
flags.DEFINE_enum("mixed_precision", "none", ["none", "bf16", "fp16"],
                  "Mixed precision (fp16 adds dynamic loss scaling).")
flags.DEFINE_integer("steps_per_loop", 50,
                     "Train steps per tf.function call (dispatch overhead).")
flags.DEFINE_integer("checkpoint_every_steps", 0,
                     "Also checkpoint every N steps (0: at epoch ends).")
flags.DEFINE_integer("log_every_steps", 0,
                     "Log a progress line every N steps instead of a "
                     "progress bar (0: progress bar).")
flags.DEFINE_boolean("tensorboard", True, "Write TensorBoard summaries.")
flags.DEFINE_integer("cpu_logical_devices", 0,
                     "Split the CPU into N logical devices (multi-replica "
                     "tests on a CPU-only machine).")


def _parse_overrides(items) -> dict:
  out = {}
  for item in items:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"--model_override={item!r}: expected key=value")
    try:
      out[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      out[key] = raw  # A bare word is a string, e.g. weights=imagenet.
  return out


def config_from_flags(flag_values=FLAGS) -> TrainConfig:
  """Builds the TrainConfig of hcd_train from parsed flags.

  Raises:
    ConfigError: a malformed --model_override or an invalid value.
  """
  f = flag_values
  config = TrainConfig(
      model=f.model, shards_dir=f.shards_dir,
      workdir=f.workdir or f"runs/{f.model}",
      train_split=f.train_split, val_split=f.val_split,
      val_fraction=f.val_fraction, split_seed=f.split_seed,
      group_csv=f.group_csv, balance=f.balance, seed=f.seed,
      batch_size=f.batch_size, epochs=f.epochs,
      steps_per_epoch=f.steps_per_epoch, val_steps=f.val_steps,
      learning_rate=f.learning_rate, adam_beta1=f.adam_beta1,
      adam_beta2=f.adam_beta2, adam_epsilon=f.adam_epsilon,
      weight_decay=f.weight_decay, lr_schedule=f.lr_schedule,
      warmup_epochs=f.warmup_epochs, label_smoothing=f.label_smoothing,
      flips=f.flips, rot90=f.rot90, color_jitter=f.color_jitter,
      stain_jitter=f.stain_jitter, strategy=f.strategy,
      jit_compile=f.jit_compile, mixed_precision=f.mixed_precision,
      cpu_logical_devices=f.cpu_logical_devices,
      steps_per_loop=f.steps_per_loop, cache=f.cache,
      shuffle_blocks=f.shuffle_blocks, mix_size=f.mix_size,
      checkpoint_every_steps=f.checkpoint_every_steps,
      log_every_steps=f.log_every_steps, tensorboard=f.tensorboard,
      model_overrides=_parse_overrides(f.model_override))
  config.validate()
  return config


def resolved_flags_text(flag_values=FLAGS) -> str:
  """The train flags with their final values, as a flagfile.

  Running `hcd_train --flagfile=<workdir>/flags.txt` repeats the run.
  """
  module = sys.modules[__name__]
  lines = [f"# hcd_train resolved flags, "
           f"{datetime.datetime.now().isoformat(timespec='seconds')}",
           f"# command: {' '.join(sys.argv)}"]
  for flag in sorted(flag_values.get_flags_for_module(module),
                     key=lambda fl: fl.name):
    text = flag.serialize()
    if flag.name == "workdir" and not flag.value:
      text = f"--workdir=runs/{flag_values.model}"
    if text:
      lines.append(text)
  return "\n".join(lines) + "\n"
