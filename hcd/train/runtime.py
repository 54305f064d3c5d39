"""Runtime: devices, distribution strategy, XLA and mixed precision.

The only module that calls `tf.config` or picks a strategy, so that every
device decision of a run is made (and logged) in one place.

What works, measured here with Keras 3.15 on TF 2.17.1 (the failures below
were not re-checked on the pinned TF 2.21): a custom loop whose per-replica
forward/backward is `tf.function(jit_compile=True)` and whose gradient
all-reduce and apply run outside XLA, through `strategy.run`. What fails:
`fit(jit_compile=True)` with 2 MirroredStrategy replicas ("Trying to access
resource .../replica_1/... from device ...:0") and `fit` under
MultiWorkerMirroredStrategy ("PerReplica ... unsupported type",
tensorflow#72388, keras#20585). See hcd/train/steps.py.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import logging
import tensorflow as tf

from hcd import rundir
from hcd.train.config import JIT_MODES
from hcd.train.config import PRECISIONS
from hcd.train.config import STRATEGIES

_KERAS_POLICIES = {"none": "float32", "bf16": "mixed_bfloat16",
                   "fp16": "mixed_float16"}


def configure_devices(cpu_logical_devices: int = 0,
                      gpu_memory_growth: bool = True) -> None:
  """Configures physical devices; call before TensorFlow initialises them.

  Args:
    cpu_logical_devices: if > 1, split the CPU into this many logical
      devices, so multi-replica code runs on a CPU-only machine (tests).
    gpu_memory_growth: allocate GPU memory on demand instead of all at once
      (several processes, e.g. local multi-worker runs, can share a GPU).

  Raises:
    RuntimeError: if TensorFlow's devices were already initialised with a
      different configuration.
  """
  if gpu_memory_growth:
    for gpu in tf.config.list_physical_devices("GPU"):
      try:
        tf.config.experimental.set_memory_growth(gpu, True)
      except RuntimeError:
        pass  # Already initialised: growth cannot change any more.
  if cpu_logical_devices and cpu_logical_devices > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == cpu_logical_devices:
      return
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_logical_devices)


def _tf_config() -> dict:
  raw = os.environ.get("TF_CONFIG", "")
  if not raw:
    return {}
  try:
    return json.loads(raw)
  except ValueError as e:
    raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None


def _num_cluster_tasks(tf_config: dict) -> int:
  cluster = tf_config.get("cluster", {})
  return sum(len(cluster.get(k, [])) for k in ("chief", "worker"))


def _compute_devices() -> list[str]:
  gpus = tf.config.list_logical_devices("GPU")
  if gpus:
    return [d.name for d in gpus]
  return [d.name for d in tf.config.list_logical_devices("CPU")]


def create_strategy(name: str = "auto") -> tf.distribute.Strategy:
  """Creates the distribution strategy of a run.

  Args:
    name: "auto" (multiworker when TF_CONFIG names several tasks, mirrored
      over all local GPUs or logical CPUs when there are several, else
      one_device), "mirrored", "multiworker" or "one_device".

  Returns:
    The strategy.

  Raises:
    ValueError: unknown name, or multiworker without a TF_CONFIG cluster.
  """
  if name not in STRATEGIES:
    raise ValueError(f"unknown strategy {name!r}; known: {list(STRATEGIES)}")
  tf_config = _tf_config()
  if name == "auto":
    if _num_cluster_tasks(tf_config) > 1:
      name = "multiworker"
    elif len(_compute_devices()) > 1:
      name = "mirrored"
    else:
      name = "one_device"
  if name == "multiworker":
    if not tf_config.get("cluster"):
      raise ValueError("--strategy=multiworker needs TF_CONFIG with a "
                       "cluster spec and this process's task")
    # RING works on CPU and GPU hosts alike; NCCL is picked by AUTO on GPUs.
    impl = (tf.distribute.experimental.CommunicationImplementation.AUTO
            if tf.config.list_physical_devices("GPU") else
            tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=impl))
  elif name == "mirrored":
    strategy = tf.distribute.MirroredStrategy(devices=_compute_devices())
  else:
    strategy = tf.distribute.OneDeviceStrategy(_compute_devices()[0])
  logging.info("strategy: %s with %d replica(s)", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy


def has_gpu() -> bool:
  """True when TensorFlow sees a GPU."""
  return bool(tf.config.list_physical_devices("GPU"))


def resolve_jit_compile(mode: str | bool = "auto") -> bool:
  """Resolves --jit_compile: auto is on with a GPU and off on the CPU.

  XLA's CPU backend lacks oneDNN's convolutions and measured 3-4x slower
  here, while on GPUs it fuses the elementwise tail of every layer.

  Args:
    mode: "auto", "true", "false" (or a bool).

  Returns:
    Whether to jit-compile the train and eval steps.

  Raises:
    ValueError: unknown mode.
  """
  if isinstance(mode, bool):
    return mode
  if mode not in JIT_MODES:
    raise ValueError(f"unknown jit_compile mode {mode!r}; known: "
                     f"{list(JIT_MODES)}")
  return has_gpu() if mode == "auto" else mode == "true"


def _cpu_flags() -> set[str]:
  """The CPU feature flags the Linux kernel reports (empty elsewhere)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


# CPU features (as /proc/cpuinfo names them) with bf16 dot-product
# instructions that oneDNN uses for bf16 convolutions and matmuls.
_NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def _gpu_compute_capability() -> tuple[int, int] | None:
  """(major, minor) of the first GPU ((0, 0) if unknown); None without one."""
  gpus = tf.config.list_physical_devices("GPU")
  if not gpus:
    return None
  details = tf.config.experimental.get_device_details(gpus[0])
  return tuple(details.get("compute_capability") or (0, 0))


def resolve_mixed_precision(mode: str = "none") -> str:
  """Resolves --mixed_precision: auto picks what the hardware runs natively.

  auto is bf16 on GPUs of compute capability >= 8.0 (bfloat16 tensor cores)
  and on CPUs with native bf16 dot products, AMX-BF16 or AVX512-BF16
  (oneDNN runs bf16 convolutions on them: the compact ResNet's step measured
  1.45x faster than float32 on 2 Sapphire Rapids cores with AMX, and 1.51x on
  2 AMD EPYC cores with AVX512-BF16, BENCHMARKS.md); fp16 on GPUs of compute
  capability 7.x (fp16 tensor cores, no bf16); float32 elsewhere, where
  bfloat16 would be emulated and slower (e.g. CPUs with AVX2 only, the P100
  of the original notebook).

  Args:
    mode: "auto", "none", "bf16" or "fp16".

  Returns:
    "none", "bf16" or "fp16".

  Raises:
    ValueError: unknown mode.
  """
  if mode not in PRECISIONS:
    raise ValueError(f"unknown mixed precision {mode!r}; known: "
                     f"{list(PRECISIONS)}")
  if mode != "auto":
    return mode
  capability = _gpu_compute_capability()
  if capability is not None:
    if capability >= (8, 0):
      return "bf16"
    return "fp16" if capability >= (7, 0) else "none"
  return "bf16" if _NATIVE_BF16_CPU_FLAGS & _cpu_flags() else "none"


def set_mixed_precision(precision: str = "none") -> str:
  """Sets the global Keras dtype policy (before building models).

  Args:
    precision: "none" (float32), "bf16", "fp16" or "auto"
      (resolve_mixed_precision).

  Returns:
    The Keras policy name.

  Raises:
    ValueError: unknown precision.
  """
  import keras  # pylint: disable=g-import-not-at-top
  policy = _KERAS_POLICIES[resolve_mixed_precision(precision)]
  keras.mixed_precision.set_global_policy(policy)
  return policy


def wrap_optimizer(optimizer, precision: str):
  """Adds dynamic loss scaling for fp16 (bf16 has fp32's range, needs none).

  Args:
    optimizer: a Keras optimizer.
    precision: "none", "bf16", "fp16" or "auto".

  Returns:
    The optimizer, wrapped in keras.optimizers.LossScaleOptimizer for fp16.
  """
  import keras  # pylint: disable=g-import-not-at-top
  if resolve_mixed_precision(precision) == "fp16":
    return keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


def task_info(strategy: tf.distribute.Strategy) -> tuple[str | None, int]:
  """Returns (task_type, task_id) of this process; (None, 0) if single."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return None, 0
  return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the process that writes a run's artifacts.

  The chief is task "chief", or worker 0 when the cluster has no chief
  (the TensorFlow convention).
  """
  task_type, task_id = task_info(strategy)
  if task_type is None:
    return True
  if task_type == "chief":
    return True
  resolver = strategy.cluster_resolver
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and not has_chief


def worker_write_dir(workdir: str, strategy: tf.distribute.Strategy) -> str:
  """Where this process writes checkpoints.

  Every worker of a multi-worker run must take part in saving (the variables
  are read collectively), but only the chief's copy is kept: the others
  write to `<workdir>/workertemp_<type>_<id>` (hcd.rundir.RunDir.worker_temp)
  and delete it (Keras/TF convention).
  """
  if is_chief(strategy):
    return workdir
  task_type, task_id = task_info(strategy)
  return rundir.RunDir(workdir).worker_temp(task_type, task_id)


def remove_worker_dir(path: str, workdir: str) -> None:
  """Deletes a non-chief's temporary write directory (never the workdir)."""
  if os.path.abspath(path) != os.path.abspath(workdir):
    shutil.rmtree(path, ignore_errors=True)


def barrier(strategy: tf.distribute.Strategy) -> None:
  """Blocks until every worker gets here (a tiny all-reduce).

  Used at the end of a multi-worker run: a worker that exits while another
  is still writing artifacts makes the latter's coordination heartbeats fail.
  """
  mean_across_workers(strategy, [1.0])


def mean_across_workers(strategy: tf.distribute.Strategy,
                        values: list[float]) -> list[float]:
  """The mean of `values` over all workers (the values themselves on one).

  For decisions every worker must take alike, from figures (timings) that
  differ between them.
  """
  extended = strategy.extended
  if not extended._in_multi_worker_mode():  # pylint: disable=protected-access
    return list(values)
  local = tf.constant(values, tf.float64)

  @tf.function
  def all_reduce():
    value = strategy.run(lambda: tf.identity(local))
    return strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)

  return [float(v) for v in all_reduce().numpy()]


def onednn_enabled() -> bool | None:
  """Whether TensorFlow runs CPU ops through oneDNN (None if it cannot tell).

  hcd turns it on by default (hcd/__init__.py); TF_ENABLE_ONEDNN_OPTS=0
  turns it off. When tensorflow was imported before hcd without the
  variable set, TensorFlow had already chosen its kernels, and its own
  report would echo hcd's late default: then this says it cannot tell.
  """
  import hcd  # pylint: disable=g-import-not-at-top
  if hcd.ONEDNN_DEFAULT_TOO_LATE:
    return None
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):  # A TensorFlow without the helper.
    return None


def describe(strategy: tf.distribute.Strategy, jit: bool,
             precision: str) -> dict:
  """A JSON-friendly description of the runtime, for config.json and logs."""
  task_type, task_id = task_info(strategy)
  return {
      "strategy": type(strategy).__name__,
      "num_replicas": strategy.num_replicas_in_sync,
      "devices": list(getattr(strategy.extended, "worker_devices", [])),
      "task": f"{task_type}:{task_id}" if task_type else None,
      "jit_compile": jit,
      "mixed_precision": precision,
      "onednn": onednn_enabled(),
      "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
      "tensorflow": tf.__version__,
  }
