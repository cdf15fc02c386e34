"""Which states are kept: saved as a checkpoint, snapshotted in memory, and
so offered as rollback targets.

Only a healthy state is kept: no open run of failures, a loss not far above
its best, every variable finite. Whether every variable is finite is known
after a loop (the loop checks it in the graph) and forgotten by whatever
changes variables outside it (a rollback, an action, a callback); while it is
unknown the compiled check is run once.
"""

from __future__ import annotations

from safetrain.checkpoint.store import CheckpointStore
from safetrain.core import variables
from safetrain.recovery.health import Health
from safetrain.recovery.snapshots import SnapshotRing
from safetrain.training.feed import Feed
from safetrain.training.state import RunState


class Keeper:
  """Keeps the healthy states of a run.

  Args:
    run: the run's variables (the step; the open run of failures).
    feed: the training data (the position a snapshot is taken at).
    health: the host health checks (a loss far above its best).
    all_finite: the compiled check that every model and optimizer variable
      is finite (a `tf.function` returning a bool tensor).
    checkpoints: the checkpoint store.
    snapshots: the in-memory snapshot ring, or None.
  """

  def __init__(
    self,
    *,
    run: RunState,
    feed: Feed,
    health: Health,
    all_finite,
    checkpoints: CheckpointStore,
    snapshots: SnapshotRing | None,
  ):
    self.run = run
    self.feed = feed
    self.health = health
    self.checkpoints = checkpoints
    self.snapshots = snapshots
    self._all_finite = all_finite
    self._finite: bool | None = None

  def all_finite(self) -> bool:
    """Runs the check on the live variables (after a restore, say)."""
    self._finite = bool(self._all_finite())
    return self._finite

  def knows(self, finite: bool | None) -> None:
    """What a loop reported about its variables; None forgets it (something
    outside the loop changed them)."""
    self._finite = finite

  def healthy(self) -> bool:
    """Only these states are saved, snapshotted, rolled back to: no open
    divergence, every variable finite, a loss not far above its best."""
    if int(variables.number(self.run.consecutive_bad)) != 0:
      return False
    if self.health.far_above_best():
      return False
    if self._finite is None:
      return self.all_finite()
    return self._finite

  def save(self) -> None:
    """Saves the state if it is healthy and not durable yet.

    A state whose step was just saved, resumed from, or rolled back to is
    durable already (a rollback's side state holds what differs): a
    committed checkpoint is never written again.
    """
    if not self.healthy():
      return
    step = int(variables.number(self.run.step))
    if self.checkpoints.current_step() == step:
      return
    self.checkpoints.save(step)

  def snapshot(self) -> None:
    """Snapshots the state in memory when it is healthy."""
    if self.snapshots is None or not self.snapshots.enabled or not self.healthy():
      return
    self.snapshots.take(int(variables.number(self.run.step)), self.feed.position())
