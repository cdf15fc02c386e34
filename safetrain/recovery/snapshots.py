"""In-memory snapshots of the healthy state: rollbacks that cost one loop.

A disk checkpoint every `checkpoint.every_steps` (500 by default) makes a
rollback redo up to a whole interval. After every healthy inner loop the
controller keeps the values of the state a rollback restores (model and
optimizer variables, step counters, loss scale, spike and stall statistics)
in a ring of `recovery.snapshots` slots; a rollback assigns the newest
snapshot that fits back (see `recovery`). A slot holds the tensors read from
the variables: a read is immutable (TensorFlow copies a variable's buffer
before an update writes to it while a read still holds it), so taking a
snapshot costs one read per variable, no copy, no traced function and no
variables of its own; the copy happens at the next update, on the device.
The memory cost is `slots x` the size of those variables; it is logged at
the start, and over `recovery.snapshots_max_mb` snapshots are off (the disk
checkpoints remain the only targets).

A snapshot is never durable: on resume, and when a rollback escalates past
the ring, the disk checkpoints are the targets. What a rollback to a
snapshot changes besides (learning-rate scale, budget, data position) is
committed to disk at once as the rollback side state, applied to the newest
checkpoint not newer than the snapshot.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from safetrain.core import variables as variables_lib


@dataclasses.dataclass
class Slot:
  """What one slot holds."""

  step: int  # the applied steps of the snapshotted state
  position: int  # the data position when it was taken
  taken: int  # a sequence number (newest is largest)
  values: list = dataclasses.field(default_factory=list, repr=False)  # one read per variable


def state_variables(modules: list) -> list:
  """The variables of `modules` (Keras models and optimizers, tf.Modules,
  lists of variables), each once, in a stable order."""
  out, seen = [], set()
  for m in modules:
    if isinstance(m, (list, tuple)):
      found = list(m)
    else:
      found = list(getattr(m, "variables", []))
    for v in found:
      if id(v) not in seen:
        seen.add(id(v))
        out.append(v)
  return out


class SnapshotRing:
  """A ring of in-memory snapshots of `variables`.

  Args:
    variables: what a snapshot holds (see `state_variables`).
    slots: ring size (0: off).
    max_mb: the memory cap; over it the ring is off.
  """

  def __init__(self, variables: list, *, slots: int, max_mb: float):
    self.variables = list(variables)
    self.bytes_per_slot = sum(
      int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in self.variables
    )
    self.enabled = slots > 0 and self.bytes_per_slot * slots <= max_mb * 2**20
    self.slots: list[Slot | None] = []
    self._taken = 0
    if slots > 0 and not self.enabled:
      logging.info(
        "In-memory snapshots off: %d x %.1f MB exceeds recovery.snapshots_max_mb=%g; "
        "rollbacks restore disk checkpoints.",
        slots,
        self.bytes_per_slot / 2**20,
        max_mb,
      )
    if not self.enabled:
      return
    self.slots = [None] * slots

  @property
  def memory_mb(self) -> float:
    """The memory the ring can hold (0 when off)."""
    return self.bytes_per_slot * len(self.slots) / 2**20

  def log_cost(self) -> None:
    if self.enabled:
      logging.info(
        "In-memory snapshots: %d x %.2f MB (recovery.snapshots, recovery.snapshots_max_mb).",
        len(self.slots),
        self.bytes_per_slot / 2**20,
      )

  def take(self, step: int, position: int) -> None:
    """Snapshots the current state (replacing the oldest slot, or one of the
    same step)."""
    if not self.enabled:
      return
    same = [i for i, s in enumerate(self.slots) if s is not None and s.step == step]
    free = [i for i, s in enumerate(self.slots) if s is None]
    if same:
      k = same[0]
    elif free:
      k = free[0]
    else:
      k = min(range(len(self.slots)), key=lambda i: self.slots[i].taken)
    self._taken += 1
    self.slots[k] = Slot(
      step=step, position=position, taken=self._taken, values=[_read(v) for v in self.variables]
    )

  def targets(self) -> list[tuple[int, int]]:
    """(step, slot index) of the snapshots held, oldest step first."""
    return sorted((s.step, k) for k, s in enumerate(self.slots) if s is not None)

  def restore(self, k: int) -> Slot:
    """Restores slot `k` into the live variables; drops newer snapshots."""
    slot = self.slots[k]
    for variable, value in zip(self.variables, slot.values):
      variable.assign(value)
    self.drop_after(slot.step)
    return slot

  def drop_after(self, step: int) -> None:
    """Forgets snapshots of states after `step` (a timeline rolled back from)."""
    self.slots = [s if s is not None and s.step <= step else None for s in self.slots]


def _read(v) -> tf.Tensor:
  """The variable's current value, as a tensor no later update changes."""
  if isinstance(v, (keras.Variable, tf.Variable)):
    return variables_lib.read(v)
  return tf.identity(v)


def build(recovery_config, *, num_workers: int, modules: list) -> SnapshotRing | None:
  """The ring `recovery.snapshots` asks for; None with several workers (the
  chief picks every rollback target) or recovery.data=replay (a checkpointed
  iterator cannot be snapshotted).

  Args:
    recovery_config: config.recovery.
    num_workers: the workers of the run.
    modules: what a rollback restores (see `state_variables`).
  """
  r = recovery_config
  if num_workers > 1 or r.data == "replay" or not r.snapshots:
    return None
  return SnapshotRing(state_variables(modules), slots=r.snapshots, max_mb=r.snapshots_max_mb)
