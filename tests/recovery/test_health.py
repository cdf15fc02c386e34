"""The per-loop check of a run that stopped learning: `stalled` (the loss far
above its best for long, or the gradient norm collapsed while it is)."""

from safetrain.recovery import health
from safetrain.step.loss_watch import SpikeDetector


def checker(stall_steps=10):
  spike = SpikeDetector()
  h = health.Health(
    state=health.HealthState(),
    spike=spike,
    probe=health.DeadUnitProbe(None, None, min_units=4),
    stall_factor=3.0,
    stall_steps=stall_steps,
    stall_norm_drop=1e-3,
    dead_fraction=1.0,
    describe_lr=lambda: "learning rate 0.5",
  )
  return h, spike


def running(spike, mean, best):
  spike.mean.assign(mean)
  spike.best.assign(best)
  spike.count.assign(50)


def test_a_loss_far_above_its_best_for_stall_steps_is_stalled():
  h, spike = checker()
  running(spike, mean=1.0, best=1.0)
  assert h.check(5, 5.0) is None and h.check(5, 5.0) is None
  running(spike, mean=10.0, best=1.0)  # 10x its best: not a healthy state
  assert h.far_above_best()
  assert h.check(5, 5.0) is None  # 5 steps above: not yet
  found = h.check(5, 5.0)
  assert found.kind == "stalled"
  assert "for 10 good steps" in found.diagnosis and "learning rate 0.5" in found.diagnosis


def test_a_collapsed_gradient_norm_is_stalled_at_once_when_the_loss_is_far_above():
  h, spike = checker(stall_steps=1000)
  running(spike, mean=1.0, best=1.0)
  for _ in range(3):
    assert h.check(5, 5.0) is None  # running norm level 1.0
  running(spike, mean=10.0, best=1.0)
  found = h.check(5, 5e-4)  # the mean norm fell 1000x+
  assert found.kind == "stalled" and "collapsed" in found.diagnosis


def test_a_collapse_with_a_loss_near_its_best_is_convergence_not_a_stall():
  h, spike = checker(stall_steps=10)
  running(spike, mean=1.0, best=1.0)
  for _ in range(3):
    h.check(5, 5.0)
  assert all(h.check(5, 5e-6) is None for _ in range(5))
  assert not h.far_above_best()
