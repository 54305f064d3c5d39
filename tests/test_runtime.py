"""Tests of hcd.train.runtime: strategy selection, XLA, precision, chief."""

import json
import os
import platform
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from hcd.train import runtime


@pytest.fixture
def no_tf_config(monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)


def test_strategy_selection(no_tf_config):
  assert isinstance(runtime.create_strategy("one_device"),
                    tf.distribute.OneDeviceStrategy)
  mirrored = runtime.create_strategy("mirrored")
  assert isinstance(mirrored, tf.distribute.MirroredStrategy)
  assert mirrored.num_replicas_in_sync == len(runtime._compute_devices())
  auto = runtime.create_strategy("auto")
  if len(runtime._compute_devices()) > 1:
    assert isinstance(auto, tf.distribute.MirroredStrategy)
  else:
    assert isinstance(auto, tf.distribute.OneDeviceStrategy)


def test_strategy_errors(monkeypatch, no_tf_config):
  with pytest.raises(ValueError, match="unknown strategy 'tpu'.*mirrored"):
    runtime.create_strategy("tpu")
  with pytest.raises(ValueError, match="needs TF_CONFIG"):
    runtime.create_strategy("multiworker")
  monkeypatch.setenv("TF_CONFIG", "{not json")
  with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
    runtime.create_strategy("auto")


def test_jit_compile_auto_follows_the_gpu():
  assert runtime.resolve_jit_compile("auto") == runtime.has_gpu()
  assert runtime.resolve_jit_compile("true") is True
  assert runtime.resolve_jit_compile("false") is False
  assert runtime.resolve_jit_compile(True) is True
  with pytest.raises(ValueError, match="known"):
    runtime.resolve_jit_compile("yes")


def test_mixed_precision_policy_and_loss_scaling():
  try:
    assert runtime.set_mixed_precision("bf16") == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().compute_dtype == "bfloat16"
    assert runtime.set_mixed_precision("fp16") == "mixed_float16"
  finally:
    runtime.set_mixed_precision("none")
  assert keras.mixed_precision.global_policy().name == "float32"
  with pytest.raises(ValueError, match="unknown mixed precision"):
    runtime.set_mixed_precision("fp8")
  opt = keras.optimizers.Adam()
  assert runtime.wrap_optimizer(opt, "bf16") is opt
  wrapped = runtime.wrap_optimizer(keras.optimizers.Adam(), "fp16")
  assert isinstance(wrapped, keras.optimizers.LossScaleOptimizer)


class _Cluster:
  """A strategy stand-in that only carries a real cluster resolver."""

  def __init__(self, spec, task_type, task_id):
    self.cluster_resolver = (
        tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(spec), task_type=task_type, task_id=task_id))


def test_chief_and_worker_write_dirs(tmp_path):
  workers = {"worker": ["h0:1", "h1:1"]}
  with_chief = {"chief": ["c:1"], "worker": ["h0:1"]}
  assert runtime.is_chief(_Cluster(workers, "worker", 0))
  assert not runtime.is_chief(_Cluster(workers, "worker", 1))
  assert runtime.is_chief(_Cluster(with_chief, "chief", 0))
  assert not runtime.is_chief(_Cluster(with_chief, "worker", 0))
  assert runtime.is_chief(runtime.create_strategy("one_device"))
  wd = str(tmp_path)
  assert runtime.worker_write_dir(wd, _Cluster(workers, "worker", 0)) == wd
  temp = runtime.worker_write_dir(wd, _Cluster(workers, "worker", 1))
  assert temp == os.path.join(wd, "workertemp_worker_1")
  os.makedirs(temp)
  runtime.remove_worker_dir(temp, wd)
  assert not os.path.exists(temp) and os.path.isdir(wd)
  runtime.remove_worker_dir(wd, wd)  # Never deletes the workdir itself.
  assert os.path.isdir(wd)


def test_auto_picks_multiworker_from_tf_config(monkeypatch):
  # Only the decision is checked: creating the strategy would connect.
  cfg = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
         "task": {"type": "worker", "index": 0}}
  monkeypatch.setenv("TF_CONFIG", json.dumps(cfg))
  assert runtime._num_cluster_tasks(runtime._tf_config()) == 2


def test_describe_is_json_ready(no_tf_config):
  d = runtime.describe(runtime.create_strategy("one_device"), False, "none")
  json.dumps(d)
  assert d["num_replicas"] == 1 and d["task"] is None


def test_mixed_precision_auto_follows_the_hardware(monkeypatch):
  def hardware(gpu, cpu_flags):
    monkeypatch.setattr(runtime, "_gpu_compute_capability", lambda: gpu)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: set(cpu_flags))

  hardware(None, {"avx2", "avx512f"})
  assert runtime.resolve_mixed_precision("auto") == "none"
  hardware(None, {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
  assert runtime.resolve_mixed_precision("auto") == "bf16"
  hardware(None, {"avx2", "avx512f", "avx512_bf16"})  # e.g. AMD Zen 4
  assert runtime.resolve_mixed_precision("auto") == "bf16"
  hardware(None, {"avx2", "avx512f", "avx512_vnni"})  # int8 only
  assert runtime.resolve_mixed_precision("auto") == "none"
  hardware((9, 0), set())
  assert runtime.resolve_mixed_precision("auto") == "bf16"
  hardware((7, 0), {"amx_bf16"})  # The GPU decides, not the host CPU.
  assert runtime.resolve_mixed_precision("auto") == "fp16"
  hardware((6, 0), {"amx_bf16"})  # P100: no tensor cores.
  assert runtime.resolve_mixed_precision("auto") == "none"
  # An explicit choice is kept whatever the hardware.
  assert runtime.resolve_mixed_precision("bf16") == "bf16"
  assert runtime.resolve_mixed_precision("none") == "none"
  with pytest.raises(ValueError, match="known"):
    runtime.resolve_mixed_precision("mixed")
  hardware((7, 5), set())
  opt = runtime.wrap_optimizer(keras.optimizers.Adam(), "auto")
  assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
  try:
    assert runtime.set_mixed_precision("auto") == "mixed_float16"
  finally:
    runtime.set_mixed_precision("none")


def test_cpu_flags_are_read_from_the_kernel():
  if not os.path.exists("/proc/cpuinfo"):
    pytest.skip("no /proc/cpuinfo (not Linux)")
  flags = runtime._cpu_flags()  # pylint: disable=protected-access
  if platform.machine() in ("x86_64", "AMD64"):
    assert {"sse2", "fpu"} <= flags
  else:
    assert isinstance(flags, set)


def _in_subprocess(code: str, onednn: str | None) -> str:
  env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
  if onednn is not None:
    env["TF_ENABLE_ONEDNN_OPTS"] = onednn
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                     capture_output=True, text=True, timeout=120, check=False)
  assert p.returncode == 0, p.stderr
  return p.stdout.strip().splitlines()[-1]


def test_hcd_turns_onednn_on_unless_the_user_said_otherwise():
  # Without hcd's default, TensorFlow leaves oneDNN off on CPUs without
  # AVX-512 VNNI/BF16 or AMX; a user's explicit setting must win.
  code = "import hcd, os; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
  assert _in_subprocess(code, None) == "1"
  assert _in_subprocess(code, "0") == "0"


def test_tensorflow_imported_first_is_told_not_reported_as_on():
  # TensorFlow chooses its kernels at import: hcd's default set after that
  # runs nothing on oneDNN (1.3x slower on AVX2 cores, BENCHMARKS.md), yet
  # TensorFlow's own flag would echo it. hcd must warn and not claim it.
  code = ("import warnings\n"
          "warnings.simplefilter('always')\n"
          "with warnings.catch_warnings(record=True) as w:\n"
          "  import tensorflow, hcd\n"
          "from hcd.train import runtime\n"
          "said = [str(x.message)[:40] for x in w\n"
          "        if issubclass(x.category, RuntimeWarning)]\n"
          "print(said, runtime.onednn_enabled())")
  late = _in_subprocess(code, None)
  assert "tensorflow was imported before hcd" in late
  assert late.endswith(" None")
  hcd_first = code.replace("import tensorflow, hcd", "import hcd, tensorflow")
  assert _in_subprocess(hcd_first, None) == "[] True"
  # The user's own setting, in place before TensorFlow, needs no warning.
  # (Only hcd's check runs here: a stand-in module is enough, and fast.)
  stand_in = ("import sys, types, warnings\n"
              "sys.modules['tensorflow'] = types.ModuleType('tensorflow')\n"
              "warnings.simplefilter('error')\n"
              "import hcd\n"
              "print(hcd.ONEDNN_DEFAULT_TOO_LATE)")
  assert _in_subprocess(stand_in, "0") == "False"
