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

  def update(self, grads_finite: tf.Tensor) -> None:
    """Updates the scale after a step whose loss was finite.

    Called inside the compiled step. `grads_finite` False is an overflow: the
    hysteresis budget is spent first, then the scale drops (never under the
    floor). True counts towards growth.
    """
    if not self.enabled:
      return

    def on_good():
      grown = self.good_steps + 1

      def grow():
        self.scale.assign(tf.minimum(self.scale * self.growth_factor, self.max_scale))
        self.good_steps.assign(0)
        self.hysteresis_left.assign(self.hysteresis)
        return tf.constant(True)

      def count():
        self.good_steps.assign(grown)
        return tf.constant(False)

      return tf.cond(grown >= self.growth_interval, grow, count)

    def on_overflow():
      self.good_steps.assign(0)
      left = self.hysteresis_left - 1
      self.hysteresis_left.assign(tf.maximum(left, 0))

      def drop():
        self.scale.assign(tf.maximum(self.scale * self.backoff_factor, self.min_scale))
        return tf.constant(True)

      return tf.cond(left <= 0, drop, lambda: tf.constant(False))

    tf.cond(grads_finite, on_good, on_overflow)


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

  def on_apply(self):
    self.scale.update(tf.constant(True))

  def on_skip(self, step_class):
    tf.cond(
      step_class == kinds_lib.OVERFLOW,
      lambda: self.scale.update(tf.constant(False)),
      lambda: None,
    )
