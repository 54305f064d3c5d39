"""hcd: high-throughput histopathologic cancer detection on TensorFlow.

Only the version lives here, plus one environment default that must be in
place before TensorFlow is imported (below). Nothing is imported for its
side effects, so that `import hcd.data.quality` in a scanner worker stays
free of TensorFlow.
"""

import os
import sys
import warnings

# TensorFlow's x86 wheels turn oneDNN on by default only on CPUs with
# AVX-512 VNNI/BF16 or AMX; elsewhere (e.g. AVX2-only AMD EPYC) convolutions
# run on Eigen. There oneDNN made the compact ResNet's float32 training step
# 1.3-1.4x faster on 2 cores (BENCHMARKS.md, "Training step"). setdefault: a
# user's own TF_ENABLE_ONEDNN_OPTS, 0 included, wins.
#
# TensorFlow chooses its CPU kernels when it is imported: set after that,
# the variable changes what it reports (IsMklEnabled) but not what runs (the
# same step measured 1.3x slower with tensorflow imported before hcd,
# BENCHMARKS.md). hcd's binaries import hcd first; a script or notebook that
# imports tensorflow first is told so, and runtime.onednn_enabled() says it
# cannot tell.
ONEDNN_DEFAULT_TOO_LATE = ("tensorflow" in sys.modules and
                           "TF_ENABLE_ONEDNN_OPTS" not in os.environ)
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
if ONEDNN_DEFAULT_TOO_LATE:
  warnings.warn(
      "tensorflow was imported before hcd, so hcd's default "
      "TF_ENABLE_ONEDNN_OPTS=1 comes too late for this process: on CPUs "
      "without AVX-512 VNNI/BF16 or AMX its convolutions stay on Eigen "
      "(the compact ResNet's step: 1.3x slower on 2 AVX2 cores). Import hcd "
      "first, or set TF_ENABLE_ONEDNN_OPTS in the environment.",
      RuntimeWarning, stacklevel=2)

__version__ = "0.1.0"
