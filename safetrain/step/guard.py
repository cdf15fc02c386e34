"""In-graph guards: the input check and its policy (`InputPiece`), the
finiteness of the loss and gradients (`FinitePiece`), the gradient norm, and
the batch helpers they share with the diagnosis.

Everything here runs inside the compiled inner loop, in replica context
unless said otherwise.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf

from safetrain.core import kinds as kinds_lib
from safetrain.step import piece


def flatten_with_names(structure, prefix: str = "") -> list[tuple[str, object]]:
  """Leaves with readable paths ("x", "[0]", "features/age"), in tf.nest order."""
  if isinstance(structure, dict):
    out = []
    for key in sorted(structure):
      out += flatten_with_names(structure[key], f"{prefix}/{key}" if prefix else str(key))
    return out
  if isinstance(structure, (tuple, list)):
    out = []
    top = not prefix and len(structure) in (2, 3)
    for i, item in enumerate(structure):
      name = ("x", "y", "sample_weight")[i] if top else f"{prefix}[{i}]"
      out += flatten_with_names(item, name)
    return out
  return [(prefix or "batch", structure)]


def float_leaves(batch) -> list[tuple[str, tf.Tensor]]:
  """(name, tensor) for every floating-point leaf of a batch structure."""
  return [(p, t) for p, t in flatten_with_names(batch) if t.dtype.is_floating]


def leaf_names(element_spec) -> list[str]:
  return [p for p, _ in float_leaves(element_spec)]


def finite_rows(batch) -> tuple[tf.Tensor, tf.Tensor]:
  """Returns (row_ok, leaf_bad).

  row_ok: bool[B], True where every floating-point feature of the row is
    finite. leaf_bad: int32[L], the number of bad rows per floating leaf (in
    `float_leaves` order), which names the culprit feature in messages.
  """
  leaves = float_leaves(batch)
  if not leaves:
    n = tf.shape(tf.nest.flatten(batch)[0])[0]
    return tf.ones([n], tf.bool), tf.zeros([0], tf.int32)
  oks = []
  for _, t in leaves:
    ok = tf.math.is_finite(t)
    if t.shape.rank and t.shape.rank > 1:
      ok = tf.reduce_all(tf.reshape(ok, [tf.shape(t)[0], -1]), axis=1)
    elif t.shape.rank == 0:
      ok = tf.reshape(ok, [1])
    oks.append(ok)
  row_ok = oks[0]
  for ok in oks[1:]:
    row_ok = tf.logical_and(row_ok, ok)
  leaf_bad = tf.stack([tf.reduce_sum(tf.cast(~ok, tf.int32)) for ok in oks])
  return row_ok, leaf_bad


def bad_columns(batch) -> tf.Tensor:
  """int32[L]: for each floating leaf, the first feature column (last axis)
  holding a non-finite value, or -1. Used only for error messages."""
  cols = []
  for _, t in float_leaves(batch):
    if t.shape.rank and t.shape.rank > 1:
      bad = tf.reduce_any(~tf.math.is_finite(tf.reshape(t, [-1, tf.shape(t)[-1]])), axis=0)
      col = tf.cond(
        tf.reduce_any(bad),
        lambda bad=bad: tf.cast(tf.argmax(tf.cast(bad, tf.int32)), tf.int32),
        lambda: tf.constant(-1),
      )
    else:
      col = tf.constant(-1)
    cols.append(col)
  return tf.stack(cols) if cols else tf.zeros([0], tf.int32)


def mask_rows(batch, row_ok: tf.Tensor):
  """Keeps the rows where row_ok is True, in every leaf of the batch."""
  return tf.nest.map_structure(lambda t: tf.boolean_mask(t, row_ok), batch)


def finite_rows_only(batch):
  """The batch without rows holding NaN/Inf (as guard.bad_inputs=drop_rows
  would train on), or None when no row is left."""
  if not float_leaves(batch):
    return batch
  row_ok, _ = finite_rows(batch)
  if bool(tf.reduce_all(row_ok)):
    return batch
  if not bool(tf.reduce_any(row_ok)):
    return None
  return mask_rows(batch, row_ok)


def keep_rows(batch, row_ok, any_kept):
  """Drops bad rows; a shard with none left keeps row 0, sanitised, so it can
  still take part in the step's collectives (its loss weight is 0)."""

  def sanitise(t):
    t = t[:1]
    return tf.where(tf.math.is_finite(t), t, tf.zeros_like(t)) if t.dtype.is_floating else t

  return tf.cond(
    any_kept, lambda: mask_rows(batch, row_ok), lambda: tf.nest.map_structure(sanitise, batch)
  )


class InputCheck(NamedTuple):
  """What the input check decided about one replica's batch."""

  batch: Any  # what the model sees: bad rows dropped under drop_rows
  weight: tf.Tensor | None  # this replica's share of the global loss; None on one replica
  skip: tf.Tensor  # bool: the step is skipped (no usable row, or skip_batch/raise)
  dropped: tf.Tensor  # int32: rows dropped over all replicas
  leaf_bad: tf.Tensor  # int32[L]: bad rows per float leaf, for messages
  cols: tf.Tensor  # int32[L]: first bad column per float leaf, or -1


class InputPiece(piece.Piece):
  """Finds non-finite rows in a batch and applies `guard.bad_inputs`.

  A clean batch costs one finiteness reduction per floating leaf; the per-row
  and per-column work runs only when something is bad. With several replicas
  every decision is taken on counts summed over all of them, so one replica's
  bad rows are a decision for all. Its loop-carried state is, per floating
  leaf, the bad rows seen and the first bad column (for the message).

  Args:
    policy: `guard.bad_inputs`: drop_rows, skip_batch or raise.
    leaf_names: the names of the batch's floating-point leaves.
  """

  name = "inputs"
  order = 10
  kinds = kinds_lib.declare(
    kinds_lib.Kind(
      "nonfinite_inputs", "non-finite values in the input batch.", "#7b3294", diverges=False
    )
  )
  config_keys = ("guard.check_inputs", "guard.bad_inputs")
  sums = ("dropped_rows",)

  def __init__(self, *, policy: str, leaf_names: tuple[str, ...]):
    self.policy = policy
    self.drop = policy == "drop_rows"
    self.leaf_names = tuple(leaf_names)
    self.leaf_count = len(self.leaf_names)

  @classmethod
  def build(cls, config, ctx: piece.BuildContext) -> InputPiece | None:
    g = config.guard
    if not g.check_inputs or not ctx.leaf_names:
      return None
    return cls(policy=g.bad_inputs, leaf_names=ctx.leaf_names)

  # in graph
  def inputs(self, step: piece.Step) -> None:
    no_bad = tf.zeros([self.leaf_count], tf.int32)
    no_cols = tf.fill([self.leaf_count], -1)
    if step.replicas == 1:
      checked = self._one_replica(step.batch, no_bad, no_cols)
    else:
      checked = self._replicas(step.batch, step.ctx, step.replicas, no_cols)
    step.batch, step.weight, step.skip = checked.batch, checked.weight, checked.skip
    step.findings["inputs"] = checked

  def conditions(self, step):
    return [piece.Condition(self.order, kinds_lib.SKIPPED_BATCH, "nonfinite_inputs", step.skip)]

  def occurred(self, step):
    return {"nonfinite_inputs": step.findings["inputs"].dropped > 0}

  def step_sums(self, step):
    return {"dropped_rows": tf.cast(step.findings["inputs"].dropped, tf.float32)}

  def outcome(self, step):
    checked = step.findings["inputs"]
    return tf.stack([checked.leaf_bad, checked.cols])

  def carry(self):
    return tf.stack([tf.zeros([self.leaf_count], tf.int32), tf.fill([self.leaf_count], -1)])

  def fold(self, carried, outcome, core):
    return tf.stack([carried[0] + outcome[0], tf.where(carried[1] < 0, outcome[1], carried[1])])

  def report(self, carried):
    return carried

  # host
  def action(self, kind, out) -> str:
    dropped = int(out.sums["dropped_rows"])
    skipped = int(out.counts[kinds_lib.SKIPPED_BATCH])
    return "dropped_rows" if self.drop and (dropped or not skipped) else "skipped_batch"

  def explain(self, kind, out) -> str:
    dropped = int(out.sums["dropped_rows"])
    skipped = int(out.counts[kinds_lib.SKIPPED_BATCH])
    return (
      f"non-finite values in {self.where(out)}; {dropped} rows dropped, {skipped} batches skipped"
    )

  def where(self, out) -> str:
    """Where the non-finite inputs of a loop were: "x[:, 1] (3 rows)"."""
    leaf_bad, cols = out.pieces[self.name]
    parts = []
    for name, bad, col in zip(self.leaf_names, leaf_bad, cols):
      if bad:
        where = f"{name}[:, {int(col)}]" if col >= 0 else name
        parts.append(f"{where} ({int(bad)} rows)")
    return ", ".join(parts) or "the inputs"

  def _one_replica(self, batch, no_bad, no_cols) -> InputCheck:
    oks = [tf.reduce_all(tf.math.is_finite(t)) for _, t in float_leaves(batch)]
    all_ok = oks[0] if len(oks) == 1 else tf.reduce_all(tf.stack(oks))

    def clean():
      return batch, tf.constant(False), tf.constant(0), no_bad, no_cols

    def dirty():
      row_ok, leaf_bad = finite_rows(batch)
      cols = bad_columns(batch)
      rows = tf.size(row_ok)
      bad = rows - tf.reduce_sum(tf.cast(row_ok, tf.int32))
      if not self.drop:
        return batch, tf.constant(True), tf.constant(0), leaf_bad, cols
      kept = rows - bad
      kept_batch = keep_rows(batch, row_ok, kept > 0)
      return kept_batch, kept <= 0, tf.where(kept > 0, bad, 0), leaf_bad, cols

    batch, skip, dropped, leaf_bad, cols = tf.cond(all_ok, clean, dirty)
    return InputCheck(batch, None, skip, dropped, leaf_bad, cols)

  def _replicas(self, batch, ctx, n_rep: int, no_cols) -> InputCheck:
    n_leaves = self.leaf_count
    rows = tf.shape(tf.nest.flatten(batch)[0])[0]
    row_ok, leaf_bad = finite_rows(batch)
    local_bad = rows - tf.reduce_sum(tf.cast(row_ok, tf.int32))
    local_kept = rows - local_bad if self.drop else rows
    local_cols = tf.cond(local_bad > 0, lambda: bad_columns(batch), lambda: no_cols)
    # Each replica's bad columns (+1; 0 for none) in its own row, so the sum
    # tells every replica the columns of all: the message names the column
    # whichever shard held the bad row.
    slots = tf.one_hot(ctx.replica_id_in_sync_group, n_rep, dtype=tf.int32)[:, None]
    slots = tf.reshape(slots * (local_cols + 1)[None, :], [-1])
    sums = ctx.all_reduce("sum", tf.concat([[local_bad, local_kept], leaf_bad, slots], 0))
    global_bad, global_kept = sums[0], sums[1]
    leaf_bad = sums[2 : 2 + n_leaves]
    all_cols = tf.reshape(sums[2 + n_leaves :], [n_rep, n_leaves]) - 1
    cols = tf.reduce_min(tf.where(all_cols >= 0, all_cols, tf.int32.max), axis=0)
    cols = tf.where(cols == tf.int32.max, -1, cols)
    if self.drop:
      skip = global_kept <= 0
      # A shard left empty still runs forward on one sanitised row with weight
      # 0, so every replica takes part in the collectives that follow.
      batch = tf.cond(
        local_bad > 0, lambda: keep_rows(batch, row_ok, local_kept > 0), lambda: batch
      )
    else:
      skip = global_bad > 0
    dropped = tf.where(self.drop & ~skip, global_bad, 0)
    weight = tf.cast(local_kept, tf.float32) / tf.maximum(tf.cast(global_kept, tf.float32), 1.0)
    return InputCheck(batch, weight, skip, dropped, leaf_bad, cols)


def finite_and_norm(grads: list) -> tuple[tf.Tensor, tf.Tensor]:
  """(all gradients finite, their global norm).

  The common case costs one norm: a finite norm proves every gradient finite.
  Only a non-finite norm pays for the element-wise check, and finite gradients
  whose squares overflow get a rescaled norm, never inf.
  """
  if not grads:
    return tf.constant(True), tf.constant(0.0)
  norm = tf.linalg.global_norm(grads)

  def slow():
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in grads]))

    def rescaled():
      m = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(g)) for g in grads]))
      return m * tf.linalg.global_norm([g / m for g in grads])

    return finite, tf.cond(finite, rescaled, lambda: norm)

  return tf.cond(tf.math.is_finite(norm), lambda: (tf.constant(True), norm), slow)


class FinitePiece(piece.Piece):
  """A non-finite loss, or finite loss with non-finite gradients (float32 and
  bfloat16; under mixed_float16 the loss scale's piece classes gradients)."""

  name = "finite"
  order = 20
  kinds = kinds_lib.declare(
    kinds_lib.Kind(
      "nonfinite_loss",
      "the loss was not finite.",
      "#d7191c",
      batch_bound=True,
      before_update=True,
    ),
    kinds_lib.Kind(
      "nonfinite_grads",
      "the loss was finite but some gradients were not.",
      "#fdae61",
      batch_bound=True,
      before_update=True,
    ),
  )

  def __init__(self, *, fp16: bool):
    self.fp16 = fp16

  @classmethod
  def build(cls, config, ctx):
    return cls(fp16=ctx.fp16)

  def conditions(self, step):
    rows = [
      piece.Condition(
        self.order, kinds_lib.DIVERGENCE, "nonfinite_loss", ~tf.math.is_finite(step.loss)
      )
    ]
    if not self.fp16:
      rows.append(
        piece.Condition(self.order + 1, kinds_lib.DIVERGENCE, "nonfinite_grads", ~step.grads_finite)
      )
    return rows


def dense_float32(g) -> tf.Tensor:
  """A gradient as a dense float32 tensor (IndexedSlices from embeddings too)."""
  if isinstance(g, tf.IndexedSlices):
    g = tf.convert_to_tensor(g)
  return tf.cast(g, tf.float32)


def snapshot(variables: list) -> list:
  """Copies of the variables' values, to put back after a skipped step."""
  return [tf.identity(v) for v in variables]


def put_back(variables: list, values: list) -> None:
  """Assigns the values `snapshot` took back to the variables."""
  for var, value in zip(variables, values):
    var.assign(value)


def all_finite(variables: list) -> tf.Tensor:
  """Whether every floating-point variable holds only finite values."""
  flags = [
    tf.reduce_all(tf.math.is_finite(v)) for v in variables if tf.as_dtype(v.dtype).is_floating
  ]
  return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)
