"""Per-example losses: the non-finite examples are dropped from the mean.

When `compute_loss` returns per-example losses (a tensor of shape [batch], or
[batch, ...], averaged over the other axes), as the default one does, the
compiled step takes the mean over the examples whose loss is finite, so one
saturated example does not cost the whole batch. The dropped examples are
counted and reported like dropped input rows. More than
`guard.max_dropped_examples` of a batch dropped (or all of it) is not a few bad
examples: the step's loss is then NaN, a `nonfinite_loss` like any other.

Masking the loss is not enough for the gradient: backpropagation still goes
through the op that produced the NaN (0 * inf = NaN). So a step that dropped
examples runs forward and backward again on the finite rows only; the common
step, with every example finite, pays one finiteness check.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from safetrain.core import kinds as kinds_lib
from safetrain.step import piece

# How many dropped rows a step names (for quarantine.jsonl).
MAX_ROWS = 16


def is_per_example(loss: tf.Tensor) -> bool:
  """Whether compute_loss returned per-example losses (statically known)."""
  return loss.shape.rank is not None and loss.shape.rank >= 1


def per_example(loss: tf.Tensor) -> tf.Tensor:
  """[batch, ...] losses as [batch]: the mean over the other axes."""
  if loss.shape.rank > 1:
    loss = tf.reduce_mean(loss, axis=list(range(1, loss.shape.rank)))
  return loss


def plain_mean(loss: tf.Tensor) -> tf.Tensor:
  """A loss or per-example losses as the plain mean (NaN stays NaN), for
  evaluation, forensics and preflight."""
  return tf.reduce_mean(per_example(loss)) if is_per_example(loss) else loss


class Masked(NamedTuple):
  """The masked mean of one replica's per-example losses."""

  loss: tf.Tensor  # this replica's share of the global mean (NaN: too many dropped)
  ok: tf.Tensor  # bool[b]: the local examples kept
  total_ok: tf.Tensor  # float32: examples kept over all replicas
  dropped: tf.Tensor  # float32: examples dropped over all replicas (0 if the step is lost)
  rerun: tf.Tensor  # bool: this replica dropped examples: its gradients are redone
  any_ok: tf.Tensor  # bool: this replica kept some (else it contributes zeros)
  rows: tf.Tensor  # int32[MAX_ROWS]: the first dropped local rows, -1 padded


def masked_mean(
  losses: tf.Tensor,
  *,
  valid: tf.Tensor | None,
  ctx,
  max_fraction: float,
  name_rows: bool,
  branchless: bool = False,
) -> Masked:
  """The mean over the finite examples, over all replicas.

  Args:
    losses: float32[b], this replica's per-example losses.
    valid: scalar bool, False for a replica left without rows (its one
      sanitised row counts for nothing), or None on one replica.
    ctx: the replica context.
    max_fraction: `guard.max_dropped_examples`.
    name_rows: whether the dropped rows are worth naming (one replica only:
      with several, row numbers are shard-local).
    branchless: name them without a branch (`train.skip_update=select`):
      the same rows, by a top-k over the batch on every step.
  """
  finite = tf.math.is_finite(losses)
  ok = finite if valid is None else tf.logical_and(finite, valid)
  n = tf.cast(tf.size(losses), tf.float32)
  n_valid = n if valid is None else tf.where(valid, n, 0.0)
  counts = tf.stack([tf.reduce_sum(tf.cast(ok, tf.float32)), n_valid])
  if ctx.num_replicas_in_sync > 1:
    counts = ctx.all_reduce("sum", counts)
  total_ok, total = counts[0], counts[1]
  bad = total - total_ok
  lost = (total_ok <= 0) | (bad > max_fraction * total)
  mean = tf.reduce_sum(tf.where(ok, losses, 0.0)) / tf.maximum(total_ok, 1.0)
  any_bad = tf.logical_not(tf.reduce_all(finite))
  if name_rows and branchless:
    rows = _first_rows_static(tf.logical_not(finite))
  elif name_rows:
    rows = tf.cond(
      any_bad,
      lambda: _first_rows(tf.logical_not(finite)),
      lambda: tf.fill([MAX_ROWS], -1),
    )
  else:
    rows = tf.fill([MAX_ROWS], -1)
  return Masked(
    loss=tf.where(lost, float("nan"), mean),
    ok=ok,
    total_ok=total_ok,
    dropped=tf.where(lost, 0.0, bad),
    rerun=any_bad & tf.logical_not(lost),
    any_ok=tf.reduce_any(ok),
    rows=rows,
  )


def _first_rows(bad: tf.Tensor) -> tf.Tensor:
  idx = tf.cast(tf.where(bad)[:MAX_ROWS, 0], tf.int32)
  return tf.pad(idx, [[0, MAX_ROWS - tf.size(idx)]], constant_values=-1)


def _first_rows_static(bad: tf.Tensor) -> tf.Tensor:
  """`_first_rows` with static shapes (no `tf.where` of a mask, whose size a
  GPU reports to the host): the MAX_ROWS smallest indices of bad rows."""
  n = tf.size(bad)
  key = tf.concat([tf.where(bad, tf.range(n), n), tf.fill([MAX_ROWS], n)], 0)
  first = -tf.math.top_k(-key, k=MAX_ROWS).values
  return tf.where(first < n, first, -1)


def masked_batch(batch, ok: tf.Tensor):
  """The rows of `batch` whose example is kept."""
  return tf.nest.map_structure(lambda t: tf.boolean_mask(t, ok), batch)


class PerExamplePiece(piece.Piece):
  """`guard.drop_examples`: with per-example losses, the non-finite examples
  are left out of the mean and the step's gradients redone on the rest.

  A compute_loss that returns a scalar gives no per-example losses. Once the
  host has seen a batch whose non-finite loss is bound to some of its rows
  (triage's row probe: those rows alone non-finite, the others finite), it
  turns `scalar_rows` on and retraces the loop (`enable_scalar_rows`): from
  then on a non-finite scalar loss is evaluated on each row alone
  (inference mode, inside the step, in the rare branch only) and, when some
  rows are finite and at most `guard.max_dropped_examples` are not, the step
  runs forward and backward again on the finite rows, whose loss it is. One
  replica only (with several, a shard's rows are not the batch's).
  """

  name = "per_example"
  order = 30
  config_keys = ("guard.drop_examples", "guard.max_dropped_examples")
  sums = ("dropped_examples", "dropped_example_steps")

  def __init__(self, *, max_fraction: float):
    self.max_fraction = float(max_fraction)
    self.scalar_rows = False  # turned on by the host (see the class docstring)

  def enable_scalar_rows(self) -> bool:
    """Turns the per-row evaluation of a non-finite scalar loss on; True if
    it was off (the caller retraces the loop)."""
    was, self.scalar_rows = self.scalar_rows, True
    return not was

  @classmethod
  def build(cls, config, ctx):
    g = config.guard
    return cls(max_fraction=g.max_dropped_examples) if g.drop_examples else None

  def reduce_loss(self, step, losses):
    masked = masked_mean(
      losses,
      valid=None if step.weight is None else step.weight > 0,
      ctx=step.ctx,
      max_fraction=self.max_fraction,
      name_rows=step.replicas == 1,
      branchless=step.branchless,
    )
    # A batch the input guard skips drops no examples either.
    masked = masked._replace(
      dropped=tf.where(step.skip, 0.0, masked.dropped),
      rerun=masked.rerun & tf.logical_not(step.skip),
    )
    step.findings[self.name] = masked
    return masked.loss

  def gradients(self, step):
    masked = step.findings.get(self.name)
    if masked is None:
      self._scalar_rows(step)
      return
    if not step.grads:
      return
    if step.lean:
      # The rerun is a rare path: the attempt is redone with it built.
      step.pending = step.pending | masked.rerun
      return
    # Dropped examples still poison the gradient through their own ops:
    # recompute it on the rows kept.
    grads = step.grads
    kept = lambda: tf.cond(  # noqa: E731
      masked.any_ok,
      lambda: step.regrad(masked_batch(step.batch, masked.ok), masked.total_ok)[1],
      lambda: [tf.zeros_like(g) for g in grads],
    )
    step.grads = tf.cond(masked.rerun, kept, lambda: grads)

  def _scalar_rows(self, step) -> None:
    """A non-finite scalar loss: the rows alone, and the step again on the
    finite ones (see the class docstring)."""
    if not self.scalar_rows or step.replicas > 1 or not step.grads or step.row_losses is None:
      return
    if step.lean:
      # Each row alone and the step again are a rare path.
      step.pending = step.pending | ~tf.math.is_finite(step.loss) & ~step.skip
      return
    loss, grads, metrics = step.loss, step.grads, step.metrics
    nothing = tf.constant(0.0)
    all_ok = tf.ones([tf.shape(tf.nest.flatten(step.batch)[0])[0]], tf.bool)
    no_rows = tf.fill([MAX_ROWS], -1)

    def by_rows():
      masked = masked_mean(
        step.row_losses(step.batch),
        valid=None,
        ctx=step.ctx,
        max_fraction=self.max_fraction,
        name_rows=True,
      )
      rerun = masked.rerun & tf.logical_not(step.skip)

      def again():
        new_loss, new_grads = step.regrad(masked_batch(step.batch, masked.ok), masked.total_ok)
        return new_loss, new_grads, masked.dropped, masked.ok, masked.rows

      return tf.cond(rerun, again, lambda: (loss, grads, nothing, all_ok, no_rows))

    step.loss, step.grads, dropped, ok, rows = tf.cond(
      tf.math.is_finite(loss), lambda: (loss, grads, nothing, all_ok, no_rows), by_rows
    )
    # compute_loss's metrics were of the whole batch (NaN): not shown.
    step.metrics = {k: tf.where(dropped > 0, 0.0, m) for k, m in metrics.items()}
    step.findings[self.name] = Masked(
      loss=step.loss,
      ok=ok,
      total_ok=nothing,
      dropped=dropped,
      rerun=dropped > 0,
      any_ok=tf.constant(True),
      rows=rows,
    )

  def step_sums(self, step):
    masked = step.findings.get(self.name)
    if masked is None:
      return {}
    # Examples count as dropped when the rest of their batch trained.
    dropped = tf.where(step.step_class == kinds_lib.GOOD, masked.dropped, 0.0)
    return {"dropped_examples": dropped, "dropped_example_steps": tf.cast(dropped > 0, tf.float32)}

  def records(self, out, *, bad_batch_diagnosis):
    count = int(out.sums["dropped_examples"])
    if not count:
      return []
    from safetrain.step import bad_batches  # noqa: PLC0415 (a piece beside this one)

    steps = int(out.sums["dropped_example_steps"])
    where = [e.step for e in bad_batches.entries(out.pieces["bad_batches"]) if not e.skipped]
    return [
      dict(
        step=min(where, default=-1),
        last_step=max(where, default=-1),
        kind="nonfinite_loss",
        action="dropped_examples",
        count=steps,
        examples=count,
        diagnosis=f"{count} examples with a non-finite loss were left out "
        f"of the mean in {steps} steps (per-example loss); the rest of each batch trained."
        + (f" {bad_batch_diagnosis}" if bad_batch_diagnosis else ""),
        cause=kinds_lib.BAD_BATCH,
      )
    ]
