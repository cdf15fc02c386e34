"""The repair of a checkpoint directory on start: an interrupted save, or damage.

A save is committed when CheckpointManager rewrites the `checkpoint` state file
(atomically, by rename) after the data and index files are written. A process
killed at any moment therefore leaves one of: a `ckpt-N_temp/` directory (killed
while writing), complete or partial `ckpt-N.*` files the state file does not
list yet, newer than every listed one (killed before the commit), or a listed
checkpoint whose files are already deleted (killed while CheckpointManager
swept old ones). On start, `Repair.restore_newest` cleans up exactly these traces and
restores the newest checkpoint that reads back whole. Anything else that does
not read back (bytes changed, a file cut short or missing, a state file lost
or damaged) is not an interrupted save: it is moved to `checkpoints/corrupt/`,
never deleted, and the run falls back to the previous checkpoint with a warning
naming the file.

Nothing here builds a model: how a checkpoint is restored is the caller's
(`try_restore`), what is on disk comes from checkpoint_files.scan.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable

from absl import logging

from safetrain.checkpoint.files import (
  CORRUPT_DIR,
  STATE_FILE,
  Scan,
  index_readable,
  path_of,
  remove,
  scan,
)
from safetrain.core import compat
from safetrain.core.errors import WorkdirError
from safetrain.storage import files as storage


class Notes:
  """What the repair found and did, in order.

  Every note is logged; a warning (damage, a fallback, a rollback state that
  cannot be used) is also printed to stderr, where the user of the command
  sees it.
  """

  def __init__(self):
    self.messages: list[str] = []

  def add(self, message: str, warn: bool = False) -> None:
    """Writes down `message`; `warn` when the user must see it."""
    self.messages.append(message)
    if warn:
      logging.warning("%s", message)
      print(f"safetrain: warning: {message}", file=sys.stderr)
    else:
      logging.info("%s", message)


def newer_than_listed(found: Scan) -> list[int]:
  """Steps with files on disk that are newer than every listed checkpoint,
  newest first: the remains of the last save, if it was killed before its
  commit. With no state file, every checkpoint on disk."""
  newest_listed = max(found.listed, default=-1)
  return sorted((s for s in found.unlisted if s > newest_listed), reverse=True)


def restore_order(found: Scan, first: int | None = None) -> list[int]:
  """The steps to try restoring, in order: the newest save first (files newer
  than every listed checkpoint), then the listed ones, latest first; `first`
  (the checkpoint a committed rollback restored) before all of them."""
  newer = newer_than_listed(found)
  order = newer + [s for s in reversed(found.listed) if s not in newer]
  if first is not None and first in order:
    order.remove(first)
    order.insert(0, first)
  return order


def is_interrupted_save(directory: str, step: int, found: Scan) -> bool:
  """Whether the unreadable `ckpt-STEP` is provably what a save killed before
  its commit leaves: unlisted, newer than every committed checkpoint, and
  without a whole index (TensorFlow writes it last). With no state file, only
  a lone `ckpt-0`: the first save of a run, which is committed by creating
  the state file. Anything else unreadable is damage."""
  if index_readable(path_of(directory, step)):
    return False  # written whole: bytes changed since, which no kill does
  if found.has_state:
    return step not in found.listed and step > max(found.listed, default=-1)
  if found.state_damaged:
    return False  # a state file was written, so a save was committed
  return step == 0 and list(found.files) == [0]


class Repair:
  """Changes to a checkpoint directory on start, each one noted.

  Args:
    directory: WORKDIR/checkpoints.
    write: False on a worker that is not the chief: it decides and notes,
      but never removes, moves or rewrites a file.
    notes: where what was found and done is written down.
  """

  def __init__(self, directory: str, *, write: bool, notes: Notes):
    self.directory = directory
    self.write = write
    self.notes = notes

  # ------------------------------------------------------------ the walk

  def restore_newest(
    self,
    found: Scan,
    *,
    try_restore: Callable[[str], str | None],
    max_to_keep: int,
    rollback_base: int | None = None,
  ) -> int | None:
    """Restores the newest checkpoint that reads back whole; returns its step.

    Tries the checkpoints in `restore_order`. An unusable one (`try_restore`
    says why) that a kill left is removed; damage is moved to corrupt/ with a
    warning, and the next older one is tried. Listed checkpoints with a file
    missing are finished off (a killed max_to_keep sweep) or set aside, and
    the state file is rewritten to list what is left.

    Args:
      found: the directory as scanned, after the leftovers were removed.
      try_restore: restores a path; returns None, or why it is unusable.
      max_to_keep: the CheckpointManager setting that swept old checkpoints.
      rollback_base: the checkpoint a committed rollback restored, if one is
        pending: tried first; a newer save is then not the latest.

    Returns:
      The restored step, or None when the directory holds no checkpoint.

    Raises:
      WorkdirError: none of the committed checkpoints reads back.
    """
    newer = newer_than_listed(found)
    restored = None
    set_aside, corrupt, tried = [], [], []
    for step in restore_order(found, rollback_base):
      tried.append(step)
      set_aside.append(step)
      if step not in found.files:
        self._listed_but_gone(step)
        continue
      problem = try_restore(path_of(self.directory, step))
      if problem is None:
        set_aside.pop()
        restored = step
        break
      if self._discard(step, found, problem, f" ({problem})", fallback=True):
        corrupt.append(step)
    if rollback_base is not None and restored is not None:
      # The rollback's checkpoint came first: files of a newer save are the
      # remains of one killed before its commit (a whole one would have
      # superseded the rollback state), or damage.
      for step in [s for s in newer if s not in tried]:
        set_aside.append(step)
        self._discard(step, found, "newer than a committed rollback", "", fallback=False)
    # Older listed checkpoints with a file missing cannot be rollback targets.
    # CheckpointManager lists a new save before it deletes the oldest ones
    # (index first, then data), so the oldest beyond max_to_keep may be half
    # deleted by a kill: finish that. Any other is damage: set aside.
    listed = list(found.listed)
    doomed = set(listed[: max(0, len(listed) - max_to_keep)])
    for step in found.incomplete:
      if step in set_aside:
        continue
      set_aside.append(step)
      path = path_of(self.directory, step)
      if step not in found.files:
        self._listed_but_gone(step)
      elif step in doomed:
        self.notes.add(f"{path} was being deleted (max_to_keep) when the run was killed: removed")
        self._remove_files(step, found)
      else:
        self.move_to_corrupt(step, found, "a file is missing", fallback=False)
    if self.write and (set_aside or found.unlisted or not found.has_state):
      keep = [s for s in found.listed if s not in set_aside]
      keep += [s for s in found.unlisted if s not in set_aside and s not in keep]
      self.write_state(sorted(keep), found, latest=restored)
    if restored is None and corrupt:
      raise WorkdirError(
        f"no readable checkpoint in {self.directory}: every committed one is damaged "
        f"(moved to {os.path.join(self.directory, CORRUPT_DIR)}). Nothing was deleted; "
        "use a new --workdir to start over."
      )
    return restored

  def _listed_but_gone(self, step: int) -> None:
    path = path_of(self.directory, step)
    self.notes.add(f"{path} is listed but its files are gone (an interrupted clean-up)")

  def _discard(self, step: int, found: Scan, problem: str, detail: str, *, fallback: bool) -> bool:
    """Removes an unusable `ckpt-STEP` that a kill provably left, or moves it
    to corrupt/ as damage; returns whether it was damage."""
    if is_interrupted_save(self.directory, step, found):
      path = path_of(self.directory, step)
      self.notes.add(f"{path} was never committed (killed while saving): removed{detail}")
      self._remove_files(step, found)
      return False
    self.move_to_corrupt(step, found, problem, fallback=fallback)
    return True

  def _remove_files(self, step: int, found: Scan) -> None:
    if self.write:
      for name in found.files[step]:
        remove(os.path.join(self.directory, name))

  # --------------------------------------------------------- the changes

  def remove_leftovers(self, found: Scan) -> None:
    """Removes the temporary files and directories of an interrupted save."""
    for name in found.leftovers:
      full = os.path.join(self.directory, name)
      self.notes.add(f"removed {full}, left by a save that was interrupted")
      remove(full)

  def set_aside_state_file(self, problem: str = "does not parse") -> None:
    """A state file that does not parse (or names a checkpoint that is not
    there: `problem`) is rebuilt from the files on disk. An empty one (what
    a power loss leaves) holds nothing; any other is kept as evidence."""
    state = os.path.join(self.directory, STATE_FILE)
    if storage.size(state) == 0:
      remove(state)
      self.notes.add(f"{state} is empty (a power loss?): rebuilt from the checkpoint files", True)
      return
    target = os.path.join(self.corrupt_dir(), f"{STATE_FILE}-{uuid.uuid4().hex[:8]}")
    storage.move(state, target)
    self.notes.add(
      f"{state} {problem}: moved to {target}; rebuilt from the checkpoint files", warn=True
    )

  def corrupt_dir(self) -> str:
    """corrupt/, created if missing: where damage is kept."""
    dest = os.path.join(self.directory, CORRUPT_DIR)
    if storage.exists(dest) and (storage.islink(dest) or not storage.isdir(dest)):
      # Not ours as it should be (a file, a link): set aside, never deleted,
      # then kept inside the new corrupt/ as evidence like the rest.
      aside = f"{dest}.{uuid.uuid4().hex[:8]}"
      storage.move(dest, aside)  # a link is moved itself, never followed
      storage.makedirs(dest)
      storage.move(aside, os.path.join(dest, f"{CORRUPT_DIR}-entry-{aside[-8:]}"))
      self.notes.add(
        f"{dest} was not a directory: moved into {dest}/ as {CORRUPT_DIR}-entry-{aside[-8:]}",
        warn=True,
      )
      return dest
    storage.makedirs(dest)
    return dest

  def move_to_corrupt(self, step: int, found: Scan, problem: str, fallback: bool = True) -> None:
    """Moves the files of `ckpt-STEP` to corrupt/ (as ckpt-STEP.*, or
    ckpt-STEP_K.* when an earlier ckpt-STEP is there already), with a
    warning naming the file and the problem."""
    path = path_of(self.directory, step)
    where = "left in place (not the chief)"
    if self.write:
      dest_dir = self.corrupt_dir()
      prefix = os.path.basename(path)
      k = 1
      while any(n.startswith(prefix + ".") for n in storage.listdir(dest_dir)):
        k += 1
        prefix = f"{os.path.basename(path)}_{k}"
      for name in found.files[step]:
        src = os.path.join(self.directory, name)
        if storage.exists(src):
          storage.move(src, os.path.join(dest_dir, prefix + name[len(name.split(".", 1)[0]) :]))
      where = f"moved to {os.path.join(dest_dir, prefix)}.*"
    message = f"checkpoint {path} is unreadable ({problem}); {where}"
    if fallback:
      message += "; falling back to the previous checkpoint"
    self.notes.add(message, warn=True)

  def set_aside(self, step: int, problem: str) -> None:
    """Moves a committed checkpoint that cannot serve to corrupt/ and unlists
    it (a rollback target that is unreadable or restores non-finite values)."""
    if not self.write:
      return
    found = scan(self.directory)
    if step in found.files:
      self.move_to_corrupt(step, found, problem, fallback=False)
    keep = [s for s in found.listed if s != step]
    latest = found.latest if found.latest in keep else (keep[-1] if keep else None)
    self.write_state(keep, found, latest=latest)

  def write_state(self, keep: list[int], found: Scan, latest: int | None) -> None:
    """Lists exactly `keep` in the state file, `latest` last (atomically),
    with the save times the state file had (or the files' times)."""
    if latest is not None and latest in keep:
      keep = [s for s in keep if s != latest] + [latest]
    if not keep:
      remove(os.path.join(self.directory, STATE_FILE))
      return
    stamps = [found.listed.get(s) or self._mtime(s, found) for s in keep]
    paths = [path_of(self.directory, s) for s in keep]
    compat.write_checkpoint_state(self.directory, paths, stamps, min(stamps) - 1)

  def _mtime(self, step: int, found: Scan) -> float:
    names = found.files.get(step, [])
    times = [storage.mtime(os.path.join(self.directory, n)) for n in names]
    return max([t for t in times if t], default=0.0)
