"""Tests of hcd.train.schedule: the held cosine and the time budget's sums."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from hcd.train import schedule


def _values(lr, steps):
  return np.array([float(lr(tf.constant(s, tf.int64))) for s in steps])


def test_without_a_hold_it_is_keras_cosine_decay():
  steps = [0, 1, 5, 9, 10, 11, 37, 63, 99, 100, 130]
  held = schedule.HeldCosineDecay(2e-3, warmup_steps=10, hold_steps=10,
                                  decay_steps=90)
  ref = keras.optimizers.schedules.CosineDecay(
      2e-5, decay_steps=90, alpha=0.0, warmup_target=2e-3, warmup_steps=10)
  np.testing.assert_allclose(_values(held, steps), _values(ref, steps),
                             rtol=1e-6, atol=1e-12)


def test_the_peak_holds_then_the_cosine_runs_late():
  held = schedule.HeldCosineDecay(1.0, warmup_steps=10, hold_steps=30,
                                  decay_steps=40)
  warm = _values(held, range(0, 11))
  assert warm[0] == pytest.approx(0.01) and np.all(np.diff(warm) > 0)
  np.testing.assert_allclose(_values(held, range(10, 31)), 1.0, rtol=1e-6)
  after = _values(held, [30, 40, 50, 70, 90])
  want = [0.5 * (1 + math.cos(math.pi * t / 40)) for t in (0, 10, 20, 40, 40)]
  np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-7)


def test_a_replan_moves_the_end_not_the_current_value():
  held = schedule.HeldCosineDecay(1.0, warmup_steps=0, hold_steps=20,
                                  decay_steps=100)
  traces = []

  @tf.function
  def lr_at(step):
    traces.append(1)
    return held(step)

  # Planned at the hold's end (step 20) to end at step 70: the first plan of
  # a budgeted run, a cosine over 50 steps.
  held.replan(70, 20)
  assert float(lr_at(tf.constant(20, tf.int64))) == pytest.approx(1.0)
  at_45 = 0.5 * (1 + math.cos(math.pi / 2))
  assert float(lr_at(tf.constant(45, tf.int64))) == pytest.approx(at_45)
  # Re-planned at step 45 (progress 1/2) to end at step 55: the value at 45
  # holds, the other half of the cosine runs over 10 steps.
  held.replan(55, 45)
  assert float(lr_at(tf.constant(45, tf.int64))) == pytest.approx(at_45)
  assert float(lr_at(tf.constant(50, tf.int64))) == pytest.approx(
      0.5 * (1 + math.cos(math.pi * 0.75)))
  assert float(lr_at(tf.constant(55, tf.int64))) == pytest.approx(0.0)
  assert float(lr_at(tf.constant(90, tf.int64))) == pytest.approx(0.0)
  # The peak before the anchor is untouched.
  assert float(lr_at(tf.constant(10, tf.int64))) == pytest.approx(1.0)
  # Lengthened again at 50: still continuous, ends at 80.
  before = float(lr_at(tf.constant(50, tf.int64)))
  held.replan(80, 50)
  assert float(lr_at(tf.constant(50, tf.int64))) == pytest.approx(before)
  values = _values(held, range(50, 81))
  assert np.all(np.diff(values) <= 1e-7) and values[-1] == pytest.approx(0)
  # An end at or before the step it is planned at still leaves one step.
  held.replan(50, 60)
  assert held.get_config()["end_step"] == 61
  assert len(traces) == 1


def test_bad_schedule_arguments_are_rejected():
  with pytest.raises(ValueError, match="hold_steps 5 < warmup_steps 10"):
    schedule.HeldCosineDecay(1.0, warmup_steps=10, hold_steps=5,
                             decay_steps=5)
  with pytest.raises(ValueError, match="decay_steps must be >= 1"):
    schedule.HeldCosineDecay(1.0, warmup_steps=0, hold_steps=0,
                             decay_steps=0)


def test_budget_end_counts_the_short_last_epoch_by_its_steps():
  # The plan of test_budget_steps: 740 steps, 540 still to train at 2 s,
  # and 6 validations of 40 s (epochs 3-8, the 8th with 40 steps): the run
  # ends at exactly its 1,800-s budget, not an epoch later.
  assert schedule.budget_end(480, 2.0, 40, 200, 740, 100, 2) == 1800
  # Whole epochs only: 5 more of 240 s.
  assert schedule.budget_end(600, 2.0, 40, 200, 700, 100, 2) == 1800
  # Nothing left to train: no time left either.
  assert schedule.budget_end(900, 2.0, 40, 300, 300, 100, 3) == 900


def test_budget_steps():
  # Epochs of 100 steps at 2 s plus 40 s of validation (240 s); 30 min
  # budget, 2 epochs (200 steps) took 8 min: 5 whole epochs fit (20 min),
  # and of the 2 min left, 80 s train 40 steps before a last validation.
  assert schedule.budget_steps(1800, 480, 2.0, 40, 200, 100, 2200) == 740
  # Whole epochs only, when nothing is left after them.
  assert schedule.budget_steps(1800, 600, 2.0, 40, 200, 100, 2200) == 700
  assert schedule.budget_steps(1800, 840, 2.0, 40, 200, 100, 2200) == 600
  # Left time shorter than a validation pass: no short epoch.
  assert schedule.budget_steps(1800, 820, 2.0, 40, 200, 100, 2200) == 600
  # Capped by --epochs.
  assert schedule.budget_steps(1800, 600, 0.1, 10, 200, 100, 1000) == 1000
  # Over budget already: one whole epoch to anneal in.
  assert schedule.budget_steps(1800, 1900, 2.0, 40, 200, 100, 2200) == 300
  assert schedule.budget_steps(1800, 1700, 2.0, 40, 200, 100, 2200) == 300
  # A re-plan (the cosine under way) may end sooner: here at once.
  assert schedule.budget_steps(1800, 1900, 2.0, 40, 200, 100, 2200,
                               min_steps=0) == 200
  assert schedule.budget_steps(1800, 1700, 2.0, 40, 250, 100, 2200,
                               min_steps=0) == 280
  # 50 s left: 5 steps (10 s) would fit before a 40-s validation pass, not
  # worth the pass; 80 s left: 20 steps (40 s) are.
  assert schedule.budget_steps(1800, 1750, 2.0, 40, 300, 100, 2200,
                               min_steps=0) == 300
  assert schedule.budget_steps(1800, 1720, 2.0, 40, 300, 100, 2200,
                               min_steps=0) == 320
  # The same at the decision, after whole epochs: 4 epochs and no 5-step one.
  assert schedule.budget_steps(1800, 790, 2.0, 40, 200, 100, 2200) == 600


def test_which_runs_a_budget_changes():
  assert schedule.decision_epoch(0) == 2
  assert schedule.decision_epoch(1) == 2
  assert schedule.decision_epoch(2.5) == 3
  assert schedule.budget_active(30, 22, 1)
  assert not schedule.budget_active(0, 22, 1)
  assert not schedule.budget_active(30, 2, 1)  # Nothing left to cut.


def test_make_schedule_picks_the_plain_cosine_without_a_budget():
  plain = schedule.make_schedule("cosine", 1e-3, 10, 100, 1)
  assert type(plain) is keras.optimizers.schedules.CosineDecay
  assert plain.decay_steps == 900 and plain.warmup_steps == 100
  held = schedule.make_schedule("cosine", 1e-3, 10, 100, 1,
                                time_budget_min=30)
  assert isinstance(held, schedule.HeldCosineDecay)
  assert held.hold_steps == 200 and held.get_config()["end_step"] == 1000
  assert schedule.make_schedule("constant", 1e-3, 10, 100, 1, 30) == 1e-3
