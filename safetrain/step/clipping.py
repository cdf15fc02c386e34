"""Gradient clipping thresholds: fixed, or adaptive (ZClip).

`clip.mode=fixed` clips every good step's global norm to `clip.global_norm`.
`clip.mode=adaptive` is ZClip (Kumar et al. 2025, arXiv 2504.02507): the mean
and variance of the pre-clip global norm are tracked as exponential moving
averages (factor `clip.ema`), and only a norm whose z-score exceeds
`clip.z_threshold` is clipped, to `mean + z_thr**2 * std / z` (ZClip's
"adaptive scaling": the larger the outlier, the harder it is cut). The
statistics start as the plain mean and variance of the first
`clip.warmup_steps` good norms, during which `clip.global_norm` (0: no cap)
applies. They are fed the norm after clipping, so a spike cannot inflate them.

Everything runs inside the compiled loop, on the norm the guard already
computed; the state is carried through the loop as tensors and written to
variables once per loop, like the spike detector's. It is checkpointed with
the run and carried across rollbacks (it describes the gradient scale, which
a rollback does not change).
"""

from __future__ import annotations

import tensorflow as tf

from safetrain.step import piece

_EPS = 1e-6


class GradientClip(tf.Module):
  """The clipping threshold of each step.

  Args:
    mode: "fixed" or "adaptive".
    global_norm: fixed: the threshold (0: no clipping); adaptive: the cap of
      the warm-up steps (0: none).
    ema: adaptive: the EMA factor of the norm's mean and variance.
    z_threshold: adaptive: the z-score above which a norm is clipped.
    warmup_steps: adaptive: good steps whose plain statistics start the EMAs.
  """

  def __init__(
    self,
    *,
    mode: str = "fixed",
    global_norm: float = 1.0,
    ema: float = 0.97,
    z_threshold: float = 2.5,
    warmup_steps: int = 25,
  ):
    super().__init__(name="gradient_clip")
    self.adaptive = mode == "adaptive"
    self.global_norm = float(global_norm)
    self.ema = float(ema)
    self.z_threshold = float(z_threshold)
    self.warmup_steps = int(warmup_steps)
    # mean, variance, good steps seen, and the warm-up's sum and sum of squares.
    self.mean = tf.Variable(0.0, trainable=False, name="mean")
    self.var = tf.Variable(0.0, trainable=False, name="var")
    self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="count")
    self.warm_sum = tf.Variable(0.0, trainable=False, name="warm_sum")
    self.warm_sq = tf.Variable(0.0, trainable=False, name="warm_sq")

  @classmethod
  def from_config(cls, config) -> GradientClip:
    """The clipping `config.clip` asks for (its keys are the arguments)."""
    return cls(**config.clip)

  @property
  def active(self) -> bool:
    """Whether any step can be clipped."""
    return self.adaptive or self.global_norm > 0

  def _vars(self) -> tuple:
    return (self.mean, self.var, self.count, self.warm_sum, self.warm_sq)

  def read(self) -> tuple:
    """The state as tensors, to carry through the compiled loop (() if fixed)."""
    return tuple(v.read_value() for v in self._vars()) if self.adaptive else ()

  def write(self, state) -> None:
    """Stores the state carried through the loop."""
    if self.adaptive:
      for var, value in zip(self._vars(), state):
        var.assign(value)

  def threshold(self, state, norm: tf.Tensor) -> tf.Tensor:
    """The norm this step's gradients are clipped to (>= norm: no clipping).

    Only meaningful for a finite `norm`; a non-finite one is never applied.
    """
    if not self.adaptive:
      return tf.constant(self.global_norm if self.global_norm > 0 else float("inf"))
    mean, var, count, _, _ = state
    std = tf.sqrt(tf.maximum(var, 0.0))
    z = (norm - mean) / (std + _EPS)
    adaptive = tf.where(z > self.z_threshold, mean + self.z_threshold**2 * std / z, norm)
    cap = self.global_norm if self.global_norm > 0 else float("inf")
    return tf.where(count < self.warmup_steps, tf.constant(cap), adaptive)

  def observe(self, state, norm: tf.Tensor, limit: tf.Tensor, good: tf.Tensor):
    """The state after a step: fed by the clipped norm if the step was good."""
    if not self.adaptive:
      return ()
    mean, var, count, warm_sum, warm_sq = state
    warming = count < self.warmup_steps
    # Warm-up: the plain norms, summed; at its end they start the EMAs.
    n = tf.cast(count + 1, tf.float32)
    w_sum = warm_sum + norm
    w_sq = warm_sq + norm * norm
    w_mean = w_sum / n
    w_var = tf.maximum(w_sq / n - w_mean * w_mean, 0.0)
    # After it: ZClip's EMA update with the norm after clipping.
    g = tf.minimum(norm, limit)
    a = self.ema
    e_mean = a * mean + (1 - a) * g
    e_var = a * var + (1 - a) * tf.square(g - e_mean)
    new = (
      tf.where(warming, w_mean, e_mean),
      tf.where(warming, w_var, e_var),
      count + 1,
      tf.where(warming, w_sum, warm_sum),
      tf.where(warming, w_sq, warm_sq),
    )
    return tuple(tf.where(good, b, a_) for b, a_ in zip(new, state))


def clip(grads: list, norm: tf.Tensor, max_norm: tf.Tensor) -> list:
  """Scales gradients whose global `norm` (finite) exceeds `max_norm` > 0.

  Unlike `tf.clip_by_global_norm`, it is only called with a finite norm, so
  it never turns finite gradients into NaN.
  """
  factor = tf.minimum(1.0, max_norm / tf.maximum(norm, 1e-30))
  return [g * factor for g in grads]


class ClipPiece(piece.Piece):
  """Clipping in the step: the threshold of each good step (fixed, or from
  the adaptive statistics carried through the loop), applied to the
  gradients in the update with the NaN-safe `clip`."""

  name = "clip"
  order = 60
  config_keys = ("clip",)

  def __init__(self, clip: GradientClip):
    self.gradient_clip = clip

  @classmethod
  def build(cls, config, ctx):
    return cls(ctx.clip) if ctx.clip.active else None

  def apply_args(self, step):
    limit = self.gradient_clip.threshold(step.carried[self.name], step.norm)
    step.findings["clip_limit"] = limit
    return limit

  def outcome(self, step):
    return step.findings["clip_limit"]

  def clip(self, grads, norm, limit):
    return clip(grads, norm, limit)

  def carry(self):
    return self.gradient_clip.read()

  def fold(self, carried, outcome, core):
    return self.gradient_clip.observe(carried, core.norm_good, outcome, core.good)

  def write(self, carried):
    self.gradient_clip.write(carried)
