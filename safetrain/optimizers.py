"""Optimizers and learning-rate schedules built from `config.optimizer`.

The effective learning rate is `schedule(step) * lr_scale * rewarm(step)`,
where `lr_scale` and the re-warm anchor are variables owned by recovery, so
lowering the learning rate after a rollback never retraces the compiled loop.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from safetrain import compat


class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """A Keras schedule multiplied by a learning-rate scale and a re-warm ramp.

  Args:
    base: the schedule (or a constant float) before scaling.
    lr_scale: scalar float32 variable (1.0 until recovery lowers it).
    rewarm_start: scalar int64 variable: the step a rollback restored, or -1.
    rewarm_steps: steps over which the rate ramps back up after a rollback
      (0 disables the ramp).
  """

  def __init__(self, base, lr_scale: tf.Variable, rewarm_start: tf.Variable, rewarm_steps: int = 0):
    self.base = base
    self.lr_scale = lr_scale
    self.rewarm_start = rewarm_start
    self.rewarm_steps = rewarm_steps

  def __call__(self, step):
    if callable(self.base):
      lr = tf.cast(self.base(step), tf.float32)
    else:
      lr = tf.constant(self.base, tf.float32)
    lr = lr * self.lr_scale
    if self.rewarm_steps > 0:
      since = tf.cast(step, tf.int64) - self.rewarm_start
      ramp = tf.clip_by_value(tf.cast(since + 1, tf.float32) / float(self.rewarm_steps), 0.0, 1.0)
      lr = lr * tf.where(self.rewarm_start >= 0, ramp, 1.0)
    return lr

  def get_config(self):
    return {"rewarm_steps": self.rewarm_steps}


def build_schedule(
  *, name: str, learning_rate: float, total_steps: int, warmup_steps: int, end_lr_factor: float
):
  """Returns a Keras schedule (or a float for `constant`)."""
  schedules = keras.optimizers.schedules
  end = learning_rate * end_lr_factor
  if name == "constant":
    return float(learning_rate)
  if name == "cosine":
    return schedules.CosineDecay(learning_rate, decay_steps=total_steps, alpha=end_lr_factor)
  if name == "warmup_cosine":
    return schedules.CosineDecay(
      0.0,
      decay_steps=max(total_steps - warmup_steps, 1),
      alpha=end_lr_factor,
      warmup_target=learning_rate,
      warmup_steps=warmup_steps,
    )
  if name == "linear":
    return schedules.PolynomialDecay(learning_rate, total_steps, end, power=1.0)
  if name == "warmup_constant":
    return _WarmupConstant(learning_rate, warmup_steps)
  raise ValueError(f"unknown schedule {name!r}")


class _WarmupConstant(keras.optimizers.schedules.LearningRateSchedule):
  def __init__(self, learning_rate: float, warmup_steps: int):
    self.learning_rate = learning_rate
    self.warmup_steps = warmup_steps

  def __call__(self, step):
    if self.warmup_steps <= 0:  # a run too short for a warm-up
      return tf.constant(self.learning_rate, tf.float32)
    frac = tf.cast(step + 1, tf.float32) / float(self.warmup_steps)
    return self.learning_rate * tf.minimum(frac, 1.0)

  def get_config(self):
    return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}


def build_optimizer(
  *,
  name: str,
  learning_rate,
  beta_1: float,
  beta_2: float,
  epsilon: float,
  momentum: float,
  nesterov: bool,
  weight_decay: float,
) -> keras.optimizers.Optimizer:
  """Returns a Keras 3 optimizer. Clipping is not set here: safetrain clips."""
  opt = keras.optimizers
  wd = weight_decay or None
  if name == "adam":
    return opt.Adam(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, weight_decay=wd)
  if name == "adamw":
    return opt.AdamW(
      learning_rate, weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon
    )
  if name == "nadam":
    return opt.Nadam(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, weight_decay=wd)
  if name == "sgd":
    return opt.SGD(learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=wd)
  if name == "rmsprop":
    return opt.RMSprop(learning_rate, momentum=momentum, epsilon=epsilon, weight_decay=wd)
  if name == "adagrad":
    return opt.Adagrad(learning_rate, epsilon=epsilon, weight_decay=wd)
  if name == "lion":
    return opt.Lion(learning_rate, beta_1=beta_1, beta_2=beta_2, weight_decay=wd)
  raise ValueError(f"unknown optimizer {name!r}")


def wrap_learning_rate(
  optimizer: keras.optimizers.Optimizer,
  *,
  default_schedule: Callable[[], object] | None,
  lr_scale: tf.Variable,
  rewarm_start: tf.Variable,
  rewarm_steps: int,
) -> None:
  """Makes the optimizer's learning rate a `ScaledSchedule` recovery can lower.

  Args:
    optimizer: a built Keras optimizer; its schedule (or constant rate) is
      kept as the base.
    default_schedule: builds the base from config.optimizer instead, for the
      optimizer safetrain built itself (its rate is a plain number), or None.
    lr_scale, rewarm_start, rewarm_steps: see ScaledSchedule.
  """
  base = compat.learning_rate_schedule(optimizer)  # a schedule or a variable
  if not isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
    base = default_schedule() if default_schedule is not None else float(np.asarray(base))
  compat.set_learning_rate_schedule(
    optimizer, ScaledSchedule(base, lr_scale, rewarm_start, rewarm_steps)
  )
