"""In-graph guards: the input check, the loss-spike detector, step classes.

Everything here runs inside the compiled inner loop.
"""

from __future__ import annotations

import tensorflow as tf

# Step classes, as counted per loop.
GOOD, OVERFLOW, DIVERGENCE, SKIPPED_BATCH = 0, 1, 2, 3

# Incident kinds (DESIGN.md). The index is the in-graph code.
KINDS = (
  "nonfinite_inputs",
  "nonfinite_loss",
  "nonfinite_grads",
  "loss_spike",
  "loss_scale_floor",
  "nonfinite_params",
)
NONFINITE_INPUTS, NONFINITE_LOSS, NONFINITE_GRADS, LOSS_SPIKE, LOSS_SCALE_FLOOR = range(5)
NONFINITE_PARAMS = 5
NO_KIND = -1


def flatten_with_names(structure, prefix: str = "") -> list[tuple[str, object]]:
  """Leaves with readable paths ("x", "[0]", "features/age"), in tf.nest order."""
  if isinstance(structure, dict):
    out = []
    for key in sorted(structure):
      out += flatten_with_names(structure[key], f"{prefix}/{key}" if prefix else str(key))
    return out
  if isinstance(structure, (tuple, list)):
    out = []
    top = not prefix and len(structure) in (2, 3)
    for i, item in enumerate(structure):
      name = ("x", "y", "sample_weight")[i] if top else f"{prefix}[{i}]"
      out += flatten_with_names(item, name)
    return out
  return [(prefix or "batch", structure)]


def float_leaves(batch) -> list[tuple[str, tf.Tensor]]:
  """(name, tensor) for every floating-point leaf of a batch structure."""
  return [(p, t) for p, t in flatten_with_names(batch) if t.dtype.is_floating]


def leaf_names(element_spec) -> list[str]:
  return [p for p, _ in float_leaves(element_spec)]


def finite_rows(batch) -> tuple[tf.Tensor, tf.Tensor]:
  """Returns (row_ok, leaf_bad).

  row_ok: bool[B], True where every floating-point feature of the row is
    finite. leaf_bad: int32[L], the number of bad rows per floating leaf (in
    `float_leaves` order), which names the culprit feature in messages.
  """
  leaves = float_leaves(batch)
  if not leaves:
    n = tf.shape(tf.nest.flatten(batch)[0])[0]
    return tf.ones([n], tf.bool), tf.zeros([0], tf.int32)
  oks = []
  for _, t in leaves:
    ok = tf.math.is_finite(t)
    if t.shape.rank and t.shape.rank > 1:
      ok = tf.reduce_all(tf.reshape(ok, [tf.shape(t)[0], -1]), axis=1)
    elif t.shape.rank == 0:
      ok = tf.reshape(ok, [1])
    oks.append(ok)
  row_ok = oks[0]
  for ok in oks[1:]:
    row_ok = tf.logical_and(row_ok, ok)
  leaf_bad = tf.stack([tf.reduce_sum(tf.cast(~ok, tf.int32)) for ok in oks])
  return row_ok, leaf_bad


def bad_columns(batch) -> tf.Tensor:
  """int32[L]: for each floating leaf, the first feature column (last axis)
  holding a non-finite value, or -1. Used only for error messages."""
  cols = []
  for _, t in float_leaves(batch):
    if t.shape.rank and t.shape.rank > 1:
      bad = tf.reduce_any(~tf.math.is_finite(tf.reshape(t, [-1, tf.shape(t)[-1]])), axis=0)
      col = tf.cond(
        tf.reduce_any(bad),
        lambda bad=bad: tf.cast(tf.argmax(tf.cast(bad, tf.int32)), tf.int32),
        lambda: tf.constant(-1),
      )
    else:
      col = tf.constant(-1)
    cols.append(col)
  return tf.stack(cols) if cols else tf.zeros([0], tf.int32)


def mask_rows(batch, row_ok: tf.Tensor):
  """Keeps the rows where row_ok is True, in every leaf of the batch."""
  return tf.nest.map_structure(lambda t: tf.boolean_mask(t, row_ok), batch)


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
