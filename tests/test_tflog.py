"""TensorFlow's start-up log obeys TF_CPP_MIN_LOG_LEVEL (hcd.tflog)."""

import os
import subprocess
import sys

from hcd import tflog

BANNER = ("WARNING: All log messages before absl::InitializeLog() is called "
          "are written to STDERR\n")
INFO = ("I0000 00:00:1796607109.318412    1621 cudart_stub.cc:31] Could not "
        "find cuda drivers on your machine, GPU will not be used.\n")
INFO_2 = ("I0000 00:00:1796607675.018915    9877 cpu_feature_guard.cc:227] This "
          "TensorFlow binary is optimized\nTo enable the following "
          "instructions: AVX2 FMA\n")
ERROR = ("2024-12-07 01:31:21.774922: E external/local_xla/xla/stream_executor/"
         "cuda/cuda_fft.cc:485] Unable to register cuFFT factory\n")
OTHER = "a line that is no log line\n"


def test_filter_log_keeps_what_the_level_lets_through():
  text = OTHER + BANNER + INFO + INFO_2 + ERROR
  assert tflog.filter_log(text, 0) == text
  # A message's continuation line goes with it.
  assert tflog.filter_log(text, 1) == OTHER + ERROR
  assert tflog.filter_log(text, 2) == OTHER + ERROR
  assert tflog.filter_log(text, 3) == OTHER


def test_import_at_level_3_prints_nothing():
  code = ("import sys; from hcd import tflog; tflog.install(); "
          "print('python', file=sys.stderr); import tensorflow; "
          "print('imported', file=sys.stderr)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                     text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                     timeout=300, check=True)
  assert r.stderr == "python\nimported\n"
