"""Recovery: what happens when the guarded loop hands over a divergence.

The mechanics of recovery, once `recovery.policy` has decided on a rollback:
roll back to a healthy state with a lower learning rate (or further back when
the run keeps failing from the same state), spend and refill the rollback
budget, count bad batches (whether they are frequent is evidence for the
policy), and stop with `DivergenceError` when the budget or the learning rate
is spent. `Policy` here is the recovery settings (`config.recovery`), not the
decision. Which cause a failure had (bad batch or diverging state) is
`recovery.triage`'s verdict.

Rollback targets are the in-memory snapshots (`safetrain.snapshots`) and the
disk checkpoints, newest first; a snapshot of the same step is preferred (it
costs no read).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NoReturn

import ml_collections
import tensorflow as tf
from absl import logging

from safetrain.checkpoint import resume
from safetrain.checkpoint.store import CORRUPT_DIR, CheckpointStore, step_of
from safetrain.core import kinds, variables
from safetrain.core.distribute import Workers
from safetrain.core.errors import DivergenceError
from safetrain.diagnosis.forensics import Examiner
from safetrain.records.incidents import IncidentLog
from safetrain.recovery import rate_probe
from safetrain.recovery.keeper import Keeper
from safetrain.recovery.rate_probe import RateProbe
from safetrain.training.feed import Feed
from safetrain.training.state import RunState


class RecoveryState(tf.Module):
  """What the run has learned about itself. Never rolled back; checkpointed,
  so a resumed run keeps its lowered learning rate and spent budget."""

  def __init__(self):
    super().__init__(name="recovery_state")
    v = lambda x, name, dt=tf.int64: tf.Variable(x, dtype=dt, trainable=False, name=name)  # noqa: E731
    self.lr_scale = v(1.0, "lr_scale", tf.float32)
    self.rewarm_start = v(-1, "rewarm_start")
    self.attempts = v(0, "attempts")
    self.rollbacks_used = v(0, "rollbacks_used")
    self.rollbacks_total = v(0, "rollbacks_total")
    self.incidents_total = v(0, "incidents_total")
    self.skipped_total = v(0, "skipped_total")
    self.batches_skipped = v(0, "batches_skipped")
    self.last_restored_step = v(-1, "last_restored_step")
    self.budget_anchor_step = v(0, "budget_anchor_step")
    # Bad batches: a moving average of their share of the attempts, and totals.
    self.bad_batch_rate = v(0.0, "bad_batch_rate", tf.float32)
    self.quarantined_total = v(0, "quarantined_total")
    self.examples_dropped_total = v(0, "examples_dropped_total")

  def snapshot(self) -> dict:
    """{name: value} of every variable: what a resume must carry over."""
    return {k: x.numpy().item() for k, x in vars(self).items() if isinstance(x, tf.Variable)}


@dataclasses.dataclass(frozen=True)
class Policy:
  """`config.recovery`, typed (see safetrain.default_config())."""

  enabled: bool
  max_rollbacks: int
  lr_backoff: float
  min_lr_scale: float
  data: str
  rewarm_steps: int
  budget_reset_steps: int
  bad_batch_rate: float
  bad_batch_window: int

  @classmethod
  def from_config(cls, recovery: ml_collections.ConfigDict) -> Policy:
    return cls(**{f.name: recovery[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a rollback goes: an in-memory snapshot slot or a checkpoint path."""

  step: int
  slot: int | None = None
  path: str | None = None

  @property
  def in_memory(self) -> bool:
    return self.slot is not None

  @property
  def name(self) -> str:
    """As the incident's `checkpoint` field names it."""
    return f"memory snapshot of step {self.step}" if self.in_memory else os.path.basename(self.path)


def rollback_target(candidates: list[Target], last_restored: int) -> Target | None:
  """The target to roll back to: the newest one, or, when the run has not
  got past the state the previous rollback restored (a new incident from the
  same state), the newest one before that state (escalation).

  Args:
    candidates: the kept checkpoints and usable snapshots, oldest first; at
      equal steps the preferred one last.
    last_restored: the step the previous rollback restored, or -1.
  """
  if not candidates:
    return None
  target = candidates[-1]
  if last_restored >= 0 and target.step <= last_restored:
    older = [t for t in candidates if t.step < last_restored]
    if older:
      target = older[-1]
  return target


def candidates(checkpoints: list[tuple[int, str]], snapshots: list[tuple[int, int]]):
  """The rollback candidates: the checkpoints, and the snapshots that are
  either a checkpoint's state (the same step: restored from memory, recorded
  on the checkpoint, exactly as a disk rollback) or newer than every
  checkpoint (restored from memory, then saved). A snapshot between older
  checkpoints is left out: escalation goes to disk, so that a rollback always
  ends in a state a restart finds on disk, and a run killed at any moment
  resumes bit-identical to an uninterrupted one. At equal steps the snapshot
  comes last (preferred: no read)."""
  disk = {step for step, _ in checkpoints}
  newest = max(disk, default=-1)
  usable = [(step, k) for step, k in snapshots if step in disk or step > newest]
  merged = [Target(step, path=path) for step, path in checkpoints]
  merged += [Target(step, slot=k) for step, k in usable]
  return sorted(merged, key=lambda t: (t.step, t.in_memory))


class Recovery:
  """Carries out recovery for the trainer.

  Args:
    policy: the recovery settings.
    state: the recovery state (checkpointed, never rolled back).
    run: the run state (its step is what a rollback restores).
    feed: the training data (its position tells the batches a rollback
      skips; under `recovery.data=replay` it is restored and re-sought).
    checkpoints: the checkpoint store.
    rollback_objects: what a rollback restores (model, optimizer, loss scale...).
    keeper: the kept states (the in-memory snapshots, and the check that a
      restored state is finite).
    workers: the run's processes (the chief picks the target; every worker
      restores it).
    incidents: the incident log.
    examiner: forensics on the offending batch (the diagnosis; whether the
      batch fails again from the live state, the evidence a failure on the
      initial weights needs).
    probe: the rate probe a `not_learning` rollback chooses its scale with
      (`recovery.rate_probe`), or None: the scale is cut by lr_backoff.
  """

  def __init__(
    self,
    *,
    policy: Policy,
    state: RecoveryState,
    run: RunState,
    feed: Feed,
    checkpoints: CheckpointStore,
    rollback_objects: dict,
    keeper: Keeper,
    workers: Workers,
    incidents: IncidentLog,
    examiner: Examiner,
    probe: RateProbe | None = None,
  ):
    self.policy = policy
    self.state = state
    self.run = run
    self.feed = feed
    self.checkpoints = checkpoints
    self.rollback_objects = rollback_objects
    self.keeper = keeper
    self.workers = workers
    self.incidents = incidents
    self.examiner = examiner
    snapshots = keeper.snapshots
    self.snapshots = snapshots if snapshots is not None and snapshots.enabled else None
    self.probe = probe

  def roll_back(
    self,
    kind: str,
    *,
    cause: str = kinds.DIVERGING_STATE,
    why: str = "",
    diagnosis: str | None = None,
    probe: bool = False,
  ) -> None:
    """Rolls back a diverging state to a healthy one with a lower learning
    rate, or raises DivergenceError when the budget or the rate is spent.

    Args:
      kind: the incident kind.
      cause: recorded as the incident's `cause`.
      why: the evidence for the cause, one sentence (the incident's `why`).
      diagnosis: what was found; by default forensics on the offending batch.
      probe: the rate probe chooses the lower rate (a run that stopped
        learning, rolled back from disk), else lr_backoff's cut.
    """
    p, s = self.policy, self.state
    at_step = int(self.run.step.numpy()) + 1
    if diagnosis is None:
      diagnosis = self.examiner.diagnose(kind, at_step)
    lr_before = float(s.lr_scale.numpy())
    declared = kinds.declared().get(kind)
    if (
      at_step == 1
      and declared is not None
      and declared.before_update
      and self.examiner.reproduces()
    ):
      # No update was ever applied: the weights are the initial ones, the
      # failing value comes before any update, and the replay from them
      # fails again. A rollback would restore these same weights, and a
      # lower rate changes nothing they compute.
      self.abort(
        kind,
        at_step,
        diagnosis,
        "the failure is present from the start: the first step fails before any update, "
        "from the initial weights, so no learning rate can avoid it (no rollback was spent)",
        lr_before,
        why=why,
        cause=kinds.PRESENT_FROM_START,
      )
    lr_after = lr_before * p.lr_backoff
    reason = self._why_not(lr_after)
    if reason is not None:
      self.abort(kind, at_step, diagnosis, reason, lr_before, why=why, cause=cause)
    target, restored_position = self._restore_target(kind, at_step, diagnosis, lr_before)
    restored_step = int(self.run.step.numpy())
    if p.data == "replay":
      self.feed.seek()
    if p.rewarm_steps:
      s.rewarm_start.assign(restored_step)  # before a probe: its trials re-warm alike
    probed = {}
    if probe and self.probe is not None and not target.in_memory:
      lr_after, probed = self._probe(lr_before, target, restored_step, lr_after)
    skipped = 0
    if p.data == "skip":
      # Not restored under skip: the batches since the target, a probe's too.
      skipped = self.feed.position() - restored_position
      s.batches_skipped.assign_add(skipped)
    s.lr_scale.assign(lr_after)
    lr_after = float(s.lr_scale.numpy())  # as the run goes on with it (float32)
    s.rollbacks_used.assign_add(1)
    s.rollbacks_total.assign_add(1)
    s.last_restored_step.assign(restored_step)
    s.budget_anchor_step.assign(restored_step)
    self.incidents.add(
      step=at_step,
      kind=kind,
      action="rollback",
      restored_step=restored_step,
      lr_scale_before=lr_before,
      lr_scale_after=lr_after,
      batches_skipped=skipped,
      diagnosis=diagnosis,
      cause=cause,
      why=why,
      checkpoint=target.name,
      **probed,
    )
    # Persist the lowered learning rate, spent budget and data position at
    # once, so a kill right after this rollback resumes with them, as the
    # uninterrupted run goes on: a small side state committed atomically on
    # the checkpoint restored (never a rewrite of it); after a rollback to a
    # snapshot newer than every checkpoint, a full save of the restored state.
    if not target.in_memory:
      self.checkpoints.record_rollback(target.path, generation=int(s.rollbacks_total.numpy()))
    elif restored_step in self._disk_steps():
      path = dict(self.checkpoints.checkpoints())[restored_step]
      self.checkpoints.record_rollback(path, generation=int(s.rollbacks_total.numpy()))
    else:
      self.checkpoints.save(restored_step)

  def _probe(self, lr_before: float, target: Target, step: int, cut: float):
    """The scale the rate probe keeps from `target` (restored again after
    each trial), and the incident's `probe` field; the plain cut when there
    is nothing to try."""

    def restore() -> None:
      replay = self.policy.data == "replay"
      data = self.feed.replay_objects() if replay else None
      self.checkpoints.restore_rollback(target.path, self.rollback_objects, data=data)
      if replay:
        self.feed.seek()

    chosen, trials = self.probe.choose(lr_before, restore=restore)
    if not trials:
      return cut, {}
    line = rate_probe.describe(trials, chosen, step=step, steps=self.probe.steps)
    rate_probe.log(line)
    return chosen, {"probe": [t.record() for t in trials], "probe_text": line}

  def _disk_steps(self) -> list[int]:
    return [step for step, _ in self.checkpoints.checkpoints()]

  def note_bad_batches(self, quarantined: int, attempts: int) -> bool:
    """Counts a loop's quarantined batches; True when bad batches have become
    frequent (their moving share of the attempts over recovery.bad_batch_rate)."""
    p, s = self.policy, self.state
    if attempts <= 0:
      return False
    before = float(variables.number(s.bad_batch_rate))
    if not quarantined and not before:
      return False  # nothing to count and a rate of 0 stays 0: no eager ops
    s.quarantined_total.assign_add(quarantined)
    decay = (1.0 - 1.0 / p.bad_batch_window) ** attempts
    rate = before * decay + quarantined / attempts * (1.0 - decay)
    s.bad_batch_rate.assign(rate)
    return quarantined > 0 and rate > p.bad_batch_rate

  def frequent_bad_batches_text(self) -> str:
    p = self.policy
    rate = float(self.state.bad_batch_rate.numpy())
    return (
      f"bad batches became frequent: {100 * rate:.0f}% of the last ~{p.bad_batch_window} "
      f"batches (recovery.bad_batch_rate={p.bad_batch_rate:g}), so the state, not the data, "
      "is suspect"
    )

  def _why_not(self, lr_after: float) -> str | None:
    """Why no rollback may happen now, or None."""
    p = self.policy
    used = int(self.state.rollbacks_used.numpy())
    if not p.enabled:
      return "recovery is disabled (recovery.enabled=False)"
    if used >= p.max_rollbacks:
      return (
        f"the rollback budget is spent ({used} of recovery.max_rollbacks="
        f"{p.max_rollbacks} within {p.budget_reset_steps} steps)"
      )
    if lr_after < p.min_lr_scale * (1 - 1e-6):
      return (
        f"the learning-rate scale would fall to {lr_after:.4g}, under "
        f"recovery.min_lr_scale={p.min_lr_scale:.4g}"
      )
    return None

  def _restore_target(self, kind: str, at_step: int, diagnosis: str, lr: float):
    """Restores the rollback target; returns (the `Target`, the data
    position it was taken at).

    The chief picks a target that reads back whole (a damaged one is set
    aside first); every worker restores it, and one that restores non-finite
    values is set aside too, and the next one tried.
    """
    while True:
      # Workers agree on the chief's path (several workers have no snapshots).
      chosen = self._readable_target(kind) if self.workers.is_chief else None
      if chosen is not None and chosen.in_memory:
        slot = self.snapshots.restore(chosen.slot)
        return chosen, slot.position
      path = resume.agreed_checkpoint(
        self.checkpoints, chosen.path if chosen is not None else None, self.workers
      )
      if path is None:
        corrupt = os.path.join(self.checkpoints.directory, CORRUPT_DIR)
        reason = f"no checkpoint is left to roll back to (unusable ones were moved to {corrupt})"
        self.abort(kind, at_step, diagnosis, reason, lr)
      data = self.feed.replay_objects() if self.policy.data == "replay" else None
      self.checkpoints.restore_rollback(path, self.rollback_objects, data=data)
      if self.keeper.all_finite():
        if self.snapshots is not None:
          self.snapshots.drop_after(step_of(path))
        return Target(step_of(path), path=path), self.checkpoints.position_of(path)
      if self.workers.is_chief:
        self.checkpoints.set_aside(path, "it restores non-finite values")

  def _readable_target(self, kind: str) -> Target | None:
    """`rollback_target` among the snapshots and the checkpoints that read
    back whole.

    A run that stopped learning (`stalled`, `dead_units`, `not_learning`)
    goes to disk: the
    collapse builds up over loops, so the newest snapshots, taken after a
    check that found nothing yet, already hold half-dead states.
    """
    last_restored = int(self.state.last_restored_step.numpy())
    memory = kind not in ("stalled", "dead_units", "not_learning")
    while True:
      snaps = self.snapshots.targets() if self.snapshots is not None and memory else []
      target = rollback_target(candidates(self.checkpoints.checkpoints(), snaps), last_restored)
      if target is None or target.in_memory:
        return target
      problem = self.checkpoints.check_readable(target.path)
      if problem is None:
        return target
      self.checkpoints.set_aside(target.path, problem)

  def refill_budget(self) -> None:
    """Refills the rollback budget after `budget_reset_steps` healthy steps."""
    s = self.state
    if int(variables.number(s.rollbacks_used)) == 0:
      return
    healthy_steps = int(variables.number(self.run.step)) - int(
      variables.number(s.budget_anchor_step)
    )
    if healthy_steps >= self.policy.budget_reset_steps:
      logging.info("Rollback budget refilled after %d healthy steps.", healthy_steps)
      s.rollbacks_used.assign(0)

  def abort(
    self,
    kind: str,
    at_step: int,
    diagnosis: str,
    reason: str,
    lr: float,
    why: str = "",
    cause: str = kinds.DIVERGING_STATE,
  ) -> NoReturn:
    """Records the abort and raises DivergenceError with the diagnosis."""
    s = self.state
    last = self.checkpoints.latest_path()
    evidence = f" ({why})" if why else ""
    if cause == kinds.PRESENT_FROM_START:
      # The evidence rules the learning rate out: no advice about it.
      advice = (
        "Fix what the diagnosis names (the data's scale, the model's initialisation, or the "
        "loss) and start again."
      )
    else:
      advice = (
        "Try a lower optimizer.learning_rate, normalized inputs, or a tighter clip.global_norm."
      )
    text = (
      f"Training diverged at step {at_step} ({kind}{evidence}): {diagnosis} Over this run: "
      f"{self.incidents.tally() or kind}; {int(s.rollbacks_total.numpy())} rollbacks, "
      f"learning-rate scale now {lr:.4g}, {int(s.batches_skipped.numpy())} batches skipped. "
      f"Stopping because {reason}. The last healthy checkpoint is intact: {last}. {advice}"
    )
    self.incidents.add(
      step=at_step,
      kind=kind,
      action="abort",
      lr_scale_before=lr,
      lr_scale_after=lr,
      diagnosis=text,
      cause=cause,
      why=why,
    )
    step = int(self.run.step.numpy())
    self._put_back_last_healthy(last)
    raise DivergenceError(
      text,
      step=step,
      last_healthy_checkpoint=last,
      incidents=list(self.incidents.records),
    )

  def _put_back_last_healthy(self, path: str | None) -> None:
    """After an abort, `trainer.model` (and the optimizer and run state) hold
    the last healthy checkpoint, as the workdir does, not the failing state
    the abort found. One worker only: with several, each worker's restore
    would need the chief's agreement, and the checkpoint is on disk anyway."""
    if path is None or not self.workers.single:
      return
    try:
      self.checkpoints.restore_rollback(path, self.rollback_objects)
    except (tf.errors.OpError, OSError, ValueError) as e:
      logging.warning(
        "After the abort, the last healthy checkpoint %s could not be put back into the "
        "trainer's model: %s",
        path,
        e,
      )
