"""The training data: build and check the dataset, iterate it, find it again.

A run must be able to come back to the exact batch it had reached, after a
resume or a rollback with `recovery.data=replay`. Two ways:

- **The iterator in the checkpoint.** A plain tf.data iterator saves its
  position and buffers with `tf.train.Checkpoint`, so a resume is bit-exact.
- **By position.** An iterator that cannot be saved (a distributed iterator;
  a pipeline with state outside TensorFlow's graph: `tf.random.*` or a Keras
  augmentation layer in `map`, `tf.py_function`, `tf.numpy_function`,
  `Dataset.from_generator`) is re-created from `build_train_dataset()` and
  the consumed batches are skipped. The batches come back in the same order
  when the pipeline's order is deterministic (seeded shuffles, a generator
  that yields the same sequence); the random augmentation draws do not.

Which way a run uses is decided once, when the trainer is built, by trying to
serialize the fresh iterator (cheap: nothing has been read yet).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from safetrain.core import compat
from safetrain.core.errors import BadInputError
from safetrain.step import guard


def unpack_batch(batch):
  """Splits a batch into (x, y, sample_weight) for the default compute_loss."""
  if isinstance(batch, dict):
    if "x" not in batch or "y" not in batch:
      raise ValueError(
        "dict batches for the default compute_loss need keys 'x' and 'y'; "
        f"got {sorted(batch)}. Override compute_loss for other layouts."
      )
    return batch["x"], batch["y"], batch.get("sample_weight")
  if isinstance(batch, (tuple, list)):
    if len(batch) == 2:
      return batch[0], batch[1], None
    if len(batch) == 3:
      return tuple(batch)
  raise ValueError(
    "batches for the default compute_loss are (x, y), (x, y, sample_weight) "
    f"or dicts with 'x' and 'y'; got {type(batch).__name__}"
  )


def label_leaf(batch) -> int | None:
  """The position of the label `y` in `tf.nest.flatten(batch)` for the
  default compute_loss's layouts, or None (no single label tensor)."""
  try:
    _, y, _ = unpack_batch(batch)
  except ValueError:
    return None
  flat = tf.nest.flatten(batch)
  for i, t in enumerate(flat):
    if t is y:
      return i
  return None


def class_weighted(dataset: tf.data.Dataset, class_weight: dict[int, float]) -> tf.data.Dataset:
  """`dataset` with each batch's sample weight multiplied by its labels'
  class weights, as Keras `fit(class_weight=...)` turns them into sample
  weights: the class of a label is its rounded value, or the argmax of a
  one-hot (last axis > 1) label; a class not in `class_weight` weighs 1.

  The batches must be `(x, y)`, `(x, y, sample_weight)` or dicts with "x"
  and "y" (the layouts the default compute_loss reads), with one label
  tensor `y`; they come out as `(x, y, sample_weight)` (dicts with a
  "sample_weight" key). Keras refuses class_weight together with
  sample_weight; here they multiply.
  """
  spec = dataset.element_spec
  if isinstance(spec, dict):
    y_spec = spec.get("y")
    ok = "x" in spec and "y" in spec
  else:
    y_spec = spec[1] if isinstance(spec, tuple) and len(spec) in (2, 3) else None
    ok = y_spec is not None
  if not ok or not isinstance(y_spec, tf.TensorSpec):
    raise BadInputError(
      "config.class_weight needs batches (x, y), (x, y, sample_weight) or dicts with 'x' and "
      f"'y', with one label tensor y; the training dataset yields {describe_spec(spec)}"
    )
  size = max(class_weight) + 1
  table = tf.constant([class_weight.get(c, 1.0) for c in range(size)], tf.float32)

  def weights(y):
    if y.shape.rank is not None and y.shape.rank >= 2 and y.shape[-1] != 1:
      classes = tf.argmax(y, axis=-1, output_type=tf.int32)
    else:
      if y.shape.rank is not None and y.shape.rank >= 2:
        y = tf.squeeze(y, axis=-1)
      classes = tf.cast(tf.round(tf.cast(y, tf.float32)), tf.int32)
    known = (classes >= 0) & (classes < size)
    return tf.where(known, tf.gather(table, tf.clip_by_value(classes, 0, size - 1)), 1.0)

  def times(sample_weight, w):
    if sample_weight is None:
      return w
    w = tf.cast(w, sample_weight.dtype)
    # Per-row weights against a [batch, 1] or per-timestep sample weight.
    extra = sample_weight.shape.rank - 1 if sample_weight.shape.rank else 0
    return sample_weight * tf.reshape(w, [-1] + [1] * extra)

  def add(*batch):
    if isinstance(batch[0], dict) and len(batch) == 1:
      batch = dict(batch[0])
      batch["sample_weight"] = times(batch.get("sample_weight"), weights(batch["y"]))
      return batch
    x, y, sample_weight = (*batch, None) if len(batch) == 2 else batch
    return x, y, times(sample_weight, weights(y))

  return dataset.map(add)


def describe_spec(spec) -> str:
  """A short, stable text of an element spec: "(float32[64, 2], int32[64])"."""
  parts = tf.nest.map_structure(lambda s: f"{s.dtype.name}{s.shape.as_list()}", spec)
  return str(parts).replace("'", "")


def check_element_spec(spec) -> None:
  for s in tf.nest.flatten(spec):
    if not isinstance(s, tf.TensorSpec):
      raise BadInputError(
        f"the training dataset yields {type(s).__name__}; safetrain "
        "needs dense tensors (x, y) or dicts of them"
      )
    if s.shape.rank == 0:
      raise BadInputError(
        "the training dataset yields scalars; batch it with dataset.batch(config.train.batch_size)"
      )


def batch_rows(spec) -> int | None:
  """The static batch size of an element spec, or None when it is unknown."""
  dims = {s.shape[0] for s in tf.nest.flatten(spec) if s.shape.rank}
  if len(dims) == 1:
    (d,) = dims
    return d
  return None


def hash64(text: str) -> int:
  """A stable non-negative int64 hash of a text (to keep in a variable)."""
  return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)


def checksum(batch) -> str:
  """A hash of a batch's values, to tell whether the data changed."""
  h = hashlib.sha1()
  for t in tf.nest.flatten(batch):
    a = np.asarray(t.numpy() if hasattr(t, "numpy") else t)
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
  return h.hexdigest()[:16]


_PY_ERROR = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.*)$")
_GET_NEXT = ("IteratorGetNext", "MultiDeviceIteratorGetNextFromShard", "IteratorGetNextAsOptional")


def _pipeline_error(e: Exception) -> str:
  """One line for an error raised while reading the data: the Python
  exception of a generator or py_function when there is one."""
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  for ln in reversed(lines):
    m = _PY_ERROR.match(ln)
    if m:
      return f"{m.group(1)}: {m.group(2)[:300]}"
  text = " ".join(ln for ln in lines if not ln.startswith(("[[", "Detected at", "<stack")))
  return f"{type(e).__name__}: {text[:300]}"


def pipeline_failure(e: Exception) -> str | None:
  """The cause, in one line, when `e` (raised by the compiled loop) comes
  from reading the training data; None when it comes from anything else."""
  if isinstance(e, tf.errors.OpError) and any(op in str(e) for op in _GET_NEXT):
    return _pipeline_error(e)
  return None


class TrainData:
  """The training dataset, as the compiled loop consumes it.

  Args:
    build: the trainer's `build_train_dataset` hook; called once here, and
      again whenever the iterator is re-created by position.
    repeat: repeat the dataset when it ends (`train.repeat_data`).
    strategy: the distribution strategy whose replicas share the batches.
    class_weight: {class: weight} multiplied into each batch's sample weight
      (`config.class_weight`, see `class_weighted`), or None.
  """

  def __init__(
    self,
    build: Callable[[], tf.data.Dataset],
    *,
    repeat: bool,
    strategy: tf.distribute.Strategy,
    class_weight: dict[int, float] | None = None,
  ):
    self._build = build
    self.class_weight = class_weight or None
    self.repeat = repeat
    self.strategy = strategy
    dataset, self.first_batch, self.stateful = self._prepare()
    self.element_spec = dataset.element_spec
    self.leaf_names = guard.leaf_names(self.element_spec)
    self.fingerprint = checksum(self.first_batch)
    self.spec_text = describe_spec(self.element_spec)
    self.batch_rows = batch_rows(self.element_spec)
    self._first_dataset = dataset

  def _prepare(self):
    """Builds, checks and repeats the dataset; reads its first batch.

    Returns (dataset, first batch, why its iterator cannot be saved or None).
    Re-creating the iterator does exactly the same, so that a shuffle seeded
    per iterator yields the same order as in the first build.
    """
    dataset = self._build()
    if not isinstance(dataset, tf.data.Dataset):
      raise BadInputError(
        f"build_train_dataset() returned {type(dataset).__name__}, not a tf.data.Dataset"
      )
    check_element_spec(dataset.element_spec)
    if self.class_weight:
      dataset = class_weighted(dataset, self.class_weight)
    if self.repeat:
      dataset = dataset.repeat()
    first = iter(dataset.take(1))
    stateful = compat.iterator_state_error(first)
    try:
      batch = next(first, None)
    except tf.errors.OpError as e:
      raise BadInputError(
        f"the training dataset fails on its first batch ({_pipeline_error(e)})"
      ) from None
    if batch is None:
      raise BadInputError("build_train_dataset() returned an empty dataset")
    return dataset, batch, stateful

  def iterator(self, position: int = 0, *, checkpointed: bool = False):
    """An iterator over the (distributed) batches, `position` batches in.

    The first call uses the dataset built in the constructor; later ones build
    it afresh and read it exactly as the first time, so a seeded pipeline
    yields the same batches, then skip the consumed ones: with
    `Dataset.skip`, or, for an iterator that will be checkpointed, by reading
    them (a `skip` in its pipeline would not match a fresh pipeline on the
    next resume).
    """
    if self._first_dataset is not None:
      dataset, self._first_dataset = self._first_dataset, None
    else:
      dataset, _, _ = self._prepare()
    if position and not checkpointed:
      dataset = dataset.skip(position)
    # Under the default strategy this is the dataset itself.
    iterator = iter(self.strategy.experimental_distribute_dataset(dataset))
    if position and checkpointed:
      for _ in range(position):
        next(iterator)
    return iterator

  def checkpointable(self, iterator) -> bool:
    """Whether tf.train.Checkpoint can save `iterator` (a plain iterator of a
    pipeline without state outside the graph)."""
    return self.stateful is None and isinstance(iterator, tf.__internal__.tracking.Trackable)


def log_position_based(reason: str) -> None:
  """Says once what a resume of a position-based pipeline reproduces."""
  logging.warning(
    "The training data iterator cannot be checkpointed (%s): resume and "
    "recovery.data=replay re-create it from build_train_dataset() and skip the "
    "batches already consumed. The batches come back in the same order when the "
    "pipeline's order is deterministic (a seeded shuffle, a generator yielding the "
    "same sequence); random augmentation draws and other state outside the graph "
    "are drawn anew, so a resumed run is not bit-identical to an uninterrupted one.",
    reason,
  )
