"""Dynamic loss scaling for mixed_float16, owned by safetrain.

Keras's LossScaleOptimizer is not used: it has no floor, no hysteresis and no
skip counters, so after enough overflows its scale reaches 0 and the next
finite step writes NaN into the weights. This scaler follows Megatron-LM's
DynamicGradScaler (growth interval, hysteresis) and adds a floor and a cap.
"""

from __future__ import annotations

import tensorflow as tf

from safetrain.core import kinds as kinds_lib
from safetrain.step import piece


class DynamicLossScale(tf.Module):
  """A loss scale with growth, hysteresis, a floor and a cap.

  All state is in `tf.Variable`s, so it is checkpointed with the trainer and
  restored on rollback. `update` runs inside the compiled step, in
  cross-replica context when a distribution strategy is used.

  Args:
    initial: starting scale.
    growth_interval: consecutive good steps before the scale grows.
    growth_factor: multiplier on growth (> 1).
    backoff_factor: multiplier on backoff (in (0, 1)).
    hysteresis: overflows tolerated before the scale drops; refilled on growth.
    min_scale: the floor; an overflow at the floor is divergence, not routine.
    max_scale: the cap; growth never exceeds it, so the scale never overflows.
    enabled: False under float32/bfloat16, where the scale stays 1.
  """

  def __init__(
    self,
    *,
    initial: float = 2.0**15,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    hysteresis: int = 2,
    min_scale: float = 1.0,
    max_scale: float = 2.0**24,
    enabled: bool = True,
  ):
    super().__init__(name="loss_scale")
    self.enabled = enabled
    self.growth_interval = growth_interval
    self.growth_factor = growth_factor
    self.backoff_factor = backoff_factor
    self.hysteresis = hysteresis
    self.min_scale = min_scale
    self.max_scale = max_scale
    init = initial if enabled else 1.0
    self.initial = init
    self.scale = tf.Variable(init, dtype=tf.float32, trainable=False, name="scale")
    self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")
    self.hysteresis_left = tf.Variable(
      hysteresis, dtype=tf.int64, trainable=False, name="hysteresis_left"
    )

  @classmethod
  def from_config(cls, config) -> DynamicLossScale:
    """The scale `config.loss_scale` asks for (its keys are the arguments);
    enabled only under `precision.policy=mixed_float16`."""
    return cls(**config.loss_scale, enabled=config.precision.policy == "mixed_float16")

  def reset(self) -> None:
    """Back to the initial scale and counters (a resume under a new policy)."""
    self.scale.assign(self.initial)
    self.good_steps.assign(0)
    self.hysteresis_left.assign(self.hysteresis)

  def at_floor(self) -> tf.Tensor:
    return self.scale <= self.min_scale

  def update(self, grads_finite: tf.Tensor, counted: tf.Tensor | bool = True) -> None:
    """Updates the scale after a step whose loss was finite.

    Called inside the compiled step. `grads_finite` False is an overflow: the
    hysteresis budget is spent first, then the scale drops (never under the
    floor). True counts towards growth. `counted` False (a step skipped for
    another reason) leaves the state as it is.

    Arithmetic and selects, no branch: the step's apply-or-skip calls it on
    every attempt under `train.skip_update=select`, where a `tf.cond` would
    make a GPU wait for its predicate on the host.
    """
    if not self.enabled:
      return
    finite = tf.convert_to_tensor(grads_finite)
    counted = tf.convert_to_tensor(counted)
    scale = self.scale.read_value()
    good_steps = self.good_steps.read_value()
    left = self.hysteresis_left.read_value()
    grown = good_steps + 1
    grow = finite & (grown >= self.growth_interval)
    spent = left - 1
    drop = ~finite & (spent <= 0)
    new_scale = tf.where(
      grow,
      tf.minimum(scale * self.growth_factor, self.max_scale),
      tf.where(drop, tf.maximum(scale * self.backoff_factor, self.min_scale), scale),
    )
    # A growth and an overflow both restart the count of good steps.
    new_good = tf.where(finite & ~grow, grown, tf.zeros_like(grown))
    new_left = tf.where(
      grow,
      tf.constant(self.hysteresis, tf.int64),
      tf.where(finite, left, tf.maximum(spent, 0)),
    )
    self.scale.assign(tf.where(counted, new_scale, scale))
    self.good_steps.assign(tf.where(counted, new_good, good_steps))
    self.hysteresis_left.assign(tf.where(counted, new_left, left))


class LossScalePiece(piece.Piece):
  """The loss scale in the step (mixed_float16 only): the loss is scaled
  before the backward pass and the gradients unscaled after it; non-finite
  gradients are a routine overflow (the step skipped, the scale lowered),
  unless the scale is at its floor (`loss_scale_floor`, a divergence)."""

  name = "loss_scale"
  order = 22
  kinds = kinds_lib.declare(
    kinds_lib.Kind(
      "loss_scale_floor",
      "float16 gradients overflowed with the loss scale at loss_scale.min_scale.",
      "#8c510a",
      before_update=True,
    )
  )
  config_keys = ("precision.policy", "loss_scale")

  def __init__(self, scale: DynamicLossScale):
    self.scale = scale

  @classmethod
  def build(cls, config, ctx):
    return cls(ctx.loss_scale) if ctx.fp16 else None

  def inputs(self, step):
    step.scale = self.scale.scale.value()

  def conditions(self, step):
    overflow = ~step.grads_finite
    return [
      piece.Condition(
        self.order, kinds_lib.DIVERGENCE, "loss_scale_floor", overflow & self.scale.at_floor()
      ),
      piece.Condition(self.order + 0.5, kinds_lib.OVERFLOW, None, overflow),
    ]

  def on_update(self, applied, step_class):
    # A good step counts towards growth, an overflow spends hysteresis or
    # drops the scale; any other skipped step leaves the scale alone.
    self.scale.update(applied, counted=applied | (step_class == kinds_lib.OVERFLOW))
