"""A run that stopped learning: `stalled` and `dead_units`, checked once per
inner loop on the host.

Neither shows as a non-finite value, so the guard inside the step never sees
them: a deep ReLU network driven with a rate far too high loses its units in
the first steps (clipping keeps everything finite), its gradient collapses,
and it predicts one value forever; a recurrent network kicked into saturation
sits at a loss orders of magnitude above where it started. Both are recovered
like a diverging state: rollback to a healthy state before the collapse, with
a lower learning rate.

- `stalled`: the running loss (the spike detector's mean) has stayed above
  `guard.stall_factor` times its best for `guard.stall_steps` good steps; or,
  while it is that far above, the loop's mean pre-clip gradient norm fell
  under `guard.stall_norm_drop` times its running level (a collapse).
- `not_learning`: after `guard.learn_steps` good steps from the start (or
  from the last rollback), the running loss is not below `guard.learn_factor`
  times a reference: the loss of the trivial predictor (the targets' mean,
  median or label frequencies, for a keras loss the default compute_loss
  computes), or the loss at the initial weights; and the loss is no longer
  falling (a slow run that still improves is left alone). A run stuck from
  its start never exceeds 3x its best, so `stalled` cannot see it. A second
  finding whose loss is not 10% below the first's marks the rate cut futile:
  the run stops instead of cutting again.
- `dead_units`: once per loop, the first training batch runs through the
  model (inference mode, finite rows only); a ReLU-family layer with at least
  `guard.dead_min_units` units of which at least `guard.dead_fraction` output
  zero on every row is dead. Sequential and functional models are probed
  through their top-level layers; a subclassed model is not probed.

The running level of the gradient norm and the steps spent far above the best
loss are part of the state (they roll back with it, and are checkpointed).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import keras
import tensorflow as tf
from absl import logging

from safetrain.core import compat, kinds, variables
from safetrain.diagnosis.replay import fmt
from safetrain.step import guard
from safetrain.step.loss_watch import SpikeDetector
from safetrain.training import data as data_lib

_RELU = ("relu", "relu6")

# The kinds the host finds between loops, never inside the step: declared
# here, where they are checked (the loop's params_finite is the first).
KINDS = kinds.declare(
  kinds.Kind(
    "nonfinite_params",
    "a model or optimizer variable became non-finite after an update.",
    "#e7298a",
  ),
  kinds.Kind("stalled", "the run stopped learning: the loss stays far above its best.", "#525252"),
  kinds.Kind("dead_units", "ReLU units died: a layer outputs zero for every example.", "#01665e"),
  kinds.Kind(
    "not_learning",
    "the run is not learning: its loss is no better than the trivial predictor's.",
    "#bf812d",
  ),
)


class HealthState(tf.Module):
  """The stall detector's state; rolls back with the model."""

  def __init__(self):
    super().__init__(name="health")
    self.norm_level = tf.Variable(0.0, trainable=False, name="norm_level")
    self.loops = tf.Variable(0, dtype=tf.int64, trainable=False, name="loops")
    self.above_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="above_steps")


@dataclasses.dataclass
class Finding:
  kind: str  # "stalled", "dead_units" or "not_learning"
  diagnosis: str
  # not_learning only: a rollback with a lower rate was tried for it and the
  # run learned no better since: the remedy is not applied again.
  futile: bool = False


def _is_relu(layer) -> bool:
  if isinstance(layer, keras.layers.ReLU):
    return float(getattr(layer, "negative_slope", 0.0) or 0.0) == 0.0
  return getattr(getattr(layer, "activation", None), "__name__", None) in _RELU


class DeadUnitProbe:
  """Fractions of dead units per ReLU-family layer, on a fixed batch.

  Args:
    model: the live model (Sequential or functional; else no probe).
    x: the model's input part of the first training batch, or None.
    min_units: layers with fewer units are not probed.
  """

  def __init__(self, model: keras.Model, x, *, min_units: int):
    self.layers = []
    self._fn = None
    if x is None:
      return
    try:
      layers = [
        layer
        for layer in model.layers
        if _is_relu(layer) and (layer.output.shape[-1] or 0) >= min_units
      ]
      if not layers:
        return
      probe = keras.Model(model.inputs, [layer.output for layer in layers])
    except (AttributeError, ValueError, TypeError) as e:
      logging.info("dead-unit probe unavailable for %s: %s", model.name, e)
      return
    rows = _finite_rows(x)
    if rows is None:
      return
    self.layers = layers

    def fractions():
      outs = probe(rows, training=False)
      outs = outs if isinstance(outs, (list, tuple)) else [outs]
      dead = []
      for out in outs:
        out = tf.cast(out, tf.float32)
        peak = tf.reduce_max(tf.reshape(out, [-1, tf.shape(out)[-1]]), axis=0)
        dead.append(tf.reduce_mean(tf.cast(peak <= 0.0, tf.float32)))
      return tf.stack(dead)

    self._fn = tf.function(fractions, autograph=False)

  @property
  def active(self) -> bool:
    return self._fn is not None

  def __call__(self) -> list[tuple[keras.layers.Layer, float]]:
    if self._fn is None:
      return []
    return list(zip(self.layers, (float(f) for f in self._fn().numpy())))


def _finite_rows(x):
  """The rows of `x` (a tensor, or a nest of them) whose values are finite, or
  None when `x` is neither or no row is finite."""
  if not isinstance(x, tf.Tensor) and not tf.nest.is_nested(x):
    return None
  return guard.finite_rows_only(x)


class Health:
  """The per-loop check.

  Args:
    state: the detector's state.
    spike: the loss statistics (running mean and best).
    probe: the dead-unit probe.
    stall_factor, stall_steps, stall_norm_drop, dead_fraction: guard.*.
    describe_lr: () -> "learning rate 0.5 (adam; recovery scale 0.5)".
    reference: the loss to beat (`training.reference.Reference`), or None
      for no check.
    learn_steps, learn_factor: guard.*.
    last_restored: recovery's last restored step (a variable, -1 for none):
      the learning window starts there.
  """

  def __init__(
    self,
    *,
    state: HealthState,
    spike: SpikeDetector,
    probe: DeadUnitProbe,
    stall_factor: float,
    stall_steps: int,
    stall_norm_drop: float,
    dead_fraction: float,
    describe_lr,
    reference=None,
    learn_steps: int = 0,
    learn_factor: float = 1.0,
    last_restored=None,
  ):
    self.state = state
    self.spike = spike
    self.probe = probe
    self.stall_factor = stall_factor
    self.stall_steps = stall_steps
    self.stall_norm_drop = stall_norm_drop
    self.dead_fraction = dead_fraction
    self.describe_lr = describe_lr
    self.reference = reference
    self.learn_steps = learn_steps
    self.learn_factor = learn_factor
    self.last_restored = last_restored
    self._losses: list[tuple[int, float]] = []  # (step, the loop's mean loss)
    self._last_finding: float | None = None  # the running loss a rate cut was tried at

  def far_above_best(self) -> bool:
    """The running loss is `stall_factor` times its best or more: a state that
    is not saved, snapshotted or rolled back to."""
    return self.spike.far_above_best(self.stall_factor)

  def check(
    self, applied: int, norm_sum: float, step: int = 0, loss_sum: float = math.nan
  ) -> Finding | None:
    """Updates the state with one loop (`applied` good steps whose gradient
    norms and losses sum to `norm_sum`, `loss_sum`; the run now at `step`)
    and returns what is wrong, or None."""
    if not applied:
      return None
    self._losses.append((step, loss_sum / applied))
    return self._dead() or self._stalled(applied, norm_sum / applied) or self._not_learning(step)

  def _still_falling(self, start: int, step: int) -> bool | None:
    """Whether the loss is still falling: over the last `learn_steps` steps
    (since `start`), the median loop loss of the later half is under
    `1 - _FALLING` times the earlier half's, by more than the loops' noise
    could make it (a slow run is learning, and no lower rate helps it;
    medians, so that one loop's blow-up does not count as a trend). None
    with too few loops to tell (a resume mid-window keeps no history)."""
    first = max(start, step - self.learn_steps)
    self._losses = [(s, loss) for s, loss in self._losses if s > first]
    window = [loss for _, loss in self._losses if math.isfinite(loss)]
    if len(window) < _MIN_LOOPS:
      return None
    half = len(window) // 2
    early, late = statistics.median(window[:half]), statistics.median(window[-half:])
    # A loop's loss is noisy: its spread, from successive differences (which
    # cancel a trend), bounds what a fall between two medians of `half`
    # loops must exceed to be one; a stuck run's noise is no fall.
    spread = statistics.median(abs(b - a) for a, b in zip(window, window[1:])) / 0.954
    noise = _FALL_SIGNIFICANCE * 1.2 * spread * math.sqrt(2.0 / half)
    return late < (1.0 - _FALLING) * early and early - late > noise

  def _not_learning(self, step: int) -> Finding | None:
    ref = self.reference
    if not self.learn_steps or ref is None or not math.isfinite(ref.loss) or ref.loss <= 0:
      return None
    start = max(int(variables.number(self.last_restored)), 0) if self.last_restored else 0
    if step - start < self.learn_steps:
      return None
    if not int(variables.number(self.spike.count)):
      return None  # no loss statistics kept (spike detection and growth off)
    mean = float(variables.number(self.spike.mean))
    best = float(variables.number(self.spike.best))
    bar = self.learn_factor * ref.loss
    if not math.isfinite(mean) or mean < bar:
      return None
    if self._still_falling(start, step) is not False:
      return None  # slow, or too little history to tell: not yet a finding
    learned = math.isfinite(best) and best < bar
    history = (
      f"it had learned (best running loss {fmt(best)}) and fell back"
      if learned
      else "it never got there"
    )
    before, self._last_finding = self._last_finding, mean
    futile = before is not None and mean >= (1.0 - _HELPED) * before
    tried = (
      f"; the rollback with a lower rate did not help: the running loss was {fmt(before)} before it"
      if futile
      else ""
    )
    return Finding(
      "not_learning",
      f"the run is not learning: after {step - start} good steps its running loss "
      f"{fmt(mean)} is not below {fmt(self.learn_factor)}x the loss of {ref.what}, "
      f"{fmt(ref.loss)} (guard.learn_factor), and no longer falling; {history}{tried}; "
      f"{self.describe_lr()}. A model that does no better than that has learned nothing "
      "from its inputs: the rate is too high for it to settle (or too low to move), or the "
      "inputs carry no signal it can reach.",
      futile=futile,
    )

  def _stalled(self, applied: int, norm: float) -> Finding | None:
    s = self.state
    far = self.far_above_best()
    above = int(variables.number(s.above_steps)) + applied if far else 0
    level = float(variables.number(s.norm_level))
    loops = int(variables.number(s.loops))
    collapsed = loops >= 2 and level > 0 and norm < self.stall_norm_drop * level
    s.above_steps.assign(above)
    if self.stall_steps and far and (above >= self.stall_steps or collapsed):
      mean, best = float(self.spike.mean.numpy()), float(self.spike.best.numpy())
      how = (
        f"the mean gradient norm of the last loop, {fmt(norm)}, collapsed from its running "
        f"level {fmt(level)}"
        if collapsed
        else f"the gradient norm is {fmt(norm)} (running level {fmt(level)})"
      )
      return Finding(
        "stalled",
        f"the run stopped learning: its running loss {fmt(mean)} has stayed above "
        f"{fmt(self.stall_factor)}x its best {fmt(best)} for {above} good steps; {how}; "
        f"{self.describe_lr()}. A rate this high drove the model out of the region where it "
        "learned.",
      )
    if norm > 0 and math.isfinite(norm):
      # A geometric running level: collapses are measured in orders of magnitude.
      level = norm if level <= 0 else math.exp(0.7 * math.log(level) + 0.3 * math.log(norm))
      s.norm_level.assign(level)
      s.loops.assign_add(1)
    return None

  def _dead(self) -> Finding | None:
    if self.dead_fraction <= 0 or not self.probe.active:
      return None
    found = self.probe()
    dead = [(layer, f) for layer, f in found if f >= self.dead_fraction]
    if not dead:
      return None
    layer, fraction = max(dead, key=lambda lf: lf[1])
    units = int(layer.output.shape[-1])
    others = ", ".join(f"{x.name} {100 * f:.0f}%" for x, f in found if x is not layer)
    return Finding(
      "dead_units",
      f"layer {layer.name} ({type(layer).__name__}, relu): {round(fraction * units)} of "
      f"{units} units ({100 * fraction:.0f}%) output zero on every row of the first training "
      f"batch, so the layer passes nothing on and the model predicts one value"
      + (f" (dead units in the other ReLU layers: {others})" if others else "")
      + f"; {self.describe_lr()}. A learning rate this high pushes ReLU units below zero for "
      "every input in the first steps, where no gradient brings them back.",
    )


# A run whose loss fell by this fraction from the first half of its window to
# the second is still learning; a check needs this many loops in the window.
_FALLING = 0.03
# How many standard errors of the difference of the two halves' medians a
# fall must exceed (1.5: a stuck run's noise passes for a fall in ~7% of checks).
_FALL_SIGNIFICANCE = 1.5
_MIN_LOOPS = 4
# A rate cut for not_learning helped if the running loss is this much lower
# at the next finding (less is noise between windows).
_HELPED = 0.1


def build(
  config,
  *,
  model,
  optimizer,
  first_batch,
  state,
  spike,
  lr_scale,
  reference=None,
  last_restored=None,
) -> Health:
  """The per-loop check a trainer's config asks for.

  Args:
    config: the run's config (guard.stall_*, guard.dead_*, optimizer).
    model, optimizer: the live ones.
    first_batch: the first training batch (its input part feeds the probe).
    state: the detector's state.
    spike: the loss statistics.
    lr_scale: recovery's learning-rate scale variable.
    reference: the loss a learning run gets below, or None.
    last_restored: recovery's last restored step variable.
  """
  g = config.guard
  x = None
  if g.dead_fraction > 0:
    try:
      x = data_lib.unpack_batch(first_batch)[0]
    except ValueError:
      pass  # a layout only the trainer's compute_loss understands: no probe

  def describe_lr() -> str:
    lr = float(compat.learning_rate_schedule(optimizer)(optimizer.iterations))
    scale = float(lr_scale.numpy())
    # The optimizer may be the user's (build_optimizer, a compiled Keras
    # model's): its own schedule's rate, not config.optimizer's, is the base.
    base = f"its schedule's {lr / scale:.4g} now times " if scale > 0 else ""
    name = type(optimizer).__name__
    return f"learning rate {lr:.4g} ({name}: {base}recovery's scale {scale:.4g})"

  return Health(
    state=state,
    spike=spike,
    probe=DeadUnitProbe(model, x, min_units=g.dead_min_units),
    stall_factor=g.stall_factor,
    stall_steps=g.stall_steps,
    stall_norm_drop=g.stall_norm_drop,
    dead_fraction=g.dead_fraction,
    describe_lr=describe_lr,
    reference=reference,
    learn_steps=g.learn_steps,
    learn_factor=g.learn_factor,
    last_restored=last_restored,
  )
