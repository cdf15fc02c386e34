"""Deterministic fault injection for tests and fire drills (`config.drill`).

Steps are attempt numbers: the 1-based count of steps the run has attempted,
skipped ones included. The count is never rolled back, so an injected fault
fires once even when recovery rewinds the model past it.
"""

from __future__ import annotations

import tensorflow as tf

from safetrain.core import config as config_lib


class Drill:
  """In-graph fault injector built from `config.drill`.

  Args:
    loss_steps, grad_steps, input_steps: step specs like "5" or "3,7-9".
    value: "nan" or "inf", the value injected.
    input_feature: the column (last axis) of the first floating input leaf
      that is corrupted.
    input_rows: how many leading rows of the batch (of each chosen replica's
      shard) are corrupted.
    replica: -1 for every replica, or the replica id whose shard is hit.
    loss_rows: with per-example losses, `loss_steps` corrupts only the first
      loss_rows examples' losses (0: every example, like a mean's).
  """

  def __init__(
    self,
    *,
    loss_steps: str = "",
    grad_steps: str = "",
    input_steps: str = "",
    value: str = "nan",
    input_feature: int = 0,
    input_rows: int = 1,
    replica: int = -1,
    loss_rows: int = 0,
  ):
    self.loss = config_lib.parse_steps(loss_steps, "drill.loss_steps")
    self.grad = config_lib.parse_steps(grad_steps, "drill.grad_steps")
    self.input = config_lib.parse_steps(input_steps, "drill.input_steps")
    self._specs = {"loss_steps": loss_steps, "grad_steps": grad_steps, "input_steps": input_steps}
    self.value = float("nan") if value == "nan" else float("inf")
    self.input_feature = input_feature
    self.input_rows = input_rows
    self.replica = replica
    self.loss_rows = loss_rows

  @property
  def poisons_rows(self) -> bool:
    """Whether the drill will make rows bad (inputs, or some examples'
    losses): a rare path of the guard is then certain, and built at once."""
    return bool(self.input or self.loss and self.loss_rows > 0)

  @property
  def active(self) -> bool:
    return bool(self.loss or self.grad or self.input)

  def check(self, element_spec, num_replicas: int = 1) -> None:
    """Raises ConfigError for a drill that could never fire on this data.

    Called once when the trainer is built. An input drill needs a
    floating-point input with the column `input_feature`; a drill aimed at
    `replica` needs that replica to exist.

    Args:
      element_spec: the training dataset's element spec (one batch).
      num_replicas: replicas in sync.
    """
    if self.input:
      floats = [s for s in tf.nest.flatten(element_spec) if s.dtype.is_floating]
      if not floats:
        yields = tf.nest.map_structure(lambda s: f"{s.dtype.name}{list(s.shape)}", element_spec)
        raise config_lib.ConfigError(
          "drill.input_steps",
          self._specs["input_steps"],
          f"an input drill needs a floating-point input; the dataset yields {yields}",
        )
      first = floats[0]
      columns = first.shape[-1] if first.shape.rank and first.shape.rank > 1 else None
      if first.shape.rank is not None and first.shape.rank <= 1 and self.input_feature != 0:
        raise config_lib.ConfigError(
          "drill.input_feature",
          self.input_feature,
          f"0: the first floating-point input ({first.dtype.name}{list(first.shape)}) "
          "has no feature axis",
        )
      if columns is not None and self.input_feature >= columns:
        raise config_lib.ConfigError(
          "drill.input_feature",
          self.input_feature,
          f"a column of the first floating-point input ({first.dtype.name}"
          f"{list(first.shape)}: 0..{columns - 1}), or the drill never fires",
        )
    if self.active and self.replica >= num_replicas:
      raise config_lib.ConfigError(
        "drill.replica",
        self.replica,
        f"-1 (every replica) or a replica id below {num_replicas} (replicas in sync), "
        "or the drill never fires",
      )

  def _hit(self, ranges, attempt: tf.Tensor) -> tf.Tensor:
    if not ranges:
      return tf.constant(False)
    hit = tf.constant(False)
    for lo, hi in ranges:
      hit = tf.logical_or(hit, tf.logical_and(attempt >= lo, attempt <= hi))
    if self.replica >= 0:
      ctx = tf.distribute.get_replica_context()
      rid = ctx.replica_id_in_sync_group if ctx is not None else 0
      hit = tf.logical_and(hit, tf.equal(rid, self.replica))
    return hit

  def corrupt_inputs(self, batch, attempt: tf.Tensor):
    if not self.input:
      return batch
    hit = self._hit(self.input, attempt)
    flat = tf.nest.flatten(batch)
    for i, t in enumerate(flat):
      if not t.dtype.is_floating:
        continue
      n = tf.shape(t)[0]
      rows = tf.range(n) < self.input_rows
      if t.shape.rank and t.shape.rank > 1:
        col = tf.range(tf.shape(t)[-1]) == self.input_feature
        ones = [1] * (t.shape.rank - 1)
        where = tf.logical_and(tf.reshape(rows, [-1] + ones), tf.reshape(col, ones + [-1]))
      else:
        where = rows
      bad = tf.fill(tf.shape(t), tf.cast(self.value, t.dtype))
      flat[i] = tf.where(tf.logical_and(hit, where), bad, t)
      break
    return tf.nest.pack_sequence_as(batch, flat)

  def corrupt_loss(self, loss: tf.Tensor, attempt: tf.Tensor) -> tf.Tensor:
    if not self.loss:
      return loss
    hit = self._hit(self.loss, attempt)
    # A multiplier, not tf.where(hit, loss * value, loss): the gradient of the
    # untaken branch would be 0 * NaN = NaN on every step.
    return loss * tf.where(hit, tf.constant(self.value, loss.dtype), tf.ones([], loss.dtype))

  def corrupt_examples(self, losses: tf.Tensor, attempt: tf.Tensor) -> tf.Tensor:
    """Per-example losses [b]: the first `loss_rows` (0: all) made non-finite
    on `loss_steps` attempts."""
    if not self.loss:
      return losses
    hit = self._hit(self.loss, attempt)
    rows = tf.range(tf.shape(losses)[0])
    chosen = rows < self.loss_rows if self.loss_rows > 0 else tf.ones_like(rows, tf.bool)
    bad = tf.logical_and(hit, chosen)
    # A multiplier, as in corrupt_loss, so the untaken side adds no NaN.
    return losses * tf.where(bad, tf.constant(self.value, losses.dtype), tf.ones([], losses.dtype))

  def corrupt_grads(self, grads: list, attempt: tf.Tensor) -> list:
    if not self.grad:
      return grads
    hit = self._hit(self.grad, attempt)
    g0 = grads[0]
    grads = list(grads)
    grads[0] = tf.where(hit, g0 + tf.cast(self.value, g0.dtype), g0)
    return grads
