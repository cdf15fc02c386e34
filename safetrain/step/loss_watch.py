"""The loss watch: robust running loss statistics, loss spikes and finite
blow-ups.

A good step's loss above `mean + threshold * max(dev, rel_floor * |mean|)`,
once `warmup_steps` good steps have been seen, is a spike. From the first
step on, warm-up or not, a loss above `growth_factor` times the best running
mean (and above the first loss) is a finite blow-up, `loss_growth`. The guard
treats both as divergence. The statistics run inside the compiled loop.
"""

from __future__ import annotations

import tensorflow as tf

from safetrain.core import kinds as kinds_lib
from safetrain.core import variables
from safetrain.step import piece


class SpikeDetector(tf.Module):
  """Robust running loss statistics that a NaN can never poison.

  The mean and the mean absolute deviation are exponential moving averages
  fed only by good steps' finite losses, each clipped to the spike threshold
  first, so one outlier cannot drag the statistics towards itself. `best` is
  the lowest the running mean has been, `first` the first good loss: what
  "orders of magnitude above" is measured against (only for positive losses).

  Args:
    enabled: False turns spike detection off.
    warmup_steps: good steps observed before a spike can be declared.
    threshold: deviations above the mean that make a spike.
    rel_floor: the deviation used is at least rel_floor * |mean|, so a very
      smooth loss curve does not make every small wiggle a spike.
    decay: EMA decay of both statistics.
    first_loss_fraction: a positive loss must also exceed this fraction of the
      run's first loss to be a spike (0 turns the floor off). An optimizer
      memorizing its data sees single batches at 10x a running mean that is a
      hundredth of where the run started: noise, not a divergence.
    growth_factor: a loss above growth_factor * max(best, first / growth_factor)
      is a blow-up; 0 turns it off. With both off, no statistics are kept.
  """

  def __init__(
    self,
    *,
    enabled: bool = True,
    warmup_steps: int = 100,
    threshold: float = 10.0,
    rel_floor: float = 0.25,
    decay: float = 0.98,
    first_loss_fraction: float = 0.0,
    growth_factor: float = 0.0,
  ):
    super().__init__(name="spike_detector")
    self.enabled = enabled
    self.growth_factor = float(growth_factor)
    self.keeps_stats = enabled or self.growth_factor > 0
    self.warmup_steps = warmup_steps
    self.threshold = threshold
    self.rel_floor = rel_floor
    self.decay = decay
    self.first_loss_fraction = float(first_loss_fraction)
    self.mean = tf.Variable(0.0, trainable=False, name="mean")
    self.dev = tf.Variable(0.0, trainable=False, name="dev")
    self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="count")
    self.best = tf.Variable(0.0, trainable=False, name="best")
    self.first = tf.Variable(0.0, trainable=False, name="first")

  @classmethod
  def from_config(cls, config) -> SpikeDetector:
    """The detector `config.guard.spike_*` and `guard.growth_factor` ask for."""
    g = config.guard
    return cls(
      enabled=g.spike_detection,
      warmup_steps=g.spike_warmup_steps,
      threshold=g.spike_threshold,
      rel_floor=g.spike_rel_floor,
      decay=g.spike_decay,
      first_loss_fraction=g.spike_first_loss_fraction,
      growth_factor=g.growth_factor,
    )

  # The compiled loop carries the statistics as tensors and writes them back
  # once per loop: variable reads and writes inside the step would chain every
  # step's ops behind them. With nothing to watch, they are () throughout.

  def read(self) -> tf.Tensor:
    """The statistics as one float32[5] vector (mean, dev, count, best,
    first), to carry through the compiled loop: one loop variable instead of
    five. The count is only compared with `warmup_steps` and 0, so its
    float32 saturation at 2**24 good steps changes nothing."""
    if not self.keeps_stats:
      return tf.zeros([0])
    return tf.stack([tf.cast(v.read_value(), tf.float32) for v in self._vars()])

  def write(self, stats: tf.Tensor) -> None:
    """Stores statistics carried through the loop."""
    if not self.keeps_stats:
      return
    for var, value in zip(self._vars(), tf.unstack(stats)):
      var.assign(tf.cast(value, var.dtype))

  def _vars(self) -> tuple:
    return (self.mean, self.dev, self.count, self.best, self.first)

  def _limit(self, mean: tf.Tensor, dev: tf.Tensor) -> tf.Tensor:
    return mean + self.threshold * tf.maximum(dev, self.rel_floor * tf.abs(mean))

  def is_spike(self, stats: tf.Tensor, loss: tf.Tensor) -> tf.Tensor:
    """Whether `loss` is a spike against the carried statistics."""
    if not self.enabled:
      return tf.constant(False)
    mean, dev, count, _, first = _fields(stats)
    limit = self._limit(mean, dev)
    if self.first_loss_fraction > 0:
      limit = tf.maximum(limit, self.first_loss_fraction * first)  # first <= 0: no floor
    return tf.logical_and(count >= self.warmup_steps, loss > limit)

  def is_growth(self, stats: tf.Tensor, loss: tf.Tensor) -> tf.Tensor:
    """Whether `loss` is orders of magnitude above the best running mean
    (and above the first loss), from the first step on."""
    if self.growth_factor <= 0:
      return tf.constant(False)
    _, _, count, best, first = _fields(stats)
    bound = tf.maximum(self.growth_factor * best, first)
    return (count > 0) & (best > 0) & (loss > bound)

  def observe(self, stats: tf.Tensor, loss: tf.Tensor, good: tf.Tensor) -> tf.Tensor:
    """The statistics after a step: fed by `loss` if the step was good."""
    if not self.keeps_stats:
      return stats
    mean, dev, count, best, first = _fields(stats)
    x = tf.minimum(loss, self._limit(mean, dev))
    d = self.decay
    start = count == 0
    new_mean = tf.where(start, loss, d * mean + (1 - d) * x)
    fed = tf.stack(
      [
        new_mean,
        tf.where(start, 0.0, d * dev + (1 - d) * tf.abs(x - mean)),
        count + 1.0,
        tf.where(start, loss, tf.minimum(best, new_mean)),
        tf.where(start, loss, first),
      ]
    )
    return tf.where(good, fed, stats)

  def far_above_best(self, factor: float) -> bool:
    """Host side: the running mean is more than `factor` times its best
    (positive losses only), and above `first_loss_fraction` of the first
    loss. Such a state is not saved as healthy, and one that stays there is
    a stalled run.

    The second condition keeps a run that is still far below where it started
    healthy: an MLP memorizing its data moves between running losses of 5e-5
    and 2e-4 (first loss 0.3), 3x apart, with nothing lost; a dead or blown-up
    run climbs back to the first loss's level or beyond.
    """
    best, mean = float(variables.number(self.best)), float(variables.number(self.mean))
    if int(variables.number(self.count)) == 0 or best <= 0 or mean <= factor * best:
      return False
    return mean > self.first_loss_fraction * float(variables.number(self.first))


def _fields(stats: tf.Tensor) -> list:
  """(mean, dev, count, best, first) of the carried vector.

  Slices, not `tf.unstack`: TensorFlow 2.21's Grappler remapper rewrites
  `tf.maximum(c * a, b)` into LeakyRelu(a) when `a` and `b` are two outputs of
  one op (it compares the nodes, not their outputs), so `is_growth`'s bound
  max(growth_factor * best, first) came out as `best` and every step above
  the first loss was a blow-up (tests/step/test_guard.py attacks it in a graph).
  """
  return [stats[i] for i in range(5)]


class LossWatchPiece(piece.Piece):
  """The loss watch in the step: a spike against the running statistics, a
  finite blow-up (`loss_growth`) against the best running mean; both are
  divergences. The statistics are carried through the loop as one vector."""

  name = "loss_watch"
  order = 40
  kinds = kinds_lib.declare(
    kinds_lib.Kind("loss_spike", "the loss jumped far above its running mean.", "#1a9641"),
    kinds_lib.Kind(
      "loss_growth",
      "the loss grew by orders of magnitude above its best (a finite blow-up).",
      "#2c7bb6",
    ),
  )
  config_keys = (
    "guard.spike_detection",
    "guard.spike_warmup_steps",
    "guard.spike_threshold",
    "guard.spike_rel_floor",
    "guard.spike_decay",
    "guard.spike_first_loss_fraction",
    "guard.growth_factor",
  )

  def __init__(self, detector: SpikeDetector):
    self.detector = detector

  @classmethod
  def build(cls, config, ctx):
    return cls(ctx.spike) if ctx.spike.keeps_stats else None

  def conditions(self, step):
    stats = step.carried[self.name]
    return [
      piece.Condition(
        self.order, kinds_lib.DIVERGENCE, "loss_spike", self.detector.is_spike(stats, step.loss)
      ),
      piece.Condition(
        self.order + 1,
        kinds_lib.DIVERGENCE,
        "loss_growth",
        self.detector.is_growth(stats, step.loss),
      ),
    ]

  def carry(self):
    return self.detector.read()

  def fold(self, carried, outcome, core):
    return self.detector.observe(carried, core.loss, core.good)

  def write(self, carried):
    self.detector.write(carried)
