"""Optimizers and learning-rate schedules built from `config.optimizer`.

The effective learning rate is
`schedule(step) * base_factor * lr_scale * rewarm(step)`, where `lr_scale` and
the re-warm anchor are variables owned by recovery and `base_factor` is the
user's (Keras's ReduceLROnPlateau lowers it), so lowering the learning rate
never retraces the compiled loop.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from safetrain.core import compat


@keras.saving.register_keras_serializable(package="safetrain")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """A Keras schedule multiplied by a base factor, a learning-rate scale and a
  re-warm ramp: `base(step) * base_factor * lr_scale * ramp(step)`.

  `base_factor` is the user's (ReduceLROnPlateau lowers it, through the Keras
  callbacks adapter); `lr_scale` and the ramp are recovery's. Neither undoes
  the other: each is its own variable, and a rollback restores neither.

  It serializes (`get_config`/`from_config`, registered as
  `safetrain>ScaledSchedule`), so a model compiled with the trainer's
  optimizer saves and loads: the base schedule is saved whole and the
  factor, scale and re-warm anchor as the numbers they hold at save time.

  Args:
    base: the schedule (or a constant float) before scaling.
    lr_scale: scalar float32 variable (1.0 until recovery lowers it), or a number.
    rewarm_start: scalar int64 variable: the step a rollback restored, or -1;
      or a number.
    rewarm_steps: steps over which the rate ramps back up after a rollback
      (0 disables the ramp).
    base_factor: scalar float32 variable multiplying the base (1.0 until a
      callback lowers it), or a number.
  """

  def __init__(self, base, lr_scale, rewarm_start, rewarm_steps: int = 0, base_factor=1.0):
    self.base = base
    self.lr_scale = lr_scale
    self.rewarm_start = rewarm_start
    self.rewarm_steps = rewarm_steps
    self.base_factor = base_factor

  def __call__(self, step):
    lr = self._base(step) * self.base_factor * self.lr_scale
    if self.rewarm_steps > 0:
      since = tf.cast(step, tf.int64) - self.rewarm_start
      ramp = tf.clip_by_value(tf.cast(since + 1, tf.float32) / float(self.rewarm_steps), 0.0, 1.0)
      lr = lr * tf.where(self.rewarm_start >= 0, ramp, 1.0)
    return lr

  def _base(self, step) -> tf.Tensor:
    if callable(self.base):
      return tf.cast(self.base(step), tf.float32)
    return tf.constant(self.base, tf.float32)

  def base_rate(self, step) -> float:
    """The rate before recovery: `base(step) * base_factor`, as a number."""
    return float(self._base(step) * _number(self.base_factor))

  def set_base_rate(self, step, rate: float) -> None:
    """Sets `base_factor` so that `base_rate(step) == rate`. A base of 0 at
    `step` (a warm-up's first step) cannot be scaled: the factor is kept."""
    base = float(self._base(step))
    if base > 0 and isinstance(self.base_factor, tf.Variable):
      self.base_factor.assign(float(rate) / base)

  def get_config(self):
    base = self.base
    if isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
      base = keras.saving.serialize_keras_object(base)
    return {
      "base": base,
      "lr_scale": _number(self.lr_scale),
      "rewarm_start": int(_number(self.rewarm_start)),
      "rewarm_steps": int(self.rewarm_steps),
      "base_factor": _number(self.base_factor),
    }

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    if isinstance(config["base"], dict):
      config["base"] = keras.saving.deserialize_keras_object(config["base"])
    return cls(**config)


def _number(x) -> float:
  """A variable's value, or a number, as a Python float."""
  return float(np.asarray(x.numpy() if isinstance(x, tf.Variable) else x))


class LearningRateFactor(tf.Module):
  """The user's factor on the base learning rate (`ScaledSchedule.base_factor`).

  Checkpointed with the run and never rolled back, like recovery's scale:
  a plateau reduction survives rollbacks and resumes.
  """

  def __init__(self):
    super().__init__(name="lr_factor")
    self.factor = tf.Variable(1.0, dtype=tf.float32, trainable=False, name="factor")


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


@keras.saving.register_keras_serializable(package="safetrain")
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
  base_factor: tf.Variable | float = 1.0,
) -> None:
  """Makes the optimizer's learning rate a `ScaledSchedule` recovery can lower.

  Args:
    optimizer: a built Keras optimizer; its schedule (or constant rate) is
      kept as the base.
    default_schedule: builds the base from config.optimizer instead, for the
      optimizer safetrain built itself (its rate is a plain number), or None.
    lr_scale, rewarm_start, rewarm_steps, base_factor: see ScaledSchedule.
  """
  base = compat.learning_rate_schedule(optimizer)  # a schedule or a variable
  rate_variable = base if isinstance(base, keras.Variable) else None
  if not isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
    base = default_schedule() if default_schedule is not None else float(np.asarray(base))
  compat.set_learning_rate_schedule(
    optimizer, ScaledSchedule(base, lr_scale, rewarm_start, rewarm_steps, base_factor)
  )
  if rate_variable is not None:
    compat.leave_out_of_keras_saves(optimizer, rate_variable)


def from_config(config) -> keras.optimizers.Optimizer:
  """The optimizer `config.optimizer` names (`Trainer.build_optimizer`'s default)."""
  o = config.optimizer
  return build_optimizer(
    name=o.name,
    learning_rate=o.learning_rate,
    beta_1=o.beta_1,
    beta_2=o.beta_2,
    epsilon=o.epsilon,
    momentum=o.momentum,
    nesterov=o.nesterov,
    weight_decay=o.weight_decay,
  )


def wrap_from_config(optimizer, config, recovery, lr_factor, *, own: bool) -> None:
  """`wrap_learning_rate` as the run's config asks.

  Args:
    optimizer: the trainer's optimizer.
    config: the run's config (optimizer.schedule and its settings,
      train.steps, recovery.rewarm_steps).
    recovery: recovery's state (its `lr_scale` and `rewarm_start`).
    lr_factor: the run's LearningRateFactor.
    own: whether safetrain built the optimizer from config (the default
      `build_optimizer`): then `optimizer.schedule` makes the base.
  """
  o = config.optimizer
  wrap_learning_rate(
    optimizer,
    default_schedule=(
      lambda: build_schedule(
        name=o.schedule,
        learning_rate=o.learning_rate,
        total_steps=config.train.steps,
        warmup_steps=o.warmup_steps,
        end_lr_factor=o.end_lr_factor,
      )
    )
    if own
    else None,
    lr_scale=recovery.lr_scale,
    rewarm_start=recovery.rewarm_start,
    rewarm_steps=config.recovery.rewarm_steps,
    base_factor=lr_factor.factor,
  )
