"""The input guard of evaluation: non-finite rows of the eval set, handled
by the same `guard.bad_inputs` policy as training's.

Training's guard (docs/guard.md) lives in the compiled step; evaluation has
no step to skip and no update to protect, so this is its smaller form: per
batch, the rows whose floating-point features are all finite (and, with the
default compute_loss and a sparse categorical loss, whose class label is in
[0, num_classes)) are kept (`drop_rows`), or the whole batch is left out when any row is bad
(`skip_batch`); either way the rows left out are counted, and the result
says how many (`dropped_rows`). Under `raise` the evaluation fails with a
BadInputError naming the count.
"""

from __future__ import annotations

import tensorflow as tf

# The eval result's key for the rows left out (only present when some were).
DROPPED = "dropped_rows"


def _floating(batch) -> list[tf.Tensor]:
  return [t for t in tf.nest.flatten(batch) if t.dtype.is_floating]


def finite_rows(batch) -> tf.Tensor:
  """bool[rows]: True where every floating-point value of the row is finite."""
  rows = tf.shape(tf.nest.flatten(batch)[0])[0]
  ok = tf.ones([rows], tf.bool)
  for t in _floating(batch):
    finite = tf.math.is_finite(t)
    if t.shape.rank is not None and t.shape.rank > 1:
      finite = tf.reduce_all(tf.reshape(finite, [rows, -1]), axis=1)
    elif t.shape.rank == 0:
      continue
    ok = tf.logical_and(ok, finite)
  return ok


def guard_rows(batch, *, policy: str, labels=None):
  """(the batch with the bad rows left out, how many were) under `policy`
  (`guard.bad_inputs`: drop_rows, or skip_batch and raise, which leave the
  whole batch out; raise fails on the host). A row is bad when a float is
  not finite, or its label is out of range (`labels`, a
  `step.batch_checks.Labels`, or None)."""
  ok = finite_rows(batch)
  if labels is not None:
    ok = tf.logical_and(ok, labels.rows(batch)[0])
  bad = tf.reduce_sum(tf.cast(~ok, tf.int32))
  if policy != "drop_rows":
    keep_all = tf.equal(bad, 0)
    ok = tf.fill(tf.shape(ok), keep_all)
    if policy == "skip_batch":  # under raise the bad rows are counted, for the message
      bad = tf.where(keep_all, 0, tf.size(ok))
  kept = tf.nest.map_structure(lambda t: tf.boolean_mask(t, ok) if t.shape.rank else t, batch)
  return kept, bad
