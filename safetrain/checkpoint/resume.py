"""Resuming a run: the newest healthy checkpoint (the chief's choice on every
worker), and the precision policy the run goes on under.

The controller calls these once, at the start of `fit()`; a rollback agrees
on its target with `agreed_checkpoint` too.
"""

from __future__ import annotations

from collections.abc import Callable

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
  workers: distribute.Workers,
) -> str | None:
  """Restores the newest healthy checkpoint; returns its path or None.

  With several workers the chief picks it (repairing the directory if need
  be) and the others restore the same one from the chief's directory.
  """
  if workers.single:
    return checkpoints.restore_latest(healthy=healthy)
  path = checkpoints.restore_latest(healthy=healthy) if workers.is_chief else None
  path = agreed_checkpoint(checkpoints, path, workers)
  if path is not None and not workers.is_chief:
    checkpoints.restore_path(path)
  return path


def agreed_checkpoint(
  checkpoints: checkpointing.CheckpointStore, path: str | None, workers: distribute.Workers
) -> str | None:
  """The chief's choice of checkpoint `path`, on every worker (a collective)."""
  if workers.single:
    return path
  step = workers.from_chief(-1 if path is None else checkpointing.step_of(path))
  if workers.is_chief:
    return path
  return None if step < 0 else checkpointing.path_of(checkpoints.directory, step)


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
