"""Resuming a run: the newest healthy checkpoint (the chief's choice on every
worker), and the precision policy the run goes on under.

The controller calls these once, at the start of `fit()`; a rollback agrees
on its target with `agreed_checkpoint` too.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
from absl import logging

from safetrain.checkpoint import store as checkpointing
from safetrain.core import config as config_lib
from safetrain.core import distribute
from safetrain.step.loss_scale import DynamicLossScale
from safetrain.training import state


def restore_latest(
  checkpoints: checkpointing.CheckpointStore,
  *,
  healthy: Callable[[], bool],
  agree: Callable[[str | None], str | None],
  num_workers: int,
  is_chief: bool,
) -> str | None:
  """Restores the newest healthy checkpoint; returns its path or None.

  With several workers the chief picks it (repairing the directory if need
  be) and the others restore the same one from the chief's directory.
  """
  if num_workers == 1:
    return checkpoints.restore_latest(healthy=healthy)
  path = checkpoints.restore_latest(healthy=healthy) if is_chief else None
  path = agree(path)
  if path is not None and not is_chief:
    checkpoints.restore_path(path)
  return path


def agreed_checkpoint(
  strategy: tf.distribute.Strategy,
  directory: str,
  path: str | None,
  *,
  num_workers: int,
  is_chief: bool,
) -> str | None:
  """The chief's choice of checkpoint `path`, on every worker (a collective)."""
  if num_workers == 1:
    return path
  step = -1 if path is None else checkpointing.step_of(path)
  step = distribute.broadcast_from_chief(strategy, step, is_chief)
  if is_chief:
    return path
  return None if step < 0 else checkpointing.path_of(directory, step)


def reposition(
  data: state.DataState,
  train_data,
  checkpoints: checkpointing.CheckpointStore,
  *,
  checkpointed: bool,
  current,
):
  """The training iterator after a restore: the checkpointed one, or one
  re-created at the restored data position (`data.resume` says which)."""
  iterator = data.resume(
    train_data, checkpointed=checkpointed, iterator_restored=checkpoints.iterator_restored
  )
  if iterator is not None:
    checkpoints.replace_objects(iterator=iterator)
    return iterator
  if not checkpointed:
    return seek(data, train_data)
  return current


def seek(data: state.DataState, train_data):
  """A new iterator at `data.position`, for a pipeline not checkpointed."""
  return train_data.iterator(int(data.position.numpy()))


def warn_if_past_the_end(step: int, train_steps: int) -> None:
  if step > train_steps:
    logging.warning(
      "The workdir is at step %d, past train.steps=%d: nothing to train (a lower "
      "train.steps never undoes steps).",
      step,
      train_steps,
    )


def match_precision(run: state.RunState, loss_scale: DynamicLossScale, policy: str) -> None:
  """A checkpoint saved under another precision policy resumes under `policy`
  with a fresh loss scale."""
  saved = config_lib.POLICIES[int(run.precision.numpy())]
  if saved != policy:
    loss_scale.reset()
    logging.warning(
      "Resuming a %s checkpoint under precision.policy=%s: the loss scale starts afresh at %g.",
      saved,
      policy,
      float(loss_scale.scale.numpy()),
    )
    run.precision.assign(config_lib.POLICIES.index(policy))
