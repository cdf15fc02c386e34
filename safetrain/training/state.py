"""The run's own variables, checkpointed with it, and the declaration of the
run's whole state (`Declaration`: what rolls back, what is carried, what is
snapshotted, under which checkpoint key).

`RunState` rolls back with the model; `DataState` (the data position and what
the data looked like) rolls back only with `recovery.data=replay`. What the run
learns about itself and never rolls back is `recovery.RecoveryState`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf
from absl import logging

from safetrain.core import config as config_lib
from safetrain.training import data as data_lib


def _int_var(value: int, name: str) -> tf.Variable:
  return tf.Variable(value, dtype=tf.int64, trainable=False, name=name)


class RunState(tf.Module):
  """The step counter and the guard's open divergence; rolls back.

  Args:
    precision: the policy the run trains under. Kept as an index into
      config.POLICIES (strings cannot be mirrored over replicas): a resume
      under another policy starts the loss scale afresh.
  """

  def __init__(self, precision: str):
    super().__init__(name="run_state")
    self.step = _int_var(0, "step")
    self.consecutive_bad = _int_var(0, "consecutive_bad")
    self.precision = _int_var(config_lib.POLICIES.index(precision), "precision")


class DataState(tf.Module):
  """Batches consumed, and hashes of what the data looked like, compared on
  resume with the dataset the resumed run builds."""

  def __init__(self, data: data_lib.TrainData):
    super().__init__(name="data_state")
    self.position = _int_var(0, "position")
    self.spec = _int_var(data_lib.hash64(data.spec_text), "spec")
    self.rows = _int_var(data.batch_rows or 0, "rows")
    self.fingerprint = _int_var(data_lib.hash64(data.fingerprint), "fingerprint")

  def describe(self, data: data_lib.TrainData) -> None:
    """Records `data` as the dataset of the checkpoints to come."""
    self.spec.assign(data_lib.hash64(data.spec_text))
    self.rows.assign(data.batch_rows or 0)
    self.fingerprint.assign(data_lib.hash64(data.fingerprint))

  def resume(self, data: data_lib.TrainData, *, checkpointed: bool, iterator_restored: bool):
    """Checks a restored checkpoint's data against this run's dataset.

    A checkpointed iterator that does not fit this run's pipeline (its
    definition or element spec changed: another train.batch_size, a new map)
    is re-created from build_train_dataset() at the same number of examples
    in. A dataset whose first batch changed (the data was fixed) is said once
    in the log.

    Args:
      data: this run's training data.
      checkpointed: whether its iterator is part of the checkpoint.
      iterator_restored: whether the restore could restore that iterator.

    Returns:
      The re-created iterator, or None when the restored one serves (or the
      iterator is not checkpointed, and found by position by the caller).
    """
    changed = int(self.spec.numpy()) != data_lib.hash64(data.spec_text)
    iterator = None
    if checkpointed and (changed or not iterator_restored):
      saved_rows, position = int(self.rows.numpy()), int(self.position.numpy())
      if saved_rows and data.batch_rows:
        position = position * saved_rows // data.batch_rows
      what = (
        f"The data changed shape since the checkpoint (batches of {saved_rows or '?'} rows "
        f"then, {data.spec_text} now)"
        if changed
        else "The input pipeline's definition changed since the checkpoint"
      )
      logging.warning(
        "%s: the data iterator is re-created from build_train_dataset() at batch %d (the "
        "same number of examples in) instead of restored, so the batch order from here "
        "differs from an uninterrupted run.",
        what,
        position,
      )
      self.position.assign(position)
      iterator = data.iterator(position, checkpointed=True)
    if int(self.fingerprint.numpy()) != data_lib.hash64(data.fingerprint):
      logging.warning(
        "The first training batch differs from the one the checkpointed run read: the "
        "data (or an unseeded shuffle) changed. %s",
        "The rest of the current epoch still comes from the checkpointed iterator's "
        "buffers (the old data); the new data is read from the next pass on."
        if checkpointed and iterator is None
        else "The iterator was re-created from the new data.",
      )
    self.describe(data)
    return iterator


def variable_key(*path: str) -> str:
  """The checkpoint key of a variable reached by `path` from the root
  (`variable_key("data", "position")`), as tf.train.Checkpoint writes it."""
  return "/".join(path) + "/.ATTRIBUTES/VARIABLE_VALUE"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One piece of the run's state, and what happens to it.

  Attributes:
    key: its name in the checkpoint (`tf.train.Checkpoint(key=obj)`).
    obj: the trackable object (a module, a Keras object, a list of variables).
    rolls_back: a rollback restores it (else it is carried across rollbacks,
      persisted by the rollback itself).
    snapshot: what the in-memory snapshot ring copies of it (None: nothing;
      the ring copies variables, so an optimizer is snapshotted by its list).
    checkpointed: saved in the run's checkpoints.
  """

  key: str
  obj: Any
  rolls_back: bool
  snapshot: Any = None
  checkpointed: bool = True


class Declaration:
  """The run's state, declared once (`Trainer.build` makes it): the rollback
  list, the carried list, the snapshot list and checkpoint keys are derived."""

  def __init__(self, entries: list[Entry]):
    keys = [e.key for e in entries]
    if len(keys) != len(set(keys)):
      raise ValueError(f"a state key is declared twice: {keys}")
    self.entries = list(entries)

  def __getitem__(self, key: str):
    """The object declared under `key` ("run", "spike", "data", ...)."""
    for e in self.entries:
      if e.key == key:
        return e.obj
    raise KeyError(f"no run state is declared as {key!r}: {[e.key for e in self.entries]}")

  def rolled_back(self) -> dict:
    """{key: object} a rollback restores."""
    return {e.key: e.obj for e in self.entries if e.checkpointed and e.rolls_back}

  def carried(self) -> dict:
    """{key: object} checkpointed but kept across rollbacks."""
    return {e.key: e.obj for e in self.entries if e.checkpointed and not e.rolls_back}

  def snapshotted(self) -> list:
    """What the snapshot ring copies, in declaration order."""
    return [e.snapshot for e in self.entries if e.snapshot is not None]

  def key_of(self, variable) -> str:
    """The checkpoint key of a variable that is an attribute of an entry."""
    for e in self.entries:
      for name, value in vars(e.obj).items() if hasattr(e.obj, "__dict__") else ():
        if value is variable:
          return variable_key(e.key, name)
    raise KeyError(f"{getattr(variable, 'name', variable)} is not an attribute of the run's state")
