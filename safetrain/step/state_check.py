"""`guard.check_state`: state a batch's forward pass poisons.

A variable the optimizer does not update (BatchNorm's moving mean and
variance, any float non-trainable variable the forward pass writes) can go
non-finite, or absurdly large, in the forward pass of one batch whose inputs
are finite but huge (1e20..1e30): the loss and gradients may still be finite,
and the next step would train on the poisoned statistics. This piece checks
those variables after the forward pass (on several replicas, the mean the
step would assign) and makes such a step a bad batch, `nonfinite_state`: it
is skipped, which puts the forward pass's changes back, and quarantined like
any batch-bound failure, with no learning-rate cut. The check is one
reduction per such variable and a compare per step; the first offending
variable is carried through the loop to name it.
"""

from __future__ import annotations

import tensorflow as tf

from safetrain.core import kinds as kinds_lib
from safetrain.step import piece


class StatePiece(piece.Piece):
  """Args:
  variables: the float non-trainable variables to watch.
  max_abs: `guard.state_max_abs`.
  """

  name = "state"
  order = 24
  kinds = kinds_lib.declare(
    kinds_lib.Kind(
      "nonfinite_state",
      "a variable the optimizer does not update (BatchNorm statistics) went non-finite or "
      "beyond guard.state_max_abs in a batch's forward pass.",
      "#6a3d9a",
      batch_bound=True,
      before_update=True,
    )
  )
  config_keys = ("guard.check_state", "guard.state_max_abs")

  def __init__(self, variables: list, *, max_abs: float):
    self.variables = list(variables)
    self.max_abs = float(max_abs)
    self.names = [v.path if hasattr(v, "path") else v.name for v in self.variables]

  @classmethod
  def build(cls, config, ctx):
    if not config.guard.check_state or ctx.model is None:
      return None
    if ctx.num_replicas > 1:
      variables = list(ctx.replica_state)
    else:
      variables = [v for v in ctx.model.non_trainable_variables if tf.as_dtype(v.dtype).is_floating]
    return cls(variables, max_abs=config.guard.state_max_abs) if variables else None

  def conditions(self, step):
    values = (
      step.replica_mean if step.replicas > 1 else [tf.convert_to_tensor(v) for v in self.variables]
    )
    # NaN-safe: a NaN maximum fails `<=`.
    ok = tf.stack([tf.reduce_max(tf.abs(tf.cast(v, tf.float32))) <= self.max_abs for v in values])
    # On several replicas the mean is over the replicas with rows (the same
    # on each), so every replica decides alike.
    bad = ~ok
    step.findings[self.name] = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32)
    return [
      piece.Condition(self.order, kinds_lib.DIVERGENCE, "nonfinite_state", tf.reduce_any(bad))
    ]

  def outcome(self, step):
    return tf.where(step.kind == self._code(), step.findings[self.name], tf.constant(-1, tf.int32))

  def carry(self):
    return tf.constant(-1, tf.int32)

  def fold(self, carried, outcome, core):
    return tf.where(carried < 0, outcome, carried)

  def report(self, carried):
    return carried

  def explain(self, kind, out) -> str:
    first = int(out.pieces[self.name])
    which = self.names[first] if 0 <= first < len(self.names) else "a non-trainable variable"
    return (
      f"{which} went non-finite or beyond guard.state_max_abs={self.max_abs:g} in a batch's "
      "forward pass (the optimizer does not update it, so a lower learning rate would not "
      "help): the batch was skipped and the variable put back. Look for rows with huge "
      "features, or normalise the inputs."
    )

  @staticmethod
  def _code() -> int:
    from safetrain.step import registry  # noqa: PLC0415 (the registry imports this module)

    return registry.code("nonfinite_state")
