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
from safetrain.step import batch_checks, piece


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


def sanitised(batch, labels: batch_checks.Labels | None = None, *, rows: int | None = None):
  """The batch (its first `rows` rows, or all) with finite floats (0 where
  not) and labels in range: what the model may see of a bad batch."""
  flat = [t if rows is None else t[:rows] for t in tf.nest.flatten(batch)]
  for i, t in enumerate(flat):
    if t.dtype.is_floating:
      t = tf.where(tf.math.is_finite(t), t, tf.zeros_like(t))
    if labels is not None and i == labels.leaf:
      t = labels.clamped(t)
    flat[i] = t
  return tf.nest.pack_sequence_as(batch, flat)


def keep_rows(batch, row_ok, any_kept, labels: batch_checks.Labels | None = None):
  """Drops bad rows; a shard with none left keeps row 0, sanitised (finite
  floats, a label in range), so it can still take part in the step's
  collectives (its loss weight is 0)."""
  return tf.cond(
    any_kept, lambda: mask_rows(batch, row_ok), lambda: sanitised(batch, labels, rows=1)
  )


# What made a batch bad (InputCheck.cause), first match wins.
CLEAN, NONFINITE, LABELS, SHAPES = range(4)


class InputCheck(NamedTuple):
  """What the input check decided about one replica's batch."""

  batch: Any  # what the model sees: bad rows dropped, a bad shape replaced
  weight: tf.Tensor | None  # this replica's share of the global loss; None on one replica
  skip: tf.Tensor  # bool: the step is skipped (no usable row, or skip_batch/raise)
  dropped: tf.Tensor  # int32: rows dropped over all replicas (any cause)
  label_dropped: tf.Tensor  # int32: of which for their labels alone
  cause: tf.Tensor  # int32: CLEAN, NONFINITE, LABELS or SHAPES
  state: InputState  # this attempt's findings, for messages (see InputState)


class InputState(NamedTuple):
  """What the input check carries through a loop, for the host's messages.

  finite: int32[2, L]: per floating leaf, the bad rows seen and the first
    bad column (or -1). labels: int32[3]: rows with a bad label, the first
    bad label's value and its row in the batch (or -1). shapes: int32[1 + D]:
    whether a batch of another shape was seen, and the first one's
    non-batch dims (`batch_checks.Shapes.got`). skipped: int32[4]: the
    batches skipped, by cause (CLEAN .. SHAPES). last: int32, the cause of the
    last batch skipped (what ended a loop under guard.bad_inputs=raise).
  """

  finite: tf.Tensor
  labels: tf.Tensor
  shapes: tf.Tensor
  skipped: tf.Tensor
  last: tf.Tensor


class InputPiece(piece.Piece):
  """Finds bad rows and bad batches and applies `guard.bad_inputs`.

  A bad row holds a non-finite floating-point feature, or (with the default
  compute_loss and a sparse categorical loss) a class label outside
  [0, num_classes); a bad batch (when the element spec leaves a dimension
  unknown) has another non-batch shape than the first batch: the model never
  sees it, one sanitised row of the first batch stands in with weight 0.

  A clean batch costs one fused reduction per check (finiteness per floating
  leaf, the label range, the shapes); the per-row and per-column work runs
  only when something is bad. With several replicas every decision is taken
  on counts summed over all of them, so one replica's bad rows are a
  decision for all. Its loop-carried state is an `InputState`.

  Args:
    policy: `guard.bad_inputs`: drop_rows, skip_batch or raise.
    leaf_names: the names of the batch's floating-point leaves.
    labels: the label check (`batch_checks.Labels`), or None.
    shapes: the shape check (`batch_checks.Shapes`), or None.
  """

  name = "inputs"
  order = 10
  kinds = kinds_lib.declare(
    kinds_lib.Kind(
      "nonfinite_inputs", "non-finite values in the input batch.", "#7b3294", diverges=False
    ),
    kinds_lib.Kind(
      "bad_labels",
      "class labels outside [0, num_classes) for a sparse categorical loss.",
      "#c51b7d",
      diverges=False,
    ),
    kinds_lib.Kind(
      "bad_shapes",
      "a batch whose shape differs from the first batch's.",
      "#35978f",
      diverges=False,
    ),
  )
  config_keys = ("guard.check_inputs", "guard.bad_inputs")
  sums = ("dropped_rows", "dropped_label_rows")

  def __init__(
    self,
    *,
    policy: str,
    leaf_names: tuple[str, ...],
    labels: batch_checks.Labels | None = None,
    shapes: batch_checks.Shapes | None = None,
  ):
    self.policy = policy
    self.drop = policy == "drop_rows"
    self.leaf_names = tuple(leaf_names)
    self.leaf_count = len(self.leaf_names)
    self.labels = labels
    self.shapes = shapes
    self.shape_size = shapes.size if shapes is not None else 0

  @classmethod
  def build(cls, config, ctx: piece.BuildContext) -> InputPiece | None:
    g = config.guard
    if not g.check_inputs or not (ctx.leaf_names or ctx.labels or ctx.shapes):
      return None
    return cls(policy=g.bad_inputs, leaf_names=ctx.leaf_names, labels=ctx.labels, shapes=ctx.shapes)

  def compiles_with_xla(self) -> bool:
    # A batch of another shape is replaced by a row of the first batch's.
    return self.shapes is None

  # in graph
  def inputs(self, step: piece.Step) -> None:
    if step.replicas == 1 and step.lean:
      checked = self._lean(step)
    elif step.replicas == 1:
      checked = self._one_replica(step.batch)
    else:
      checked = self._replicas(step.batch, step.ctx, step.replicas)
    step.batch, step.weight, step.skip = checked.batch, checked.weight, checked.skip
    step.findings["inputs"] = checked

  def conditions(self, step):
    checked = step.findings["inputs"]
    rows = [(NONFINITE, "nonfinite_inputs")]
    rows += [(LABELS, "bad_labels")] if self.labels is not None else []
    rows += [(SHAPES, "bad_shapes")] if self.shapes is not None else []
    # A skip without a cause (a global batch of no rows) is the inputs', as before.
    cause = tf.where(checked.cause == CLEAN, NONFINITE, checked.cause)
    return [
      piece.Condition(
        self.order + i / 10, kinds_lib.SKIPPED_BATCH, kind, checked.skip & (cause == code)
      )
      for i, (code, kind) in enumerate(rows)
    ]

  def occurred(self, step):
    checked = step.findings["inputs"]
    out = {"nonfinite_inputs": checked.dropped - checked.label_dropped > 0}
    if self.labels is not None:
      out["bad_labels"] = checked.label_dropped > 0
    return out

  def step_sums(self, step):
    checked = step.findings["inputs"]
    return {
      "dropped_rows": tf.cast(checked.dropped, tf.float32),
      "dropped_label_rows": tf.cast(checked.label_dropped, tf.float32),
    }

  def outcome(self, step):
    checked = step.findings["inputs"]
    cause = tf.where(checked.skip, tf.where(checked.cause == CLEAN, NONFINITE, checked.cause), -1)
    return checked.state._replace(skipped=tf.one_hot(cause, 4, dtype=tf.int32), last=cause)

  def carry(self):
    return self._no_state()

  def fold(self, carried, outcome, core):
    finite = tf.stack(
      [
        carried.finite[0] + outcome.finite[0],
        tf.where(carried.finite[1] < 0, outcome.finite[1], carried.finite[1]),
      ]
    )
    first = carried.labels[2] < 0
    labels = tf.stack(
      [
        carried.labels[0] + outcome.labels[0],
        tf.where(first, outcome.labels[1], carried.labels[1]),
        tf.where(first, outcome.labels[2], carried.labels[2]),
      ]
    )
    shapes = tf.where(carried.shapes[0] > 0, carried.shapes, outcome.shapes)
    last = tf.where(outcome.last >= 0, outcome.last, carried.last)
    return InputState(finite, labels, shapes, carried.skipped + outcome.skipped, last)

  def report(self, carried):
    return carried

  # host
  _CAUSE = {"nonfinite_inputs": NONFINITE, "bad_labels": LABELS, "bad_shapes": SHAPES}

  def action(self, kind, out) -> str:
    dropped, skipped = self._dropped(kind, out), self._skipped(kind, out)
    return "dropped_rows" if self.drop and (dropped or not skipped) else "skipped_batch"

  def explain(self, kind, out) -> str:
    skipped = self._skipped(kind, out)
    if kind == "bad_shapes":
      return f"{self.describe(kind, out)}; {skipped} batches skipped (the model did not see them)"
    dropped = self._dropped(kind, out)
    return f"{self.describe(kind, out)}; {dropped} rows dropped, {skipped} batches skipped"

  def describe(self, kind: str, out) -> str:
    """What was bad, for a record or the raise message: "non-finite values in
    x[:, 1] (3 rows)", "class labels y outside [0, 5) in 2 rows: the first,
    5, in row 3", "x has shape [B, 5] where the first batch's is [B, 4]"."""
    state = InputState(*out.pieces[self.name])
    if kind == "bad_labels" and self.labels is not None:
      count, value, row = (int(v) for v in state.labels)
      return f"{self.labels.text()} in {count} rows: the first, {value}, in row {row}"
    if kind == "bad_shapes" and self.shapes is not None:
      return self.shapes.describe(state.shapes[1:])
    return f"non-finite values in {self.where(out)}"

  def last_kind(self, out) -> str:
    """The kind of the last batch the loop skipped: the one that ended it
    under guard.bad_inputs=raise."""
    last = int(InputState(*out.pieces[self.name]).last)
    return {v: k for k, v in self._CAUSE.items()}.get(last, "nonfinite_inputs")

  def where(self, out) -> str:
    """Where the non-finite inputs of a loop were: "x[:, 1] (3 rows)"."""
    leaf_bad, cols = InputState(*out.pieces[self.name]).finite
    parts = []
    for name, bad, col in zip(self.leaf_names, leaf_bad, cols):
      if bad:
        where = f"{name}[:, {int(col)}]" if col >= 0 else name
        parts.append(f"{where} ({int(bad)} rows)")
    return ", ".join(parts) or "the inputs"

  def _dropped(self, kind, out) -> int:
    labels = int(out.sums["dropped_label_rows"])
    return labels if kind == "bad_labels" else int(out.sums["dropped_rows"]) - labels

  def _skipped(self, kind, out) -> int:
    return int(InputState(*out.pieces[self.name]).skipped[self._CAUSE[kind]])

  # graph helpers
  def _no_state(self) -> InputState:
    return InputState(
      finite=tf.stack([tf.zeros([self.leaf_count], tf.int32), tf.fill([self.leaf_count], -1)]),
      labels=tf.constant([0, 0, -1], tf.int32),
      shapes=tf.zeros([1 + self.shape_size], tf.int32),
      skipped=tf.zeros([4], tf.int32),
      last=tf.constant(-1),
    )

  def _finite_rows(self, batch):
    if not self.leaf_count:
      rows = tf.shape(tf.nest.flatten(batch)[0])[0]
      return tf.ones([rows], tf.bool), tf.zeros([0], tf.int32), tf.zeros([0], tf.int32)
    row_ok, leaf_bad = finite_rows(batch)
    return row_ok, leaf_bad, bad_columns(batch)

  def _label_rows(self, batch, rows):
    if self.labels is None:
      return tf.ones([rows], tf.bool), tf.constant([0, -1])
    return self.labels.rows(batch)

  def _got(self, batch) -> tf.Tensor:
    return self.shapes.got(batch) if self.shapes is not None else tf.zeros([0], tf.int32)

  def _replaced(self, shape_bad, batch):
    """The batch, or in its place the first batch's sanitised row when its
    shape is not the first batch's (the model must not see it)."""
    if self.shapes is None:
      return batch
    return tf.cond(shape_bad, lambda: self.shapes.replacement(batch), lambda: batch)

  def _all_ok(self, batch) -> tuple[tf.Tensor, tf.Tensor]:
    """(whether nothing in the batch is bad, its non-batch dims)."""
    flags = [tf.reduce_all(tf.math.is_finite(t)) for _, t in float_leaves(batch)]
    if self.labels is not None:
      flags.append(self.labels.all_ok(batch))
    got = self._got(batch)
    if self.shapes is not None:
      flags.append(self.shapes.ok(got))
    return (flags[0] if len(flags) == 1 else tf.reduce_all(tf.stack(flags))), got

  def _lean(self, step: piece.Step) -> InputCheck:
    """The lean loop's check: a bad batch is pending (redone with the rare
    paths built); the model sees a stand-in the op cannot fail on (finite,
    labels in range, the first batch's shape), by a select where it can."""
    batch = step.batch
    all_ok, _ = self._all_ok(batch)
    step.pending = step.pending | tf.logical_not(all_ok)
    if self.shapes is not None:
      seen = tf.cond(all_ok, lambda: batch, lambda: self.shapes.replacement(batch))
    elif step.branchless:
      seen = sanitised(batch, self.labels)
    else:
      seen = tf.cond(all_ok, lambda: batch, lambda: sanitised(batch, self.labels, rows=1))
    zero = tf.constant(0)
    return InputCheck(
      seen, None, tf.constant(False), zero, zero, tf.constant(CLEAN), self._no_state()
    )

  def _one_replica(self, batch) -> InputCheck:
    all_ok, got = self._all_ok(batch)
    zero = tf.constant(0)
    none = self._no_state()

    def clean():
      return batch, tf.constant(False), zero, zero, tf.constant(CLEAN), none

    def dirty():
      row_f, leaf_bad, cols = self._finite_rows(batch)
      rows = tf.size(row_f)
      row_l, first = self._label_rows(batch, rows)
      shape_bad = tf.logical_not(self.shapes.ok(got)) if self.shapes is not None else False
      nonfinite = rows - tf.reduce_sum(tf.cast(row_f, tf.int32))
      label_bad = tf.reduce_sum(tf.cast(row_f & ~row_l, tf.int32))
      cause = self._cause(shape_bad, nonfinite, label_bad)
      row_ok = row_f & row_l
      kept = rows - nonfinite - label_bad
      # The model never sees a bad label (the op would fail) nor a bad shape.
      seen = self._replaced(shape_bad, keep_rows(batch, row_ok, kept > 0, self.labels))
      if self.drop:
        skip = tf.logical_or(shape_bad, kept <= 0)
        dropped = tf.where(skip, 0, nonfinite + label_bad)
        label_dropped = tf.where(skip, 0, label_bad)
      else:
        skip, dropped, label_dropped = tf.constant(True), zero, zero
      state = InputState(
        tf.stack([leaf_bad, cols]),
        tf.concat([[label_bad], first], 0),
        tf.concat([[tf.cast(shape_bad, tf.int32)], got], 0),
        none.skipped,
        none.last,
      )
      return seen, skip, dropped, label_dropped, cause, state

    seen, skip, dropped, label_dropped, cause, state = tf.cond(all_ok, clean, dirty)
    return InputCheck(seen, None, skip, dropped, label_dropped, cause, state)

  @staticmethod
  def _cause(shape_bad, nonfinite, label_bad) -> tf.Tensor:
    return tf.where(
      shape_bad,
      SHAPES,
      tf.where(nonfinite > 0, NONFINITE, tf.where(label_bad > 0, LABELS, CLEAN)),
    )

  def _replicas(self, batch, ctx, n_rep: int) -> InputCheck:
    n_leaves, size = self.leaf_count, self.shape_size
    rows = tf.shape(tf.nest.flatten(batch)[0])[0]
    row_f, leaf_bad = (
      finite_rows(batch) if n_leaves else (tf.ones([rows], tf.bool), tf.zeros([0], tf.int32))
    )
    row_l, first = self._label_rows(batch, rows)
    got = self._got(batch)
    local_shape_bad = (
      tf.cast(~self.shapes.ok(got), tf.int32) if self.shapes is not None else tf.constant(0)
    )
    local_nonfinite = rows - tf.reduce_sum(tf.cast(row_f, tf.int32))
    local_label = tf.reduce_sum(tf.cast(row_f & ~row_l, tf.int32))
    local_bad = local_nonfinite + local_label
    local_kept = rows - local_bad if self.drop else rows
    no_cols = tf.fill([n_leaves], -1)
    local_cols = (
      tf.cond(local_nonfinite > 0, lambda: bad_columns(batch), lambda: no_cols)
      if n_leaves
      else no_cols
    )
    # Each replica's findings in its own row (bad columns +1, 0 for none; the
    # first bad label as (found, value, row); its dims and row count), so the
    # sum tells every replica those of all: the message names them whichever
    # shard held the bad row.
    found = tf.cast(first[1] >= 0, tf.int32)
    mine = tf.concat([local_cols + 1, [found, first[0] * found, first[1] * found, rows], got], 0)
    slots = tf.one_hot(ctx.replica_id_in_sync_group, n_rep, dtype=tf.int32)[:, None]
    slots = tf.reshape(slots * mine[None, :], [-1])
    counts = [local_nonfinite, local_label, local_kept, local_shape_bad]
    sums = ctx.all_reduce("sum", tf.concat([counts, leaf_bad, slots], 0))
    nonfinite, label_bad, global_kept, shape_bad = tf.unstack(sums[:4])
    shape_bad = shape_bad > 0
    leaf_bad = sums[4 : 4 + n_leaves]
    per = tf.reshape(sums[4 + n_leaves :], [n_rep, n_leaves + 4 + size])
    all_cols = per[:, :n_leaves] - 1
    cols = tf.reduce_min(tf.where(all_cols >= 0, all_cols, tf.int32.max), axis=0)
    cols = tf.where(cols == tf.int32.max, -1, cols)
    label_found, values, label_rows, shard_rows = tf.unstack(
      per[:, n_leaves : n_leaves + 4], axis=1
    )
    # The first replica with a bad label; its row in the global batch.
    which = tf.argmax(label_found, output_type=tf.int32)
    offset = tf.reduce_sum(tf.where(tf.range(n_rep) < which, shard_rows, 0))
    any_label = tf.reduce_any(label_found > 0)
    first = tf.where(
      any_label, tf.stack([values[which], label_rows[which] + offset]), tf.constant([0, -1])
    )
    got = tf.reduce_max(per[:, n_leaves + 4 :], axis=0)
    cause = self._cause(shape_bad, nonfinite, label_bad)
    # A shard left empty still runs forward on one sanitised row with weight
    # 0, so every replica takes part in the collectives that follow.
    seen = tf.cond(
      local_bad > 0,
      lambda: keep_rows(batch, row_f & row_l, local_bad < rows, self.labels),
      lambda: batch,
    )
    seen = self._replaced(shape_bad, seen)
    if self.drop:
      skip = tf.logical_or(shape_bad, global_kept <= 0)
    else:
      skip = tf.logical_or(shape_bad, nonfinite + label_bad > 0)
    dropped = tf.where(self.drop & ~skip, nonfinite + label_bad, 0)
    label_dropped = tf.where(self.drop & ~skip, label_bad, 0)
    kept = tf.where(shape_bad, 0, local_kept)
    weight = tf.cast(kept, tf.float32) / tf.maximum(tf.cast(global_kept, tf.float32), 1.0)
    state = InputState(
      tf.stack([leaf_bad, cols]),
      tf.concat([[label_bad], first], 0),
      tf.concat([[tf.cast(shape_bad, tf.int32)], got], 0),
      tf.zeros([4], tf.int32),
      tf.constant(-1),
    )
    return InputCheck(seen, weight, skip, dropped, label_dropped, cause, state)


def finite_and_norm(grads: list, *, branchless: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
  """(all gradients finite, their global norm).

  The common case costs one norm: a finite norm proves every gradient finite.
  Only a non-finite norm pays for the element-wise check, and finite gradients
  whose squares overflow get a rescaled norm, never inf.

  Args:
    grads: the gradients.
    branchless: compute the element-wise check and the rescaled norm on
      every step and select (`train.skip_update=select`): the same answer,
      a few passes over the gradients dearer, with no branch whose predicate
      a GPU must copy to the host.
  """
  if not grads:
    return tf.constant(True), tf.constant(0.0)
  norm = tf.linalg.global_norm(grads)

  def every_finite():
    return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in grads]))

  def rescaled():
    m = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(g)) for g in grads]))
    return m * tf.linalg.global_norm([g / m for g in grads])

  if branchless:
    norm_finite = tf.math.is_finite(norm)
    finite = norm_finite | every_finite()
    # Where the rescaled norm is not wanted it may be NaN (m 0 or inf): unused.
    return finite, tf.where(norm_finite, norm, tf.where(finite, rescaled(), norm))

  def slow():
    finite = every_finite()
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


def select(variables: list, keep: tf.Tensor, before: list) -> None:
  """Keeps each variable's current value where `keep` (a bool scalar), else
  assigns back its value `before`: a skip without a branch. `tf.where` picks
  one side exactly, so the NaN an update wrote on a skipped step never
  reaches the other."""
  for var, old in zip(variables, before):
    var.assign(tf.where(keep, tf.convert_to_tensor(var), old))


def all_finite(variables: list) -> tf.Tensor:
  """Whether every floating-point variable holds only finite values."""
  flags = [
    tf.reduce_all(tf.math.is_finite(v)) for v in variables if tf.as_dtype(v.dtype).is_floating
  ]
  return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)
