"""The training data as the run reads it: the live iterator, the data
position it stands at, and how both are put back after a restore.

One object owns the iterator, so the controller, a rollback and the rate
probe read and re-create the same one (a pipeline that is not checkpointed
is re-created by position; a checkpointed one is restored with the state).
"""

from __future__ import annotations

from safetrain.core import variables
from safetrain.training import data as data_lib
from safetrain.training import state


class Feed:
  """The run's training iterator and its data position.

  Args:
    data: the data position and hashes (`state.DataState`, checkpointed).
    source: the training data (`data.TrainData`).
    iterator: the iterator built with the source.
    checkpointed: whether the iterator is part of the checkpoint (else it is
      re-created at `data.position` after a restore).
  """

  def __init__(
    self,
    *,
    data: state.DataState,
    source: data_lib.TrainData,
    iterator,
    checkpointed: bool,
  ):
    self.data = data
    self.source = source
    self.iterator = iterator
    self.checkpointed = checkpointed

  @property
  def first_batch(self):
    return self.source.first_batch

  def position(self) -> int:
    """Batches consumed (the data position)."""
    return int(variables.number(self.data.position))

  def replay_objects(self) -> dict:
    """What a rollback under `recovery.data=replay` restores of the data: the
    position, and the iterator when it is checkpointed."""
    return dict(data=self.data, **({"iterator": self.iterator} if self.checkpointed else {}))

  def seek(self) -> None:
    """After a restore of the position: an iterator that is not checkpointed
    is re-created there (a checkpointed one was restored with it)."""
    if not self.checkpointed:
      self.iterator = self.source.iterator(self.position())

  def reposition(self, checkpoints) -> None:
    """The iterator after a resume: the checkpointed one, or one re-created
    at the restored data position (`DataState.resume` says which)."""
    iterator = self.data.resume(
      self.source, checkpointed=self.checkpointed, iterator_restored=checkpoints.iterator_restored
    )
    if iterator is not None:
      checkpoints.replace_objects(iterator=iterator)
      self.iterator = iterator
    else:
      self.seek()
