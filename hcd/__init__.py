"""hcd: high-throughput histopathologic cancer detection on TensorFlow.

Only the version lives here, plus one environment default that must be in
place before TensorFlow runs its first graph (below). Nothing is imported for
its side effects, so that `import hcd.data.quality` in a scanner worker stays
free of TensorFlow.
"""

import os

# TensorFlow's x86 wheels turn oneDNN on by default only on CPUs with
# AVX-512 VNNI/BF16 or AMX; elsewhere (e.g. AVX2-only AMD EPYC) convolutions
# run on Eigen. There oneDNN made the compact ResNet's float32 training step
# 1.3-1.4x faster on 2 cores (BENCHMARKS.md, "Training step"). setdefault: a
# user's own TF_ENABLE_ONEDNN_OPTS, 0 included, wins. TensorFlow reads it
# lazily, so it also takes effect when tensorflow was imported before hcd.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
