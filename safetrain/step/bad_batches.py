"""The in-graph buffer of one loop's bad batches and dropped examples.

The compiled loop keeps the last `SLOTS` such attempts of a loop in a small
buffer (vector ops only); the host reads it back as `Entry`s, which
`records.quarantine` writes to WORKDIR/quarantine.jsonl and `records.incidents`
counts.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from safetrain.core import kinds
from safetrain.step import per_example as examples
from safetrain.step import piece

SLOTS = 32
# info columns: kind, skipped (1) or dropped examples (0), bad examples (-1:
# unknown), then the rows.
_INFO = 3 + examples.MAX_ROWS


class Buffer(NamedTuple):
  """The in-graph buffer (loop-carried tensors)."""

  attempt: tf.Tensor  # int64[SLOTS, 2]: the run's attempt and step, -1 when empty
  info: tf.Tensor  # int32[SLOTS, _INFO]
  n: tf.Tensor  # int64: entries written this loop (may exceed SLOTS)


def empty() -> Buffer:
  return Buffer(
    attempt=tf.fill([SLOTS, 2], tf.constant(-1, tf.int64)),
    info=tf.fill([SLOTS, _INFO], -1),
    n=tf.constant(0, tf.int64),
  )


def record(
  buf: Buffer, hit: tf.Tensor, attempt: tf.Tensor, step: tf.Tensor, info: tf.Tensor
) -> Buffer:
  """Writes `info` for `attempt` (at `step`) when `hit`, into a ring of SLOTS."""
  slot = tf.one_hot(buf.n % SLOTS, SLOTS, on_value=True, off_value=False) & hit
  return Buffer(
    attempt=tf.where(slot[:, None], tf.stack([attempt, step])[None, :], buf.attempt),
    info=tf.where(slot[:, None], info[None, :], buf.info),
    n=buf.n + tf.cast(hit, tf.int64),
  )


def entry(kind: tf.Tensor, skipped: tf.Tensor, bad: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
  """One info row."""
  head = tf.stack([kind, tf.cast(skipped, tf.int32), bad])
  return tf.concat([head, rows], 0)


class Entry(NamedTuple):
  """One buffer entry, on the host."""

  attempt: int
  step: int
  kind: str
  skipped: bool
  bad_examples: int | None
  rows: list[int] | None


def entries(buf) -> list[Entry]:
  """The entries of a buffer (as numpy), in attempt order."""
  from safetrain.step import registry  # noqa: PLC0415 (the registry imports this module)

  out = []
  for (a, step), row in zip(buf.attempt, buf.info):
    if a < 0:
      continue
    bad = int(row[2])
    rows = [int(r) for r in row[3:] if r >= 0]
    out.append(
      Entry(
        attempt=int(a),
        step=int(step),
        kind=registry.KINDS[int(row[0])],
        skipped=bool(row[1]),
        bad_examples=None if bad < 0 else bad,
        rows=rows if bad >= 0 and rows else None,
      )
    )
  return sorted(out)


class BadBatchesPiece(piece.Piece):
  """The loop's buffer of bad batches (a divergence of a batch-bound kind)
  and of steps that dropped examples, for quarantine.jsonl."""

  name = "bad_batches"
  order = 70

  @classmethod
  def build(cls, config, ctx):
    return cls()

  def outcome(self, step):
    from safetrain.step import registry  # noqa: PLC0415 (the registry imports this module)

    bound = [registry.code(k) for k in registry.BATCH_BOUND]
    bad_batch = (step.step_class == kinds.DIVERGENCE) & tf.reduce_any(
      tf.equal(step.kind, tf.constant(bound, tf.int32))
    )
    masked = step.findings.get("per_example")
    if masked is not None:
      dropped = tf.where(step.step_class == kinds.GOOD, masked.dropped, 0.0) > 0
      rows, n = masked.rows, tf.size(masked.ok) - tf.reduce_sum(tf.cast(masked.ok, tf.int32))
    else:
      dropped, rows, n = tf.constant(False), tf.fill([examples.MAX_ROWS], -1), tf.constant(-1)
    fallback = registry.code("nonfinite_loss")
    info = entry(tf.where(bad_batch, step.kind, fallback), bad_batch, n, rows)
    return bad_batch | dropped, info

  def carry(self):
    return empty()

  def fold(self, carried, outcome, core):
    hit, info = outcome
    return record(carried, hit, core.attempt, core.step, info)

  def report(self, carried):
    return carried
