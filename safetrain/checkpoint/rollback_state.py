"""What a rollback learned, made durable without a model save: rollback.json.

A rollback saves no model. What the run learned by rolling back (the lowered
learning rate, the spent budget, the data position under recovery.data=skip:
the store's `carry` objects, which a rollback does not restore) goes to a
small side checkpoint `rollback-K`, committed by atomically replacing
`rollback.json`, which names the checkpoint it applies to. Checkpoints newer
than the rollback target belong to the timeline the run abandoned: they are
retired after that commit. On start, a `rollback.json` that no later full save
superseded is applied on top of its checkpoint; the next full save makes it
obsolete. A kill at any moment leaves either the state before a rollback or
the one after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid

import tensorflow as tf

from safetrain.checkpoint.files import (
  ROLLBACK_FILE,
  Scan,
  atomic_write,
  describe,
  fsync_dir,
  is_side_file,
  load_variable,
  path_of,
  raise_io_error,
  remove,
  scan,
  side_path,
  step_of,
  verify,
)
from safetrain.checkpoint.repair import Repair
from safetrain.storage import files as storage


@dataclasses.dataclass
class Pointer:
  """What `rollback.json` says: the side state `rollback-STATE` applies on
  top of the checkpoint `base`; checkpoints `abandoned` are retired;
  `generation` is the value the generation key had after the rollback."""

  base: int
  state: int
  generation: int
  abandoned: list[int]


def read_pointer(directory: str) -> Pointer | None:
  """rollback.json in `directory` as written, or None (missing or unparsable)."""
  try:
    info = json.loads(storage.read_text(os.path.join(directory, ROLLBACK_FILE)))
    return Pointer(
      base=int(info["base"]),
      state=int(info["state"]),
      generation=int(info["generation"]),
      abandoned=[int(s) for s in info["abandoned"]],
    )
  except (OSError, ValueError, KeyError, TypeError):
    return None


class RollbackState:
  """Records, validates, applies and retires the side state of rollbacks.

  Args:
    repair: the directory's repair (its directory, whether this process
      writes it, and the notes).
    generation_key: the checkpoint key of an integer that grows with every
      rollback; a checkpoint holding at least a rollback's value was saved
      after that rollback, and supersedes its side state.
  """

  def __init__(self, repair: Repair, *, generation_key: str | None):
    self.repair = repair
    self.directory = repair.directory
    self.write = repair.write
    self.generation_key = generation_key

  def record(self, path: str, carry: dict, generation: int, scratch: str) -> None:
    """Writes `carry` to a new side checkpoint, commits it by replacing
    rollback.json, then retires the checkpoints newer than `path`.

    Args:
      path: the checkpoint just restored.
      carry: name -> trackable, what the rollback did not restore.
      generation: the generation key's value after this rollback.
      scratch: where a worker that is not the chief writes its share of the
        collective save (removed after).

    Raises:
      WorkdirError: the side state could not be written (nothing committed
        was touched).
    """
    step = step_of(path)
    found = scan(self.directory)
    pointer = read_pointer(self.directory)
    k = max([*found.side, pointer.state if pointer else 0], default=0) + 1
    where = self.directory if self.write else scratch
    prefix = side_path(where, k)
    try:
      storage.makedirs(where)
      tf.train.Checkpoint(**carry).write(prefix)
    except (tf.errors.OpError, OSError) as e:
      if self.write:
        remove(prefix + "_temp")
        for name in storage.listdir(self.directory):
          if name.startswith(os.path.basename(prefix) + "."):
            remove(os.path.join(self.directory, name))
      raise_io_error(
        self.directory, f"cannot write the rollback state {prefix}", e, write=self.write
      )
    if not self.write:
      remove(where)
      return
    abandoned = sorted(s for s in found.listed if s > step)
    info = {"base": step, "state": k, "generation": int(generation), "abandoned": abandoned}
    pointer_file = os.path.join(self.directory, ROLLBACK_FILE)
    try:
      atomic_write(pointer_file, json.dumps(info) + "\n")
    except OSError as e:
      raise_io_error(self.directory, f"cannot write {pointer_file}", e, write=self.write)
    # Committed. What follows only tidies up, and is redone on the next start
    # if a kill cuts it short.
    self.retire(abandoned, found, restored=step, why=f"the run rolled back past it to {path}")
    self._remove_side_states(found, keep=k)

  def drop(self) -> None:
    """Removes rollback.json (first: the commit is undone before its files
    go), then the side states. Called when a full save superseded them."""
    names = storage.listdir(self.directory)
    side = [n for n in names if is_side_file(n)]
    if ROLLBACK_FILE not in names and not side:
      return
    remove(os.path.join(self.directory, ROLLBACK_FILE))
    fsync_dir(self.directory)
    for name in side:
      remove(os.path.join(self.directory, name))

  def retire(self, steps: list[int], found: Scan, *, restored: int, why: str) -> None:
    """Unlists `steps` (state file first), then deletes their files."""
    if not steps:
      return
    keep = [s for s in found.listed if s not in steps]
    self.repair.write_state(keep, found, latest=restored)
    for s in steps:
      for name in found.files.get(s, []):
        remove(os.path.join(self.directory, name))
      self.repair.notes.add(f"{path_of(self.directory, s)} retired: {why}")

  def finish_retirement(self, pointer: Pointer, found: Scan) -> bool:
    """Retires what the committed rollback abandoned and a kill left; returns
    whether there was any."""
    left = sorted(set(pointer.abandoned) & set(found.files))
    self.retire(
      left,
      found,
      restored=pointer.base,
      why="a rollback went past it (finishing what a kill interrupted)",
    )
    return bool(left)

  def pending(self, found: Scan) -> Pointer | None:
    """The committed rollback whose side state still applies, or None.

    A rollback.json that does not parse, or whose side state is gone, is set
    aside; one that a later full save superseded is removed, with side states
    that no rollback.json names (a rollback killed before its commit).
    """
    pointer_file = os.path.join(self.directory, ROLLBACK_FILE)
    pointer = read_pointer(self.directory) if found.has_rollback else None
    if found.has_rollback and pointer is None:
      self.set_aside(found, f"{ROLLBACK_FILE} does not parse")
      return None
    if pointer is None:
      if found.side and self.write:  # a side state whose commit never happened
        self._remove_side_states(found)
        self.repair.notes.add(
          f"removed rollback state files no {ROLLBACK_FILE} names (an interrupted rollback)"
        )
      return None
    superseded = self._superseding_save(pointer, found)
    if superseded is not None:
      if self.write:
        self.drop()
      self.repair.notes.add(
        f"{pointer_file} is obsolete: ckpt-{superseded} was saved after that rollback"
      )
      return None
    if pointer.state not in found.side:
      self.set_aside(found, f"its state files rollback-{pointer.state}.* are gone")
      return None
    if self.write:  # side states of earlier rollbacks, left by a kill
      self._remove_side_states(found, keep=pointer.state)
    return pointer

  def _superseding_save(self, pointer: Pointer, found: Scan) -> int | None:
    """The newest checkpoint on disk saved after the rollback (its generation
    key holds at least the rollback's), or None."""
    if self.generation_key is None:
      return None
    for step in sorted(found.files, reverse=True):
      try:
        value = int(load_variable(path_of(self.directory, step), self.generation_key))
      except Exception:  # noqa: BLE001 - an unreadable one is judged later
        continue
      if value >= pointer.generation and step not in pointer.abandoned:
        return step
    return None

  def _remove_side_states(self, found: Scan, keep: int | None = None) -> None:
    for k, names in found.side.items():
      if k != keep:
        for name in names:
          remove(os.path.join(self.directory, name))

  def apply(self, pointer: Pointer, carry: dict, quiet: bool = False) -> bool:
    """Restores `carry` from the side state `pointer` names.

    When the input pipeline changed since the rollback, everything but the
    data iterator applies (the trainer finds the data again by position). A
    damaged side state is set aside (unless `quiet`: a worker that is not the
    chief) and the run resumes without it.

    Returns:
      True when the data iterator had to be left out.
    """
    prefix = side_path(self.directory, pointer.state)
    left_out = False
    try:
      tf.train.Checkpoint(**carry).read(prefix).assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001 - told apart below
      rest = {k: v for k, v in carry.items() if k != "iterator"}
      try:
        verify(prefix)
        # Matched by objects, not by the error's text: without the iterator
        # (saved without one, or for another pipeline) the rest must match.
        if len(rest) == len(carry):
          raise e
        tf.train.Checkpoint(**rest).read(prefix).expect_partial()
        left_out = True
      except Exception as damage:  # noqa: BLE001 - damage: resume without it
        if not quiet:
          self.set_aside(scan(self.directory), describe(damage))
        return False
    if not quiet:
      self.repair.notes.add(
        f"applied the state of the rollback to ckpt-{pointer.base} ({prefix}): the run "
        "resumes with what it learned then (learning-rate scale, budget, data position)"
      )
    return left_out

  def set_aside(self, found: Scan, problem: str) -> None:
    """Moves rollback.json and the side states to corrupt/, with a warning."""
    message = f"the rollback state in {self.directory}/{ROLLBACK_FILE} cannot be used ({problem})"
    if self.write:
      dest = self.repair.corrupt_dir()
      tag = uuid.uuid4().hex[:8]
      names = [n for ns in found.side.values() for n in ns]
      if found.has_rollback:
        names.append(ROLLBACK_FILE)
      for name in names:
        src = os.path.join(self.directory, name)
        if storage.exists(src):
          storage.move(src, os.path.join(dest, f"{tag}-{name}"))
      message += f"; moved to {dest}/{tag}-*"
    self.repair.notes.add(message + "; resuming without it", warn=True)
