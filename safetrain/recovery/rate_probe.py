"""The rate probe: which lower learning-rate scale learns fastest from the
state a `not_learning` rollback restored, each tried for a few steps.

A run that never learned gives no evidence of how far its rate is off: a
rate 2x too high and one 100x too high both sit at the trivial predictor's
loss. Halving it once and waiting `guard.learn_steps` steps per guess spends
the run; trying a few scales for `recovery.probe_steps` guarded steps each,
from the same restored state, and keeping the one whose loss fell lowest
costs a few hundred steps once. Each trial runs the compiled loop itself
(the same guard, the same step), and is undone after: the run goes on from
the restored state with the chosen scale, and no trial's step is recorded.

Under `recovery.data=replay` every trial sees the same batches (the restore
puts the data position back); under `skip` each trial reads the batches that
follow, as a rollback there skips batches anyway.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import tensorflow as tf
from absl import logging

from safetrain.diagnosis.replay import fmt
from safetrain.step.loop_state import STOP_ROLLBACK, LoopOutput


@dataclasses.dataclass(frozen=True)
class Trial:
  """One scale tried: `loss` is the mean loss of the good steps in the
  trial's later half (inf when it failed); `failed` says why, or ""."""

  scale: float
  loss: float
  failed: str = ""

  def record(self) -> dict:
    """As the rollback incident's `probe` field lists it."""
    loss = self.loss if math.isfinite(self.loss) else None
    return {
      "lr_scale": self.scale,
      "loss": loss,
      **({"failed": self.failed} if self.failed else {}),
    }


class RateProbe:
  """Tries lower learning-rate scales from one state and keeps the best.

  Args:
    factors: `recovery.probe_factors`: each candidate is the current scale
      times one of them.
    steps: `recovery.probe_steps` guarded steps per candidate (0: no probe).
    min_lr_scale: `recovery.min_lr_scale`: candidates under it are not tried.
    loop: the compiled guarded loop (`step.GuardedLoop`: iterator, n ->
      its output, read as numpy).
    feed: the run's training data; a trial reads its live iterator.
    lr_scale: recovery's learning-rate scale variable.
    carried: variables a rollback does not restore but a trial changes (the
      adaptive clip's statistics): put back after every trial.
  """

  def __init__(
    self,
    *,
    factors: Sequence[float],
    steps: int,
    min_lr_scale: float,
    loop,
    feed,
    lr_scale: tf.Variable,
    carried: Sequence[tf.Variable] = (),
  ):
    self.factors = tuple(float(f) for f in factors)
    self.steps = steps
    self.min_lr_scale = min_lr_scale
    self._loop, self._feed = loop, feed
    self._lr_scale = lr_scale
    self._carried = list(carried)

  def candidates(self, scale: float) -> list[float]:
    """The scales to try from `scale`, highest first: a factor that would
    go under recovery.min_lr_scale tries the floor itself (a rate far too
    high needs the lowest one allowed), none when `scale` is at the floor."""
    floor = self.min_lr_scale
    found = {max(scale * f, floor) for f in self.factors}
    return sorted((s for s in found if s < scale * (1 - 1e-6)), reverse=True)

  def choose(self, scale: float, *, restore: Callable[[], None]) -> tuple[float, list[Trial]]:
    """Tries every candidate from the state `restore` puts back.

    Returns (the chosen scale, the trials), or (0.0, []) when there is
    nothing to try. On return the state is the restored one again and the
    learning-rate scale is the chosen one.
    """
    scales = self.candidates(scale) if self.steps > 0 else []
    if not scales:
      return 0.0, []
    saved = [v.value() for v in self._carried]
    trials = []
    for i, s in enumerate(scales):
      if i:
        restore()
      trials.append(self._trial(s))
      for var, value in zip(self._carried, saved):
        var.assign(value)
    restore()
    chosen = best(trials)
    self._lr_scale.assign(chosen)
    return chosen, trials

  def _trial(self, scale: float) -> Trial:
    self._lr_scale.assign(scale)
    later = max(self.steps // 2, 1)
    first = self.steps - later
    if first:
      out = self._loop(self._feed.iterator, first)
      failed = _failed(out)
      if failed:
        return Trial(scale, math.inf, failed)
    out = self._loop(self._feed.iterator, later)
    failed = _failed(out)
    applied = int(out.applied)
    if failed or not applied:
      return Trial(scale, math.inf, failed or "no step trained")
    return Trial(scale, float(out.sums["loss"]) / applied)


def _failed(out: LoopOutput) -> str:
  if int(out.stop) == STOP_ROLLBACK:
    return "diverged"
  if not bool(out.params_finite):
    return "non-finite variables"
  return ""


def best(trials: list[Trial]) -> float:
  """The scale of the trial with the lowest loss (at equal loss the higher
  scale, which learns faster); the lowest scale when every trial failed."""
  finite = [t for t in trials if math.isfinite(t.loss)]
  if not finite:
    return min(t.scale for t in trials)
  return min(finite, key=lambda t: (t.loss, -t.scale)).scale


def describe(trials: list[Trial], chosen: float, *, step: int, steps: int) -> str:
  """The probe in one line: what each scale reached and which was kept."""
  parts = [f"{fmt(t.scale)} -> {t.failed or fmt(t.loss)}" for t in trials]
  return (
    f"rate probe from step {step} ({steps} steps per scale, mean loss of the later half): "
    f"{', '.join(parts)}; kept scale {fmt(chosen)}"
  )


def log(line: str) -> None:
  logging.warning("%s", line, extra={"safetrain_terminal": True})
