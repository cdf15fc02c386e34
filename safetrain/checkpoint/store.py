"""Healthy checkpoints: tf.train.Checkpoint + CheckpointManager, made kill-proof.

The store only ever saves what the trainer asks it to, and the trainer only
asks when every variable is finite and no divergence is open, so every file
here is a valid rollback target. Checkpoint numbers are training steps, and a
committed checkpoint is never written again under its name: a save always
goes to a step no committed checkpoint has.

The store is the everyday face of WORKDIR/checkpoints: save, the list of
checkpoints, restore on resume and on rollback. Below it:

- checkpoint_files.py: the names on disk, `scan` and `verify`;
- repair.py: on start, what an interrupted save left (removed) versus damage
  (moved to `checkpoints/corrupt/`, never deleted);
- rollback_state.py: what a rollback learned, made durable without a model
  save (`rollback.json`, `rollback-K`);
- foreign.py: a workdir written for another model.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from safetrain.checkpoint import foreign
from safetrain.checkpoint.files import (
  CHECKPOINT_NAME,
  CORRUPT_DIR,
  ROLLBACK_FILE,
  Scan,
  describe,
  list_variables,
  load_variable,
  path_of,
  raise_io_error,
  remove,
  scan,
  step_of,
  verify,
)
from safetrain.checkpoint.repair import Notes, Repair
from safetrain.checkpoint.rollback_state import RollbackState, read_pointer
from safetrain.core.errors import RefusedWorkdirError

# Re-exported: what tests, benchmarks and the command use from this module.
__all__ = [
  "CORRUPT_DIR",
  "ROLLBACK_FILE",
  "CheckpointStore",
  "Scan",
  "path_of",
  "scan",
  "step_of",
  "verify",
]


class CheckpointStore:
  """Saves and restores the trainer's state under `directory`.

  Args:
    directory: WORKDIR/checkpoints.
    max_to_keep: how many checkpoints CheckpointManager keeps.
    objects: name -> trackable, everything a full checkpoint holds.
    write: False on non-chief workers, which save to a scratch directory
      (collective saving needs every worker to take part) and never clean up
      or move files in `directory`.
    owner: the name of the Trainer class, compared with the one the workdir's
      config.json records.
    carry: names in `objects` that a rollback does not restore (the run's
      knowledge of itself, the data position): the side state of a rollback.
    generation_key: the checkpoint key of an integer that grows with every
      rollback; a checkpoint holding at least a rollback's value was saved
      after that rollback, and supersedes its side state.
    position_key: the checkpoint key of the data position (`position_of`).
  """

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int,
    objects: dict,
    write: bool = True,
    owner: str | None = None,
    carry: tuple[str, ...] = (),
    generation_key: str | None = None,
    position_key: str | None = None,
  ):
    self.directory = directory
    self.position_key = position_key
    self.objects = objects
    self.write = write
    self.owner = owner
    self.max_to_keep = max_to_keep
    self.carry = {k: objects[k] for k in carry if k in objects}
    self.checkpoint = tf.train.Checkpoint(**objects)
    self._notes = Notes()
    self._repair = Repair(directory, write=write, notes=self._notes)
    self._rollbacks = RollbackState(self._repair, generation_key=generation_key)
    # False after a restore that had to leave the data iterator out (the input
    # pipeline changed since the save).
    self.iterator_restored = False
    self._current: int | None = None  # the step of the last save or restore
    # Built on first use: CheckpointManager's constructor fails on a damaged
    # state file, which restore_latest repairs first; and rebuilt after the
    # state file is rewritten behind its back.
    self._manager = None
    self._read_manager = None

  @property
  def repairs(self) -> list[str]:
    """What the last restore_latest (and what followed) cleaned up or set aside."""
    return self._notes.messages

  # ------------------------------------------------------------ managers

  @property
  def manager(self) -> tf.train.CheckpointManager:
    if self._manager is None:
      self._make_managers()
    return self._manager

  @property
  def read_manager(self) -> tf.train.CheckpointManager:
    if self._read_manager is None:
      self._make_managers()
    return self._read_manager

  def _scratch(self) -> str:
    return os.path.join(self.directory, ".scratch-" + str(os.getpid()))

  def _make_managers(self) -> None:
    target = self.directory if self.write else self._scratch()
    self._manager = tf.train.CheckpointManager(
      self.checkpoint, target, max_to_keep=self.max_to_keep, checkpoint_name=CHECKPOINT_NAME
    )
    self._read_manager = (
      self._manager
      if self.write
      else tf.train.CheckpointManager(
        self.checkpoint,
        self.directory,
        max_to_keep=self.max_to_keep,
        checkpoint_name=CHECKPOINT_NAME,
      )
    )

  def _forget_managers(self) -> None:
    """The state file changed behind the managers' back: rebuilt on next use."""
    self._manager = self._read_manager = None

  def replace_objects(self, **objects) -> None:
    """Swaps tracked objects (a re-created data iterator) for later saves."""
    self.objects = dict(self.objects, **objects)
    self.carry = {k: self.objects[k] for k in self.carry}
    self.checkpoint = tf.train.Checkpoint(**self.objects)
    self._make_managers()

  # --------------------------------------------------------------- saving

  def save(self, step: int) -> str:
    """Saves the full state as `ckpt-STEP` and commits it.

    Raises:
      WorkdirError: the write failed (disk full, read-only, a path too long);
        nothing committed was touched.
      RuntimeError: `ckpt-STEP` is already committed (a bug: never rewritten).
    """
    path = path_of(self.directory, step)
    if self.write and step in [step_of(p) for p in self.read_manager.checkpoints]:
      raise RuntimeError(f"refusing to overwrite the committed checkpoint {path}")
    try:
      saved = self.manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as e:
      if self.write:
        remove(path + "_temp")
      raise_io_error(self.directory, f"cannot write checkpoint {path}", e, write=self.write)
    self._current = step
    if not self.write:
      # Only the chief's files count: the scratch copy served the collective.
      remove(self.manager.directory)
      self._make_managers()
      return path
    logging.info("Saved healthy checkpoint %s", saved)
    # The full save holds everything a rollback's side state held.
    self._rollbacks.drop()
    return saved

  def record_rollback(self, path: str, generation: int) -> None:
    """Makes a rollback to the checkpoint `path` durable without a model save.

    Writes the carry objects to a new side checkpoint, commits it by replacing
    `rollback.json` atomically, then retires the checkpoints newer than
    `path` (the timeline the run rolled back from). A kill at any moment
    leaves either the state before the rollback or the one after it.

    Args:
      path: the checkpoint just restored.
      generation: the generation key's value after this rollback.
    """
    self._current = step_of(path)
    if not self.carry:
      return
    self._rollbacks.record(path, self.carry, generation, scratch=self._scratch())
    self._forget_managers()

  # ---------------------------------------------------------- reading

  def checkpoints(self) -> list[tuple[int, str]]:
    """(step, path) of every kept checkpoint, oldest save first."""
    if not self.write:
      # The chief has saved since this worker started: read its state file.
      return [(s, path_of(self.directory, s)) for s in scan(self.directory).listed]
    return [(step_of(p), p) for p in self.read_manager.checkpoints]

  def latest_path(self) -> str | None:
    """The path of the newest committed checkpoint, or None."""
    if not self.write:
      latest = scan(self.directory).latest
      return None if latest is None else path_of(self.directory, latest)
    return self.read_manager.latest_checkpoint

  def latest_step(self) -> int | None:
    """The step of the newest save (or restore) of this store."""
    if not self.write:
      # What the chief's manager would say, without racing its writes: both
      # take the same save and restore decisions.
      return self._current
    path = self.latest_path()
    return step_of(path) if path else None

  def current_step(self) -> int | None:
    """The step whose state is durable as it is in memory: the last save, the
    checkpoint restored on resume, or the one a rollback restored (whose side
    state holds the rest). The same on every worker."""
    return self._current

  def restore_model_readonly(self, objects: dict, healthy: Callable[[], bool]) -> str | None:
    """Restores `objects` from the newest committed checkpoint that reads back
    and is `healthy`, older ones after it; returns its path, or None.

    Read-only: nothing is repaired, moved or deleted, so it is safe beside a
    run that is writing the directory (evaluation of a live workdir).
    """
    for step in reversed(list(scan(self.directory).listed)):
      path = path_of(self.directory, step)
      try:
        tf.train.Checkpoint(**objects).restore(path).expect_partial()
      except Exception as e:  # noqa: BLE001 - any failure to read is damage (a data file cut short raises IndexError)
        logging.warning("cannot read %s (%s); trying an older checkpoint", path, describe(e))
        continue
      if healthy():
        return path
      logging.warning("%s holds non-finite values; trying an older checkpoint", path)
    return None

  def restore_path(self, path: str) -> None:
    """Restores the full checkpoint at `path` (a non-chief worker resuming
    from the checkpoint the chief chose), and the rollback side state the
    chief found valid for it."""
    self.checkpoint.restore(path).assert_existing_objects_matched()
    self._current = step_of(path)
    pointer = read_pointer(self.directory)
    if pointer is not None and self._rollbacks.apply(pointer, self.carry, quiet=True):
      self.iterator_restored = False

  def check_readable(self, path: str) -> str | None:
    """None when every tensor of `path` reads back; else why not."""
    try:
      verify(path)
    except Exception as e:  # noqa: BLE001 - any failure to read is damage
      return describe(e)
    return None

  def set_aside(self, path: str, problem: str) -> None:
    """Moves a committed checkpoint that cannot serve (unreadable, or
    restoring non-finite values) to corrupt/ and unlists it."""
    self._repair.set_aside(step_of(path), problem)
    if self.write:
      self._forget_managers()

  # -------------------------------------------------------------- resume

  def restore_latest(self, healthy: Callable[[], bool] | None = None) -> str | None:
    """Restores the newest checkpoint that reads back whole; returns its path.

    Tries checkpoints newest save first (or first the one a committed
    rollback restored). Traces of an interrupted save are removed; a
    checkpoint that does not read back, or (with `healthy`) restores
    non-finite values, is moved to `corrupt/` with a warning and the next
    older one is tried (see repair.py). Then the rollback side state, if one
    is pending, is applied (see rollback_state.py).

    Args:
      healthy: called after a restore; False rejects the checkpoint.

    Returns:
      The restored path, or None when the directory holds no checkpoint.

    Raises:
      WorkdirError: the checkpoints were written for a different model or
        trainer, or none of the committed ones reads back.
    """
    self._notes.messages.clear()
    found = scan(self.directory)
    if self.write:
      self._repair.remove_leftovers(found)
      if found.state_damaged:
        self._repair.set_aside_state_file(found.state_problem)
    pointer = self._rollbacks.pending(found)
    if pointer is not None and self._rollbacks.finish_retirement(pointer, found):
      found = scan(self.directory)
    self._forget_managers()
    restored = self._repair.restore_newest(
      found,
      try_restore=lambda path: self._try_restore(path, healthy),
      max_to_keep=self.max_to_keep,
      rollback_base=None if pointer is None else pointer.base,
    )
    if restored is None:
      if pointer is not None:
        self._rollbacks.set_aside(found, "no checkpoint is left for it to apply to")
      return None
    self._current = restored
    path = path_of(self.directory, restored)
    if pointer is not None:
      if pointer.base != restored:
        self._notes.add(
          f"the rollback state in {ROLLBACK_FILE} was made for ckpt-{pointer.base}, which is "
          f"damaged; applying it to {path}",
          warn=True,
        )
      if self._rollbacks.apply(pointer, self.carry):
        self.iterator_restored = False
    return path

  def _try_restore(self, path: str, healthy: Callable[[], bool] | None) -> str | None:
    """Restores `path`; returns None, or why the checkpoint is unusable.

    Raises WorkdirError when the checkpoint reads back whole but does not fit.
    """
    try:
      saved = list_variables(path)
    except Exception as e:  # noqa: BLE001 - any failure to read the index is damage
      return describe(e)
    model = self.objects.get("model")
    workdir = os.path.dirname(self.directory)
    if model is not None:
      foreign.check(path, saved, model=model, owner=self.owner, workdir=workdir, notes=self._notes)
    self.iterator_restored = "iterator" in self.objects
    try:
      self.checkpoint.restore(path).assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001 - told apart below
      # A failed restore leaves pending restorations on the Checkpoint object
      # that would read this path again later: start from a fresh one.
      self.checkpoint = tf.train.Checkpoint(**self.objects)
      self._forget_managers()
      try:
        verify(path)
      except Exception as damage:  # noqa: BLE001
        return describe(damage)
      self._restore_without_iterator(path, saved, e, workdir)
    if healthy is not None and not healthy():
      return "it restores non-finite values"
    return None

  def _restore_without_iterator(self, path: str, saved: list, error: Exception, workdir: str):
    """After a full restore of `path` failed (`error`) on a checkpoint that
    reads back whole: matched object by object, not by the error's text.

    The model, the optimizer and the run's state must all match (else the
    workdir is another experiment's: RefusedWorkdirError). The data iterator
    may not: the checkpoint was saved without one (another strategy or
    replica count, a pipeline that could not be saved) or with one of
    another pipeline's definition; then everything else is restored and the
    trainer finds the data again by its position, with a warning
    (`DataState.resume`).
    """
    rest = {k: v for k, v in self.objects.items() if k != "iterator"}
    try:
      if len(rest) == len(self.objects):
        raise error  # no iterator to leave out: the run's own objects differ
      tf.train.Checkpoint(**rest).restore(path).assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001 - any mismatch of the run's own objects
      raise RefusedWorkdirError(
        f"the checkpoint {path} does not fit this trainer"
        f"{foreign.owner_note(workdir, self.owner)}: {describe(e)}. "
        "Use a new --workdir, or the experiment that wrote this one."
      ) from e
    saved_iterator = any(key.startswith("iterator/") for key, _ in saved)
    logging.info(
      "The checkpoint %s %s: the rest is restored and the data is found again by position.",
      path,
      "holds an iterator of another input pipeline"
      if saved_iterator
      else "was saved without the data iterator (another strategy, or a pipeline that "
      "could not be saved then)",
    )
    self.iterator_restored = False

  # ----------------------------------------------------------- rollbacks

  def restore_rollback(self, path: str, objects: dict, data: dict | None = None) -> int:
    """Restores `objects` (and `data`, for replay) from `path`; returns its step.

    Objects not named (the recovery state, and the data iterator under
    recovery.data=skip) keep their current values.
    """
    ckpt = tf.train.Checkpoint(**objects, **(data or {}))
    ckpt.restore(path).expect_partial()
    self._current = step_of(path)
    return self._current

  def position_of(self, path: str) -> int:
    """The data position saved in the checkpoint at `path`."""
    return int(load_variable(path, self.position_key))


def build(
  config,
  workdir: str,
  *,
  rollback: dict,
  carried: dict,
  write: bool,
  owner: str,
  position_key: str,
  generation_key: str,
):
  """The run's CheckpointStore, WORKDIR/checkpoints (`checkpoint.max_to_keep`).

  `rollback` is what a rollback restores; `carried` what it keeps (not
  restored), persisted by the rollback itself with no model save (see
  `CheckpointStore.record_rollback`). `position_key` and `generation_key` are
  the checkpoint keys of the data position and of the rollback count (the
  trainer's `state.Declaration` derives them).
  """
  return CheckpointStore(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=config.checkpoint.max_to_keep,
    objects={**rollback, **carried},
    write=write,
    owner=owner,
    carry=tuple(carried),
    generation_key=generation_key,
    position_key=position_key,
  )
