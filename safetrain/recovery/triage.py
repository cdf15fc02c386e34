"""Bad batch or diverging state: which one made the guard stop the loop.

When `guard.rollback_after` attempts in a row diverge, the state they all
started from is the same (a skipped step changes nothing). Two causes fit:

- a *bad batch*: the state is healthy and the non-finite value is bound to the
  data of the batches (a loss taking log(0) on some rows, a saturated sigmoid
  on outlier rows). Lowering the learning rate cannot fix it; skipping the
  batches can.
- a *diverging state*: the weights have grown, or failures come whatever the
  batch. Rollback and backoff are the cure.

The verdict comes from the evidence at hand: the kind of failure (only a
non-finite loss can be bound to a batch; growth, spikes, gradients, dead units
are the state's), whether the replay of the offending batch from the current
state reproduces it, whether any activation is out of range, and a row probe:
the loss of each row of the batch alone (for a non-finite gradient with a
finite loss, the gradient of each row's loss: the gradient of sqrt at 0 when
an anchor equals its positive is a NaN that only some rows have). Rows with a
finite value beside rows with a non-finite one prove the failure is bound to
those rows, not to the state. Anything less is a diverging state: the safe
answer.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import tensorflow as tf
from absl import logging

from safetrain.core import kinds
from safetrain.diagnosis import forensics
from safetrain.diagnosis.replay import fmt, replay

# Rows probed one by one (eagerly): enough to tell rows apart, bounded in time.
PROBE_ROWS = 64
# Activations above this mean the weights have grown out of range (their
# squares overflow float32): a diverging state, whatever the rows say.
_HUGE = 1e15


@dataclasses.dataclass
class Verdict:
  """Why the loop stopped, as recovery acts on it."""

  cause: str  # kinds.BAD_BATCH or kinds.DIVERGING_STATE
  why: str  # one sentence: the evidence
  diagnosis: str  # the forensics diagnosis of the offending batch ("" if none ran)
  rows: list[int] | None = None  # the non-finite rows found by the probe

  @property
  def bad_batch(self) -> bool:
    return self.cause == kinds.BAD_BATCH


def diverging(why: str, diagnosis: str = "") -> Verdict:
  return Verdict(kinds.DIVERGING_STATE, why, diagnosis)


def open_run(ctx, *, kind: str, batch, step: int, count: int) -> Verdict:
  """The verdict on `count` divergent attempts in a row ending at `step`.

  Args:
    ctx: the forensics context (model, optimizer, compute_loss).
    kind: the kind of the last divergent attempt.
    batch: the offending batch as stashed, or None (several replicas).
    step: the step being attempted.
    count: how many attempts in a row diverged.
  """
  gradients = kind == "nonfinite_grads" and not ctx.fp16  # under float16: the loss scale's
  if kind != "nonfinite_loss" and not gradients:
    return diverging(f"{count} attempts in a row from the same state diverged ({kind})")
  if batch is None:
    return diverging(
      f"{count} batches in a row had a non-finite loss, and the offending batch was not kept "
      "(several replicas) to tell a bad batch from a diverging state"
    )
  try:
    return _probe_grads(ctx, batch, step, count) if gradients else _probe(ctx, batch, step, count)
  except Exception as e:  # noqa: BLE001 - triage must not hide the incident
    logging.warning("triage failed: %s", e)
    return diverging(f"{count} batches in a row had a non-finite loss")


def _probe(ctx, batch, step: int, count: int) -> Verdict:
  diagnosis = forensics.diagnose(ctx, kind="nonfinite_loss", batch=batch, step=step)
  rep = replay(ctx, batch, gradients=False)
  if rep.error is not None or rep.loss is None or np.isfinite(rep.loss):
    return diverging(
      f"{count} batches in a row had a non-finite loss, but the last one replayed from the "
      "same state has a finite loss: the failure is not bound to the batch's data",
      diagnosis,
    )
  top = max((r.outputs.max_abs for r in rep.layers if r.outputs.finite), default=0.0)
  if top > _HUGE:
    return diverging(
      f"activations reach {fmt(top)}: the weights have grown out of range", diagnosis
    )
  bad, probed = bad_rows(ctx, batch)
  return _rows_verdict(
    bad,
    probed,
    diagnosis,
    bound="the loss is non-finite on rows {shown} of the batch",
    cause="",
    failed=f"{count} batches in a row had a non-finite loss",
    every="the loss is non-finite",
    none="no single row has a non-finite loss",
  )


def _probe_grads(ctx, batch, step: int, count: int) -> Verdict:
  diagnosis = forensics.diagnose(ctx, kind="nonfinite_grads", batch=batch, step=step)
  rep = replay(ctx, batch)
  if rep.error is not None or rep.grads_finite:
    return diverging(
      f"{count} batches in a row had non-finite gradients, but the last one replayed from the "
      "same state has finite ones: the failure is not bound to the batch's data",
      diagnosis,
    )
  bad, probed = bad_rows(ctx, batch, gradients=True)
  return _rows_verdict(
    bad,
    probed,
    diagnosis,
    bound="the loss is finite but its gradient is not on rows {shown} of the batch",
    cause=" (a sqrt or norm at 0, a division by a zero distance)",
    failed=f"{count} batches in a row had non-finite gradients",
    every="the gradient is non-finite",
    none="no single row has a non-finite gradient",
  )


def _rows_verdict(
  bad: list[int],
  probed: int,
  diagnosis: str,
  *,
  bound: str,
  cause: str,
  failed: str,
  every: str,
  none: str,
) -> Verdict:
  """The row probe's verdict: some rows bad and the others fine is a bad
  batch (`bound`, with {shown} the rows, and the likely `cause`); every row
  or none is a diverging state (`failed`, then `every` or `none`)."""
  if bad and len(bad) < probed:
    shown = ", ".join(str(r) for r in bad[:8]) + (", ..." if len(bad) > 8 else "")
    return Verdict(
      kinds.BAD_BATCH,
      f"from a healthy state, {bound.format(shown=shown)} ({len(bad)} of {probed} rows probed "
      f"one by one) and finite on the others: the failure is bound to those rows' "
      f"data{cause}, not to the state",
      diagnosis,
      rows=bad,
    )
  why = (
    f"{every} on every one of {probed} rows probed one by one"
    if bad
    else f"{none}: it needs the batch as a whole"
  )
  return diverging(f"{failed}, and {why}", diagnosis)


def bad_rows(ctx, batch, *, gradients: bool = False) -> tuple[list[int], int]:
  """(rows of `batch` whose loss alone is non-finite, rows probed).

  Each of the first PROBE_ROWS rows is run through compute_loss alone, in
  inference mode (a batch of one has no BatchNorm statistics), eagerly; with
  `gradients`, a row is bad when its loss or the gradient of its loss with
  respect to the trainable variables is not finite.
  """
  flat = tf.nest.flatten(batch)
  n = min(int(tf.shape(flat[0])[0]), PROBE_ROWS)
  variables = ctx.model.trainable_variables
  bad = []
  for i in range(n):
    row = tf.nest.map_structure(lambda t, i=i: t[i : i + 1], batch)
    # Only the gradient probe records the forward pass for a backward one.
    with tf.GradientTape() if gradients else contextlib.nullcontext() as tape:
      loss, _ = ctx.compute_loss(ctx.model, row, False)
    ok = np.isfinite(float(loss.numpy()))
    if ok and gradients:
      grads = tape.gradient(loss, variables)
      values = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads if g is not None]
      ok = all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in values)
    if not ok:
      bad.append(i)
  return bad, n
