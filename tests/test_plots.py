"""Tests for hcd.plots: valid PNGs are written atomically; bad input refused."""

import os

import numpy as np
import pytest

from hcd import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
  assert os.path.isfile(path)
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_SIGNATURE
  assert len(data) > 1000
  # No temporary file is left beside it.
  leftovers = [n for n in os.listdir(os.path.dirname(path)) if ".tmp-" in n]
  assert not leftovers


def _rows(n=4):
  return [dict(epoch=i, loss=1 / i, accuracy=0.5 + i / 20, auc=0.6 + i / 30,
               val_loss=1.1 / i, val_accuracy=0.5 + i / 25,
               val_auc=0.6 + i / 35) for i in range(1, n + 1)]


def test_all_plots_write_pngs(tmp_path):
  rng = np.random.default_rng(0)
  y = np.array([0, 0, 1, 1, 0, 1])
  p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
  _assert_png(plots.plot_history(_rows(), str(tmp_path / "sub" / "h.png")))
  _assert_png(plots.plot_confusion([[0.9, 0.1], [0.2, 0.8]],
                                   str(tmp_path / "c.png"),
                                   counts=[[9, 1], [2, 8]]))
  _assert_png(plots.plot_roc(y, p, str(tmp_path / "r.png")))
  _assert_png(plots.plot_runs_auc({"a": _rows(), "b": _rows(2)},
                                  str(tmp_path / "a.png")))
  _assert_png(plots.label_bar({0: 130908, 1: 89117}, str(tmp_path / "l.png")))
  imgs = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
  _assert_png(plots.sample_grid(imgs, str(tmp_path / "g.png"),
                                labels=[0, 1, 0, 1, -1],
                                captions=["", "dark", "", "", "bright"]))


def test_history_without_validation_still_plots(tmp_path):
  rows = [dict(epoch=1, loss=0.7, accuracy=0.6, val_auc=float("nan")),
          dict(epoch=2, loss=0.5, accuracy=0.7, val_auc="")]
  _assert_png(plots.plot_history(rows, str(tmp_path / "h.png")))


@pytest.mark.parametrize("call,match", [
    (lambda d: plots.plot_history([], d), "no history rows"),
    (lambda d: plots.plot_history([{"loss": 1.0}], d), "no 'epoch'"),
    (lambda d: plots.plot_history([{"epoch": 1, "foo": 2}], d),
     "none of loss"),
    (lambda d: plots.plot_confusion([[1, 0, 0]], d), "2x2"),
    (lambda d: plots.plot_confusion([[9, 1], [2, 8]], d), "in \\[0, 1\\]"),
    (lambda d: plots.plot_roc([1, 1], [0.2, 0.3], d), "both classes"),
    (lambda d: plots.plot_roc([0, 1], [0.2], d), "labels"),
    (lambda d: plots.plot_runs_auc({}, d), "no runs"),
    (lambda d: plots.plot_runs_auc({"a": [{"epoch": 1}]}, d), "no run has"),
    (lambda d: plots.label_bar({}, d), "no label counts"),
    (lambda d: plots.label_bar({0: -1}, d), "non-negative"),
    (lambda d: plots.label_bar({0: 0, 1: 0}, d), "all counts are zero"),
    (lambda d: plots.sample_grid(np.zeros((2, 96, 96), np.uint8), d),
     "\\[n>0, H, W, 3\\]"),
    (lambda d: plots.sample_grid(np.zeros((2, 96, 96, 3), np.float32), d),
     "uint8"),
    (lambda d: plots.sample_grid(np.zeros((2, 96, 96, 3), np.uint8), d,
                                 labels=[0]), "1 labels for 2 images"),
])
def test_bad_input_is_refused_and_nothing_written(tmp_path, call, match):
  path = str(tmp_path / "x.png")
  with pytest.raises(ValueError, match=match):
    call(path)
  assert os.listdir(tmp_path) == []
