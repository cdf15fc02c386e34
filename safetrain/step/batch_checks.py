"""What the input check knows about a batch beyond finiteness: the class
labels of a sparse categorical loss (`Labels`) and the shapes of a dataset
whose element spec leaves a dimension unknown (`Shapes`).

Both are built once by the trainer (`BuildContext.labels`, `.shapes`) and
used by `guard.InputPiece`, which keeps the one decision per batch: a row
with a bad label is a bad row like a row with NaN features, a batch of
another shape is a bad batch. Each offers a cheap check for the clean path
(one fused reduction; shapes are host-side scalars) and the per-row work for
the rare branch. Graph code only: the loop is traced without AutoGraph.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Labels:
  """The integer labels `y` of a sparse categorical loss and the model's
  output size: a label outside [0, num_classes) is a bad row.

  Attributes:
    leaf: the label's position in `tf.nest.flatten(batch)`.
    name: its name in messages ("y").
    num_classes: the last dimension of the model's output.
  """

  leaf: int
  name: str
  num_classes: int

  def tensor(self, batch) -> tf.Tensor:
    return tf.nest.flatten(batch)[self.leaf]

  def _ok(self, y: tf.Tensor) -> tf.Tensor:
    return (y >= 0) & (y < tf.cast(self.num_classes, y.dtype))

  def clamped(self, y: tf.Tensor) -> tf.Tensor:
    """`y` with each label outside [0, num_classes) replaced by 0."""
    return tf.where(self._ok(y), y, tf.zeros_like(y))

  def in_range(self, batch):
    """`batch` with its bad labels `clamped`: what the build's eager passes
    over the first batch read (an op on a bad label raises on the CPU); the
    step itself sees and drops the real rows."""
    flat = list(tf.nest.flatten(batch))
    flat[self.leaf] = self.clamped(tf.convert_to_tensor(flat[self.leaf]))
    return tf.nest.pack_sequence_as(batch, flat)

  def all_ok(self, batch) -> tf.Tensor:
    """bool: every label in range (the clean path: one fused reduction)."""
    return tf.reduce_all(self._ok(self.tensor(batch)))

  def rows(self, batch) -> tuple[tf.Tensor, tf.Tensor]:
    """(row_ok bool[B], first int32[2]): rows whose labels are all in range,
    and the first bad label's (value, row), or (0, -1)."""
    y = self.tensor(batch)
    rows = tf.shape(y)[0]
    flat = tf.reshape(y, [rows, -1])
    ok = self._ok(flat)
    row_ok = tf.reduce_all(ok, axis=1)

    def first():
      row = tf.argmax(tf.cast(~row_ok, tf.int32), output_type=tf.int32)
      col = tf.argmax(tf.cast(~ok[row], tf.int32), output_type=tf.int32)
      value = flat[row, col]
      if value.dtype.is_floating:
        value = tf.clip_by_value(tf.floor(value), -(2.0**31), 2.0**31 - 1)
      return tf.stack([tf.cast(value, tf.int32), row])

    found = tf.cond(tf.reduce_all(row_ok), lambda: tf.constant([0, -1]), first)
    return row_ok, found

  def text(self) -> str:
    return f"class labels {self.name} outside [0, {self.num_classes})"


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The non-batch shapes of the first batch, for the leaves whose element
  spec leaves a dimension unknown: a batch of another shape is a bad batch,
  replaced by `substitute` (one sanitised row of the first batch) so that the
  model never sees it.

  Attributes:
    leaves: positions in `tf.nest.flatten(batch)` of the checked leaves.
    names: their names in messages.
    expected: their non-batch shapes in the first batch.
    substitute: the first batch's row 0, sanitised (numpy, batch structure).
  """

  leaves: tuple[int, ...]
  names: tuple[str, ...]
  expected: tuple[tuple[int, ...], ...]
  substitute: Any

  @property
  def size(self) -> int:
    """The length of `got`'s vector: every checked leaf's non-batch dims."""
    return sum(len(e) for e in self.expected)

  def got(self, batch) -> tf.Tensor:
    """int32[size]: the batch's non-batch dims of the checked leaves."""
    flat = tf.nest.flatten(batch)
    return tf.concat([tf.shape(flat[i], out_type=tf.int32)[1:] for i in self.leaves], 0)

  def ok(self, got: tf.Tensor) -> tf.Tensor:
    expected = tf.constant([d for e in self.expected for d in e], tf.int32, [self.size])
    return tf.reduce_all(tf.equal(got, expected))

  def replacement(self, batch):
    """The substitute row, in the batch's structure."""
    flat = [tf.constant(a) for a in tf.nest.flatten(self.substitute)]
    return tf.nest.pack_sequence_as(batch, flat)

  def describe(self, got) -> str:
    """Where a batch of `got` dims differs: "x has shape [?, 5], the first
    batch's is [?, 4]"."""
    parts, at = [], 0
    for name, expected in zip(self.names, self.expected):
      dims = [int(d) for d in got[at : at + len(expected)]]
      at += len(expected)
      if tuple(dims) != tuple(expected):
        parts.append(
          f"{name} has shape {_shape(dims)} where the first batch's is {_shape(expected)}"
        )
    return "; ".join(parts) or "a batch of another shape"


def _shape(dims) -> str:
  return "[B, " + ", ".join(str(int(d)) for d in dims) + "]"


def unknown_dims(element_spec) -> list[int]:
  """Positions (in `tf.nest.flatten` order) of the leaves whose spec leaves a
  non-batch dimension unknown (with a known rank)."""
  out = []
  for i, s in enumerate(tf.nest.flatten(element_spec)):
    shape = s.shape
    if shape.rank is not None and shape.rank > 1 and None in shape.as_list()[1:]:
      out.append(i)
  return out


def model_takes_any_shape(model) -> bool | None:
  """Whether the model declares an input with an unknown non-batch dimension
  (a sequence model takes batches of varying length); None when it declares
  no inputs (a subclassed model)."""
  try:
    inputs = model.inputs
  except (AttributeError, ValueError):
    return None
  if not inputs:
    return None
  return any(None in list(t.shape)[1:] for t in tf.nest.flatten(inputs))


def sanitised_row(first_batch, labels: Labels | None):
  """Row 0 of the first batch as numpy, with non-finite floats and
  out-of-range labels set to 0: what the model sees in place of a bad batch."""
  flat = [np.asarray(t)[:1].copy() for t in tf.nest.flatten(first_batch)]
  for i, a in enumerate(flat):
    if np.issubdtype(a.dtype, np.floating):
      a[~np.isfinite(a)] = 0
    if labels is not None and i == labels.leaf:
      a[(a < 0) | (a >= labels.num_classes)] = 0
  return tf.nest.pack_sequence_as(first_batch, flat)
