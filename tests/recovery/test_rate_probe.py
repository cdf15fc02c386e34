"""The rate probe (issue 21): a `not_learning` rollback tries a few lower
learning-rate scales for `recovery.probe_steps` steps each from the restored
state and goes on with the one whose loss fell lowest; the trials are
undone."""

import math
import os
import types

import numpy as np
import pytest
import tensorflow as tf
from common import TinyTrainer, regression_data
from test_not_learning import learn_config

import safetrain
from safetrain.recovery import rate_probe
from safetrain.step.loop_state import STOP_NONE, STOP_ROLLBACK


def rollbacks(workdir):
  records = safetrain.read_jsonl(os.path.join(workdir, "incidents.jsonl"))
  return [r for r in records if r["action"] == "rollback"]


@pytest.mark.parametrize(
  "scale, factors, floor, expected",
  [
    (1.0, (0.5, 0.1, 0.02), 1 / 64, [0.5, 0.1, 0.02]),
    # A factor under the floor tries the floor itself, once.
    (0.25, (0.5, 0.1, 0.02), 1 / 64, [0.125, 0.025, 1 / 64]),
    (0.03, (0.5, 0.1, 0.02), 1 / 64, [0.015625]),
    # At the floor there is nothing lower to try.
    (1 / 64, (0.5, 0.1), 1 / 64, []),
  ],
)
def test_candidates(scale, factors, floor, expected):
  probe = rate_probe.RateProbe(
    factors=factors, steps=10, min_lr_scale=floor, loop=None, feed=None, lr_scale=None
  )
  assert probe.candidates(scale) == pytest.approx(expected)


@pytest.mark.parametrize(
  "trials, expected",
  [
    ([(0.5, 2.0), (0.1, 0.3), (0.02, 0.4)], 0.1),
    ([(0.5, math.inf), (0.1, 0.3)], 0.1),
    # Equal losses: the higher scale, which learns faster.
    ([(0.5, 0.3), (0.1, 0.3)], 0.5),
    # Every trial failed: the lowest scale.
    ([(0.5, math.inf), (0.1, math.inf)], 0.1),
  ],
)
def test_best(trials, expected):
  assert rate_probe.best([rate_probe.Trial(s, loss) for s, loss in trials]) == expected


class FakeLoop:
  """A loop whose loss is |scale - 0.1| and which moves a weight and the
  carried clip statistic, so the test sees what the probe undoes."""

  def __init__(self, lr_scale, weight, carried, diverge_at=None):
    self.lr_scale, self.weight, self.carried = lr_scale, weight, carried
    self.diverge_at = diverge_at
    self.calls = []

  def __call__(self, iterator, n):
    assert iterator == "the live iterator"
    scale = float(self.lr_scale.numpy())
    self.calls.append((round(scale, 6), n))
    self.weight.assign_add(float(n))
    self.carried.assign_add(1.0)
    stop = STOP_ROLLBACK if scale == self.diverge_at else STOP_NONE
    return safetrain_loop_output(applied=n, loss_sum=n * abs(scale - 0.1), stop=stop)


def safetrain_loop_output(*, applied, loss_sum, stop):
  class Out:
    pass

  out = Out()
  out.applied, out.sums, out.stop, out.params_finite = applied, {"loss": loss_sum}, stop, True
  return out


def test_choose_runs_each_trial_from_the_restored_state_and_undoes_it():
  lr_scale = tf.Variable(1.0)
  weight, carried = tf.Variable(0.0), tf.Variable(7.0)
  loop = FakeLoop(lr_scale, weight, carried, diverge_at=0.5)
  restores = []

  def restore():
    restores.append(float(weight.numpy()))
    weight.assign(0.0)

  probe = rate_probe.RateProbe(
    factors=(0.5, 0.08, 0.3),
    steps=10,
    min_lr_scale=0.01,
    loop=loop,
    feed=types.SimpleNamespace(iterator="the live iterator"),
    lr_scale=lr_scale,
    carried=[carried],
  )
  chosen, trials = probe.choose(1.0, restore=restore)
  # Highest first; a trial is two loops (the later half is measured), and
  # one that diverges in its first half is not run on.
  assert loop.calls == [(0.5, 5), (0.3, 5), (0.3, 5), (0.08, 5), (0.08, 5)]
  # Restored before every trial but the first, and once at the end.
  assert restores == [5.0, 10.0, 10.0]
  assert float(weight.numpy()) == 0.0 and float(carried.numpy()) == 7.0
  assert chosen == pytest.approx(0.08) and float(lr_scale.numpy()) == pytest.approx(0.08)
  assert [t.failed for t in trials] == ["diverged", "", ""]
  assert trials[1].loss == pytest.approx(0.2) and trials[2].loss == pytest.approx(0.02)
  assert trials[0].record() == {"lr_scale": 0.5, "loss": None, "failed": "diverged"}


def test_a_rate_far_too_high_is_probed_down_and_learns(workdir):
  """Adam at 3.0: the plain halving leaves the run near the mean predictor
  (test_not_learning.py); the probe finds a scale that learns."""
  result = TinyTrainer(learn_config(**{"optimizer.learning_rate": 3.0}), workdir).fit()
  (rollback,) = rollbacks(workdir)
  # The check waits for learn_steps good steps; where the blow-up's fall
  # ends is chaotic at this rate (101 or 141 on two CPUs), so any window.
  assert rollback["kind"] == "not_learning"
  assert 101 <= rollback["step"] <= 201 and rollback["step"] % 10 == 1
  scales = [t["lr_scale"] for t in rollback["probe"]]
  assert scales == pytest.approx([0.5, 0.1, 0.02])
  best = min(rollback["probe"], key=lambda t: t["loss"])
  assert rollback["lr_scale_after"] == pytest.approx(best["lr_scale"])
  assert "rate probe from step" in rollback["probe_text"]
  assert result.step == 300
  _, y = regression_data()
  assert result.loss < 0.05 * float(y.var()), result.loss
  # Under recovery.data=skip the data is not replayed: the batches from the
  # restored state to the finding, and the three trials' 100 each, are skipped.
  assert rollback["batches_skipped"] == (rollback["step"] - 1 - rollback["restored_step"]) + 300


def test_the_trials_are_undone(tmp_path):
  """Under recovery.data=replay the run after a probe is bit for bit the run
  that cut its rate straight to the chosen scale: no trial leaves a trace
  in the weights, the optimizer, the guard's or the adaptive clip's
  statistics (carried across rollbacks, put back after each trial)."""

  def run(name, **overrides):
    workdir = str(tmp_path / name)
    c = learn_config(
      **{
        "optimizer.learning_rate": 3.0,
        "recovery.data": "replay",
        "clip.mode": "adaptive",
        **overrides,
      }
    )
    trainer = TinyTrainer(c, workdir)
    result = trainer.fit()
    return result, [w.numpy() for w in trainer.model.weights], rollbacks(workdir)

  probed, weights, (rollback,) = run("probed")
  cut = rollback["lr_scale_after"] / rollback["lr_scale_before"]
  plain, plain_weights, (plain_rollback,) = run(
    "plain", **{"recovery.probe_steps": 0, "recovery.lr_backoff": cut}
  )
  assert len(rollback["probe"]) == 3 and "probe" not in plain_rollback
  assert plain_rollback["lr_scale_after"] == pytest.approx(rollback["lr_scale_after"])
  assert (plain_rollback["step"], plain_rollback["restored_step"]) == (
    rollback["step"],
    rollback["restored_step"],
  )
  assert probed.step == plain.step == 300
  for a, b in zip(weights, plain_weights):
    np.testing.assert_array_equal(a, b)


def test_probe_factors_are_checked():
  c = learn_config(**{"recovery.probe_factors": (0.5, 1.5)})
  with pytest.raises(safetrain.ConfigError, match="recovery.probe_factors"):
    TinyTrainer(c, "unused")
