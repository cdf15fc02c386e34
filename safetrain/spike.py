"""The loss-spike detector: robust running loss statistics.

A good step's loss above `mean + threshold * max(dev, rel_floor * |mean|)`,
once `warmup_steps` good steps have been seen, is a spike, which the guard
treats as divergence. The statistics run inside the compiled loop.
"""

from __future__ import annotations

import tensorflow as tf


class SpikeDetector(tf.Module):
  """Robust running loss statistics that a NaN can never poison.

  The mean and the mean absolute deviation are exponential moving averages
  fed only by good steps' finite losses, each clipped to the spike threshold
  first, so one outlier cannot drag the statistics towards itself.

  Args:
    enabled: False turns detection off (and stops keeping the statistics).
    warmup_steps: good steps observed before a spike can be declared.
    threshold: deviations above the mean that make a spike.
    rel_floor: the deviation used is at least rel_floor * |mean|, so a very
      smooth loss curve does not make every small wiggle a spike.
    decay: EMA decay of both statistics.
  """

  def __init__(
    self,
    *,
    enabled: bool = True,
    warmup_steps: int = 100,
    threshold: float = 10.0,
    rel_floor: float = 0.25,
    decay: float = 0.98,
  ):
    super().__init__(name="spike_detector")
    self.enabled = enabled
    self.warmup_steps = warmup_steps
    self.threshold = threshold
    self.rel_floor = rel_floor
    self.decay = decay
    self.mean = tf.Variable(0.0, trainable=False, name="mean")
    self.dev = tf.Variable(0.0, trainable=False, name="dev")
    self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="count")

  # The compiled loop carries the statistics as tensors (mean, dev, count) and
  # writes them back once per loop: variable reads and writes inside the step
  # would chain every step's ops behind them. Disabled, they are () throughout.

  def read(self) -> tuple:
    """The statistics as tensors, to carry through the compiled loop."""
    if not self.enabled:
      return ()
    return (self.mean.read_value(), self.dev.read_value(), self.count.read_value())

  def write(self, stats) -> None:
    """Stores statistics carried through the loop."""
    if not self.enabled:
      return
    mean, dev, count = stats
    self.mean.assign(mean)
    self.dev.assign(dev)
    self.count.assign(count)

  def _limit(self, mean: tf.Tensor, dev: tf.Tensor) -> tf.Tensor:
    return mean + self.threshold * tf.maximum(dev, self.rel_floor * tf.abs(mean))

  def is_spike(self, stats, loss: tf.Tensor) -> tf.Tensor:
    """Whether `loss` is a spike against the carried statistics."""
    if not self.enabled:
      return tf.constant(False)
    mean, dev, count = stats
    return tf.logical_and(count >= self.warmup_steps, loss > self._limit(mean, dev))

  def observe(self, stats, loss: tf.Tensor, good: tf.Tensor):
    """The statistics after a step: fed by `loss` if the step was good."""
    if not self.enabled:
      return ()
    mean, dev, count = stats
    x = tf.minimum(loss, self._limit(mean, dev))
    d = self.decay
    first = count == 0
    new_dev = tf.where(first, 0.0, d * dev + (1 - d) * tf.abs(x - mean))
    new_mean = tf.where(first, loss, d * mean + (1 - d) * x)
    return (
      tf.where(good, new_mean, mean),
      tf.where(good, new_dev, dev),
      count + tf.cast(good, count.dtype),
    )
