"""Healthy checkpoints: tf.train.Checkpoint + CheckpointManager, made kill-proof.

The store only ever saves what the trainer asks it to, and the trainer only
asks when every variable is finite and no divergence is open, so every file
here is a valid rollback target. Checkpoint numbers are training steps, and a
committed checkpoint is never written again under its name: a save always
goes to a step no committed checkpoint has.

A save is committed when CheckpointManager rewrites the `checkpoint` state file
(atomically, by rename) after the data and index files are written. A process
killed at any moment therefore leaves one of: a `ckpt-N_temp/` directory (killed
while writing), complete or partial `ckpt-N.*` files the state file does not
list yet, newer than every listed one (killed before the commit), or a listed
checkpoint whose files are already deleted (killed while CheckpointManager
swept old ones). On start, `restore_latest` cleans up exactly these traces and
restores the newest checkpoint that reads back whole. Anything else that does
not read back (bytes changed, a file cut short or missing, a state file lost
or damaged) is not an interrupted save: it is moved to `checkpoints/corrupt/`,
never deleted, and the run falls back to the previous checkpoint with a warning
naming the file.

A rollback saves no model. What the run learned by rolling back (the lowered
learning rate, the spent budget, the data position under recovery.data=skip:
the `carry` objects, which a rollback does not restore) goes to a small side
checkpoint `rollback-K`, committed by atomically replacing `rollback.json`,
which names the checkpoint it applies to. Checkpoints newer than the rollback
target belong to the timeline the run abandoned: they are retired after that
commit. On start, a `rollback.json` that no later full save superseded is
applied on top of its checkpoint; the next full save makes it obsolete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from safetrain.errors import WorkdirError, io_fault

CORRUPT_DIR = "corrupt"
ROLLBACK_FILE = "rollback.json"
_NUM = re.compile(r"ckpt-(\d+)$")
_FILE = re.compile(r"^ckpt-(\d+)\.(index|data-\d{5}-of-\d{5})$")
_SIDE = re.compile(r"^rollback-(\d+)\.(index|data-\d{5}-of-\d{5})$")
_TEMP = re.compile(
  r"^((ckpt|rollback)-\d+_temp.*|checkpoint\.tmp[0-9a-f]*|"
  + re.escape(ROLLBACK_FILE)
  + r"\.tmp.*)$"
)
_MODEL_KEY = re.compile(r"^model_variables/\d+/\.ATTRIBUTES/VARIABLE_VALUE$")


def step_of(path: str) -> int:
  m = _NUM.search(path)
  if not m:
    raise ValueError(f"not a safetrain checkpoint path: {path}")
  return int(m.group(1))


@dataclasses.dataclass
class Scan:
  """What a checkpoint directory holds, read without TensorFlow.

  Attributes:
    has_state: the `checkpoint` state file exists and parses.
    state_damaged: the state file exists but does not parse (empty, cut
      short, garbled).
    listed: step -> save time of every checkpoint the state file lists, in
      save order (the last one is the latest).
    latest: the step the state file calls latest, or None.
    files: step -> names of the `ckpt-N.*` files on disk.
    leftovers: temporary files and directories of an interrupted save.
    side: K -> names of the `rollback-K.*` files (rollback side states).
    has_rollback: `rollback.json` exists.
  """

  has_state: bool
  state_damaged: bool
  listed: dict[int, float]
  latest: int | None
  files: dict[int, list[str]]
  leftovers: list[str]
  side: dict[int, list[str]] = dataclasses.field(default_factory=dict)
  has_rollback: bool = False

  @property
  def unlisted(self) -> list[int]:
    """Steps with files on disk that the state file does not list."""
    return sorted(s for s in self.files if s not in self.listed)

  @property
  def incomplete(self) -> list[int]:
    """Listed steps whose index or data file is missing."""
    out = []
    for s in self.listed:
      names = self.files.get(s, [])
      if not any(n.endswith(".index") for n in names) or not any(".data-" in n for n in names):
        out.append(s)
    return out

  @property
  def interrupted_save(self) -> bool:
    """True when a save was cut short: the traces a kill mid-checkpoint leaves."""
    return bool(self.leftovers or (self.has_state and self.unlisted) or self.incomplete)


def scan(directory: str) -> Scan:
  """Reads the state file and lists the checkpoint files in `directory`."""
  listed: dict[int, float] = {}
  latest = None
  state = None
  try:
    state = tf.train.get_checkpoint_state(directory)
  except (tf.errors.OpError, ValueError) as e:
    logging.warning("unreadable checkpoint state file in %s: %s", directory, e)
  if state is not None:
    stamps = list(state.all_model_checkpoint_timestamps)
    for i, path in enumerate(state.all_model_checkpoint_paths):
      m = _NUM.search(path)
      if m:
        listed[int(m.group(1))] = stamps[i] if i < len(stamps) else 0.0
    m = _NUM.search(state.model_checkpoint_path)
    latest = int(m.group(1)) if m else None
    if latest is not None and latest not in listed:
      listed[latest] = max(listed.values(), default=0.0)
    if latest is not None:  # the latest is the newest save, whatever the timestamps say
      listed[latest] = listed.pop(latest)
  files: dict[int, list[str]] = {}
  side: dict[int, list[str]] = {}
  leftovers = []
  names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  for name in names:
    m = _FILE.match(name)
    if m:
      files.setdefault(int(m.group(1)), []).append(name)
    elif _TEMP.match(name):
      leftovers.append(name)
    elif m := _SIDE.match(name):
      side.setdefault(int(m.group(1)), []).append(name)
  damaged = state is None and os.path.exists(os.path.join(directory, "checkpoint"))
  return Scan(
    state is not None,
    damaged,
    listed,
    latest,
    files,
    leftovers,
    side,
    ROLLBACK_FILE in names,
  )


def verify(path: str) -> None:
  """Reads every tensor of the checkpoint at `path`, checksums included.

  Raises whatever TensorFlow raises for an unreadable checkpoint (a missing or
  truncated file, changed bytes). Independent of any model, so it tells a
  corrupt checkpoint from one written for a different model.
  """
  reader = tf.train.load_checkpoint(path)
  dtypes = reader.get_variable_to_dtype_map()
  names = sorted(dtypes)
  with tf.device("CPU:0"):
    tf.raw_ops.RestoreV2(
      prefix=path,
      tensor_names=names,
      shape_and_slices=[""] * len(names),
      dtypes=[dtypes[n] for n in names],
    )


def _index_readable(path: str) -> bool:
  """The index of checkpoint `path` exists and parses. TensorFlow writes it
  last, straight to its final name, after the data file is renamed into
  place: a save killed before it finished has none, or one cut short."""
  if not os.path.exists(path + ".index"):
    return False
  try:
    tf.train.list_variables(path)
  except Exception:  # noqa: BLE001 - any failure to parse it
    return False
  return True


@dataclasses.dataclass
class _Rollback:
  """What `rollback.json` says: the side state `state` applies on top of the
  checkpoint `base`; checkpoints `abandoned` are retired; `generation` is the
  value the generation key had after the rollback."""

  base: int
  state: int
  generation: int
  abandoned: list[int]


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
  ):
    self.directory = directory
    self.objects = objects
    self.write = write
    self.owner = owner
    self.max_to_keep = max_to_keep
    self.carry = {k: objects[k] for k in carry if k in objects}
    self.generation_key = generation_key
    self.checkpoint = tf.train.Checkpoint(**objects)
    self.repairs: list[str] = []  # what restore_latest cleaned up or set aside
    # False after a restore that had to leave the data iterator out (the input
    # pipeline changed since the save).
    self.iterator_restored = False
    self._current: int | None = None  # the step of the last save or restore
    # Built on first use: CheckpointManager's constructor fails on a damaged
    # state file, which restore_latest repairs first.
    self._manager = None
    self._read_manager = None

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
      self.checkpoint, target, max_to_keep=self.max_to_keep, checkpoint_name="ckpt"
    )
    self._read_manager = (
      self._manager
      if self.write
      else tf.train.CheckpointManager(
        self.checkpoint, self.directory, max_to_keep=self.max_to_keep, checkpoint_name="ckpt"
      )
    )

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
    if self.write and step in self._listed():
      raise RuntimeError(
        f"refusing to overwrite the committed checkpoint {self.directory}/ckpt-{step}"
      )
    try:
      path = self.manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as e:
      if self.write:
        _remove(os.path.join(self.directory, f"ckpt-{step}_temp"))
      self._raise_io(f"cannot write checkpoint {self.directory}/ckpt-{step}", e)
    self._current = step
    if not self.write:
      # Only the chief's files count: the scratch copy served the collective.
      _remove(self.manager.directory)
      self._make_managers()
      return os.path.join(self.directory, f"ckpt-{step}")
    logging.info("Saved healthy checkpoint %s", path)
    # The full save holds everything a rollback's side state held.
    self._drop_rollback_state()
    return path

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
    step = step_of(path)
    self._current = step
    if not self.carry:
      return
    found = scan(self.directory)
    k = max([*found.side, self._pointer_state()], default=0) + 1
    where = self.directory if self.write else self._scratch()
    prefix = os.path.join(where, f"rollback-{k}")
    try:
      os.makedirs(where, exist_ok=True)
      tf.train.Checkpoint(**self.carry).write(prefix)
    except (tf.errors.OpError, OSError) as e:
      if self.write:
        _remove(prefix + "_temp")
        for name in os.listdir(self.directory):
          if name.startswith(f"rollback-{k}."):
            _remove(os.path.join(self.directory, name))
      self._raise_io(f"cannot write the rollback state {prefix}", e)
    if not self.write:
      _remove(where)
      return
    abandoned = sorted(s for s in found.listed if s > step)
    info = {"base": step, "state": k, "generation": int(generation), "abandoned": abandoned}
    try:
      _atomic_write(os.path.join(self.directory, ROLLBACK_FILE), json.dumps(info) + "\n")
    except OSError as e:
      self._raise_io(f"cannot write {os.path.join(self.directory, ROLLBACK_FILE)}", e)
    # Committed. What follows only tidies up, and is redone on the next start
    # if a kill cuts it short.
    self._retire(abandoned, found, restored=step, why=f"the run rolled back past it to {path}")
    for other, names in found.side.items():
      if other != k:
        for name in names:
          _remove(os.path.join(self.directory, name))

  def _drop_rollback_state(self) -> None:
    """Removes rollback.json (first: the commit is undone before its files
    go), then the side states. Called when a full save superseded them."""
    names = os.listdir(self.directory)
    side = [n for n in names if _SIDE.match(n)]
    if ROLLBACK_FILE not in names and not side:
      return
    _remove(os.path.join(self.directory, ROLLBACK_FILE))
    _fsync_dir(self.directory)
    for name in side:
      _remove(os.path.join(self.directory, name))

  def _retire(self, steps: list[int], found: Scan, *, restored: int, why: str) -> None:
    """Unlists `steps` (state file first), then deletes their files."""
    if not steps:
      return
    keep = [s for s in found.listed if s not in steps]
    self._write_state(keep, found, latest=restored)
    for s in steps:
      for name in found.files.get(s, []):
        _remove(os.path.join(self.directory, name))
      self._note(f"{self.directory}/ckpt-{s} retired: {why}")
    self._make_managers()

  # ---------------------------------------------------------- reading

  def _listed(self) -> list[int]:
    return [step_of(p) for p in self.read_manager.checkpoints]

  def checkpoints(self) -> list[tuple[int, str]]:
    """(step, path) of every kept checkpoint, oldest save first."""
    if not self.write:
      # The chief has saved since this worker started: read its state file.
      return [(s, os.path.join(self.directory, f"ckpt-{s}")) for s in scan(self.directory).listed]
    return [(step_of(p), p) for p in self.read_manager.checkpoints]

  def latest_path(self) -> str | None:
    if not self.write:
      latest = scan(self.directory).latest
      return None if latest is None else os.path.join(self.directory, f"ckpt-{latest}")
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
      path = os.path.join(self.directory, f"ckpt-{step}")
      try:
        tf.train.Checkpoint(**objects).restore(path).expect_partial()
      except (tf.errors.OpError, ValueError, AssertionError) as e:
        logging.warning("cannot read %s (%s); trying an older checkpoint", path, _why(e))
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
    pointer = self._read_pointer()
    if pointer is not None:
      self._apply_side(pointer, quiet=True)

  def check_readable(self, path: str) -> str | None:
    """None when every tensor of `path` reads back; else why not."""
    try:
      verify(path)
    except Exception as e:  # noqa: BLE001 - any failure to read is damage
      return _why(e)
    return None

  def set_aside(self, path: str, problem: str) -> None:
    """Moves a committed checkpoint that cannot serve (unreadable, or
    restoring non-finite values) to corrupt/ and unlists it."""
    step = step_of(path)
    if not self.write:
      return
    found = scan(self.directory)
    if step in found.files:
      self._set_aside_corrupt(step, path, found, problem, fallback=False)
    keep = [s for s in found.listed if s != step]
    latest = found.latest if found.latest in keep else (keep[-1] if keep else None)
    self._write_state(keep, found, latest=latest)
    self._make_managers()

  # -------------------------------------------------------------- resume

  def restore_latest(self, healthy: Callable[[], bool] | None = None) -> str | None:
    """Restores the newest checkpoint that reads back whole; returns its path.

    Tries checkpoints newest save first (or first the one a committed
    rollback restored). Traces of an interrupted save are removed; a
    checkpoint that does not read back, or (with `healthy`) restores
    non-finite values, is moved to `corrupt/` with a warning and the next
    older one is tried. Then the rollback side state, if one is pending, is
    applied.

    Args:
      healthy: called after a restore; False rejects the checkpoint.

    Returns:
      The restored path, or None when the directory holds no checkpoint.

    Raises:
      WorkdirError: the checkpoints were written for a different model or
        trainer, or none of the committed ones reads back.
    """
    self.repairs = []
    found = scan(self.directory)
    if self.write:
      self._remove_leftovers(found)
      if found.state_damaged:
        self._set_aside_state_file()
    pointer = self._valid_pointer(found)
    abandoned = set(pointer.abandoned) if pointer else set()
    if pointer is not None and abandoned & set(found.files):
      self._retire(
        sorted(abandoned & set(found.files)),
        found,
        restored=pointer.base,
        why="a rollback went past it (finishing what a kill interrupted)",
      )
      found = scan(self.directory)
    newest_listed = max(found.listed, default=-1)
    # Newest save first: files the state file does not list yet, newer than
    # every listed one, come from the last save (killed before its commit);
    # then the listed ones, latest first. With no state file every file counts.
    newer = sorted((s for s in found.unlisted if s > newest_listed), reverse=True)
    order = newer + [s for s in reversed(found.listed) if s not in newer]
    if pointer is not None and pointer.base in order:
      order.remove(pointer.base)
      order.insert(0, pointer.base)
    restored = None
    set_aside, corrupt = [], []
    tried = []
    for step in order:
      tried.append(step)
      path = os.path.join(self.directory, f"ckpt-{step}")
      if step not in found.files:
        self._note(f"{path} is listed but its files are gone (an interrupted clean-up)")
        set_aside.append(step)
        continue
      problem = self._try_restore(path, healthy)
      if problem is None:
        restored = path
        break
      set_aside.append(step)
      if self._is_interrupted_save(step, found, newest_listed):
        self._note(f"{path} was never committed (killed while saving): removed ({problem})")
        if self.write:
          for name in found.files[step]:
            _remove(os.path.join(self.directory, name))
      else:
        corrupt.append(step)
        self._set_aside_corrupt(step, path, found, problem)
    if pointer is not None and restored is not None:
      # The rollback's checkpoint came first: files of a newer save are the
      # remains of one killed before its commit (a whole one would have
      # superseded the rollback state), or damage.
      for step in [s for s in newer if s not in tried]:
        set_aside.append(step)
        path = os.path.join(self.directory, f"ckpt-{step}")
        if self._is_interrupted_save(step, found, newest_listed):
          self._note(f"{path} was never committed (killed while saving): removed")
          if self.write:
            for name in found.files[step]:
              _remove(os.path.join(self.directory, name))
        else:
          self._set_aside_corrupt(step, path, found, "newer than a committed rollback", False)
    # Older listed checkpoints with a file missing cannot be rollback targets.
    # CheckpointManager lists a new save before it deletes the oldest ones
    # (index first, then data), so the oldest beyond max_to_keep may be half
    # deleted by a kill: finish that. Any other is damage: set aside.
    listed = list(found.listed)
    doomed = set(listed[: max(0, len(listed) - self.max_to_keep)])
    for step in found.incomplete:
      if step in set_aside:
        continue
      set_aside.append(step)
      path = os.path.join(self.directory, f"ckpt-{step}")
      if step not in found.files:
        self._note(f"{path} is listed but its files are gone (an interrupted clean-up)")
      elif step in doomed:
        self._note(f"{path} was being deleted (max_to_keep) when the run was killed: removed")
        if self.write:
          for name in found.files[step]:
            _remove(os.path.join(self.directory, name))
      else:
        self._set_aside_corrupt(step, path, found, "a file is missing", fallback=False)
    if self.write and (set_aside or found.unlisted or not found.has_state):
      keep = [s for s in found.listed if s not in set_aside]
      keep += [s for s in found.unlisted if s not in set_aside and s not in keep]
      keep.sort()
      latest = None if restored is None else step_of(restored)
      if latest is not None:
        keep = [s for s in keep if s != latest] + [latest]
      self._write_state(keep, found, latest=latest)
    self._make_managers()
    if restored is None and corrupt:
      raise WorkdirError(
        f"no readable checkpoint in {self.directory}: every committed one is damaged "
        f"(moved to {os.path.join(self.directory, CORRUPT_DIR)}). Nothing was deleted; "
        "use a new --workdir to start over."
      )
    if restored is None:
      if pointer is not None:
        self._set_aside_rollback_state(found, "no checkpoint is left for it to apply to")
      return None
    self._current = step_of(restored)
    if pointer is not None:
      if pointer.base != self._current:
        self._note(
          f"the rollback state in {ROLLBACK_FILE} was made for ckpt-{pointer.base}, which is "
          f"damaged; applying it to {restored}",
          warn=True,
        )
      self._apply_side(pointer)
    return restored

  def _is_interrupted_save(self, step: int, found: Scan, newest_listed: int) -> bool:
    """Whether the unreadable `ckpt-STEP` is provably what a save killed
    before its commit leaves: unlisted, newer than every committed
    checkpoint, and without a whole index (TensorFlow writes it last). With
    no state file, only a lone `ckpt-0`: the first save of a run, which is
    committed by creating the state file."""
    path = os.path.join(self.directory, f"ckpt-{step}")
    if _index_readable(path):
      return False  # written whole: bytes changed since, which no kill does
    if found.has_state:
      return step not in found.listed and step > newest_listed
    if found.state_damaged:
      return False  # a state file was written, so a save was committed
    return step == 0 and list(found.files) == [0]

  def _try_restore(self, path: str, healthy) -> str | None:
    """Restores `path`; returns None, or why the checkpoint is unusable.

    Raises WorkdirError when the checkpoint reads back whole but does not fit.
    """
    try:
      saved = tf.train.list_variables(path)
    except Exception as e:  # noqa: BLE001 - any failure to read the index is damage
      return _why(e)
    self._check_compatible(path, saved)
    self.iterator_restored = "iterator" in self.objects
    try:
      self.checkpoint.restore(path).assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001 - told apart below
      # A failed restore leaves pending restorations on the Checkpoint object
      # that would read this path again later: start from a fresh one.
      self.checkpoint = tf.train.Checkpoint(**self.objects)
      self._manager = self._read_manager = None
      try:
        verify(path)
      except Exception as damage:  # noqa: BLE001
        return _why(damage)
      if self.iterator_restored and "DeserializeIterator" in str(e):
        # The input pipeline's definition changed since the save: everything
        # else restores, and the trainer finds the data again by position.
        rest = {k: v for k, v in self.objects.items() if k != "iterator"}
        tf.train.Checkpoint(**rest).restore(path).expect_partial()
        self.iterator_restored = False
      else:
        raise WorkdirError(
          f"the checkpoint {path} does not fit this trainer{self._owner_note()}: {_why(e)}. "
          "Use a new --workdir, or the experiment that wrote this one."
        ) from e
    if healthy is not None and not healthy():
      return "it restores non-finite values"
    return None

  # ---------------------------------------------------- the rollback state

  def _pointer_state(self) -> int:
    pointer = self._read_pointer()
    return pointer.state if pointer else 0

  def _read_pointer(self) -> _Rollback | None:
    """rollback.json as written, or None (missing or unparsable)."""
    try:
      with open(os.path.join(self.directory, ROLLBACK_FILE), encoding="utf-8") as f:
        info = json.load(f)
      pointer = _Rollback(
        base=int(info["base"]),
        state=int(info["state"]),
        generation=int(info["generation"]),
        abandoned=[int(s) for s in info["abandoned"]],
      )
    except (OSError, ValueError, KeyError, TypeError):
      return None
    return pointer

  def _valid_pointer(self, found: Scan) -> _Rollback | None:
    """The pending rollback state, or None; cleans up an obsolete one."""
    path = os.path.join(self.directory, ROLLBACK_FILE)
    pointer = self._read_pointer() if found.has_rollback else None
    if found.has_rollback and pointer is None:
      self._set_aside_rollback_state(found, "rollback.json does not parse")
      return None
    if pointer is None:
      if found.side and self.write:  # a side state whose commit never happened
        for names in found.side.values():
          for name in names:
            _remove(os.path.join(self.directory, name))
        self._note("removed rollback state files no rollback.json names (an interrupted rollback)")
      return None
    superseded = None
    for step in sorted(found.files, reverse=True):
      if self.generation_key is None:
        break
      try:
        value = int(
          tf.train.load_variable(os.path.join(self.directory, f"ckpt-{step}"), self.generation_key)
        )
      except Exception:  # noqa: BLE001 - an unreadable one is judged later
        continue
      if value >= pointer.generation and step not in pointer.abandoned:
        superseded = step
        break
    if superseded is not None:
      if self.write:
        self._drop_rollback_state()
      self._note(f"{path} is obsolete: ckpt-{superseded} was saved after that rollback")
      return None
    if pointer.state not in found.side:
      self._set_aside_rollback_state(found, f"its state files rollback-{pointer.state}.* are gone")
      return None
    if self.write:  # side states of earlier rollbacks, left by a kill
      for other, names in found.side.items():
        if other != pointer.state:
          for name in names:
            _remove(os.path.join(self.directory, name))
    return pointer

  def _apply_side(self, pointer: _Rollback, quiet: bool = False) -> None:
    prefix = os.path.join(self.directory, f"rollback-{pointer.state}")
    try:
      tf.train.Checkpoint(**self.carry).read(prefix).assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001 - told apart below
      rest = {k: v for k, v in self.carry.items() if k != "iterator"}
      try:
        verify(prefix)
        if len(rest) == len(self.carry) or "DeserializeIterator" not in str(e):
          raise e
        # The input pipeline changed since the rollback: the rest applies, and
        # the trainer finds the data again by position (as for a checkpoint).
        tf.train.Checkpoint(**rest).read(prefix).expect_partial()
        self.iterator_restored = False
      except Exception as damage:  # noqa: BLE001 - damage: resume without it
        if not quiet:
          self._set_aside_rollback_state(scan(self.directory), _why(damage))
        return
    if not quiet:
      self._note(
        f"applied the state of the rollback to ckpt-{pointer.base} ({prefix}): the run "
        "resumes with what it learned then (learning-rate scale, budget, data position)"
      )

  def _set_aside_rollback_state(self, found: Scan, problem: str) -> None:
    message = f"the rollback state in {self.directory}/{ROLLBACK_FILE} cannot be used ({problem})"
    if self.write:
      dest = os.path.join(self.directory, CORRUPT_DIR)
      os.makedirs(dest, exist_ok=True)
      tag = uuid.uuid4().hex[:8]
      names = [n for ns in found.side.values() for n in ns]
      if found.has_rollback:
        names.append(ROLLBACK_FILE)
      for name in names:
        src = os.path.join(self.directory, name)
        if os.path.exists(src):
          os.replace(src, os.path.join(dest, f"{tag}-{name}"))
      message += f"; moved to {dest}/{tag}-*"
    self._note(message + "; resuming without it", warn=True)

  # ------------------------------------------------------------- repairs

  def _set_aside_state_file(self) -> None:
    """A state file that does not parse is rebuilt from the files on disk.
    An empty one (what a power loss leaves) holds nothing; any other is
    kept as evidence."""
    state = os.path.join(self.directory, "checkpoint")
    if os.path.getsize(state) == 0:
      _remove(state)
      self._note(f"{state} is empty (a power loss?): rebuilt from the checkpoint files", warn=True)
      return
    dest = os.path.join(self.directory, CORRUPT_DIR)
    os.makedirs(dest, exist_ok=True)
    target = os.path.join(dest, f"checkpoint-{uuid.uuid4().hex[:8]}")
    os.replace(state, target)
    self._note(
      f"{state} does not parse: moved to {target}; rebuilt from the checkpoint files", warn=True
    )

  def _set_aside_corrupt(
    self, step: int, path: str, found: Scan, problem: str, fallback: bool = True
  ) -> None:
    dest_dir = os.path.join(self.directory, CORRUPT_DIR)
    where = "left in place (not the chief)"
    if self.write:
      os.makedirs(dest_dir, exist_ok=True)
      prefix = f"ckpt-{step}"
      k = 1
      while any(n.startswith(prefix + ".") for n in os.listdir(dest_dir)):
        k += 1
        prefix = f"ckpt-{step}_{k}"
      for name in found.files[step]:
        src = os.path.join(self.directory, name)
        if os.path.exists(src):
          os.replace(src, os.path.join(dest_dir, prefix + name[len(_stem(name)) :]))
      where = f"moved to {os.path.join(dest_dir, prefix)}.*"
    message = f"checkpoint {path} is unreadable ({problem}); {where}"
    if fallback:
      message += "; falling back to the previous checkpoint"
    self._note(message, warn=True)

  def _remove_leftovers(self, found: Scan) -> None:
    for name in found.leftovers:
      full = os.path.join(self.directory, name)
      self._note(f"removed {full}, left by a save that was interrupted")
      _remove(full)

  def _write_state(self, keep: list[int], found: Scan, latest: int | None) -> None:
    """Lists exactly `keep` in the state file, `latest` last (atomically)."""
    from tensorflow.python.checkpoint import checkpoint_management  # noqa: PLC0415

    if latest is not None and latest in keep:
      keep = [s for s in keep if s != latest] + [latest]
    state_file = os.path.join(self.directory, "checkpoint")
    if not keep:
      _remove(state_file)
      return
    stamps = [found.listed.get(s) or self._mtime(s, found) for s in keep]
    paths = [os.path.join(self.directory, f"ckpt-{s}") for s in keep]
    checkpoint_management.update_checkpoint_state_internal(
      self.directory,
      model_checkpoint_path=paths[-1],
      all_model_checkpoint_paths=paths,
      all_model_checkpoint_timestamps=stamps,
      last_preserved_timestamp=min(stamps) - 1,
      save_relative_paths=True,
    )

  def _mtime(self, step: int, found: Scan) -> float:
    names = found.files.get(step, [])
    times = [os.path.getmtime(os.path.join(self.directory, n)) for n in names]
    times = [t for t in times if t]
    return max(times, default=0.0)

  def _note(self, message: str, warn: bool = False) -> None:
    self.repairs.append(message)
    if warn:
      logging.warning("%s", message)
      print(f"safetrain: warning: {message}", file=sys.stderr)
    else:
      logging.info("%s", message)

  def _raise_io(self, what: str, e: BaseException):
    """Raises WorkdirError for an I/O fault (one line: path and cause), or
    re-raises anything else."""
    fault = io_fault(e)
    if fault is None:
      raise e
    latest = None
    try:
      latest = scan(self.directory).latest if self.write else None
    except OSError:
      pass
    intact = (
      f"the last committed checkpoint ({self.directory}/ckpt-{latest}) is intact"
      if latest is not None
      else "no checkpoint was committed yet"
    )
    raise WorkdirError(
      f"{what}: {fault[1]}. Nothing committed was lost: {intact}; fix the cause and run "
      "the same command to resume."
    ) from e

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

  def position_of(self, path: str, data_state) -> int:
    del data_state
    return int(tf.train.load_variable(path, "data/position/.ATTRIBUTES/VARIABLE_VALUE"))

  # ------------------------------------------------------- compatibility

  def _previous_owner(self) -> str | None:
    """The trainer named in WORKDIR/config.json by the run that wrote it."""
    path = os.path.join(os.path.dirname(self.directory), "config.json")
    try:
      with open(path) as f:
        owner = json.load(f).get("trainer")
    except (OSError, ValueError, AttributeError):
      return None
    return owner if isinstance(owner, str) else None

  def _owner_note(self) -> str:
    previous = self._previous_owner()
    if self.owner and previous and previous != self.owner:
      return f" (it was written by {previous}, this is {self.owner})"
    return ""

  def _check_compatible(self, path: str, saved: list | None = None) -> None:
    """A workdir written for another model fails here, naming the trainers and
    shapes, not with a shape error deep inside TensorFlow."""
    model = self.objects.get("model")
    if model is None:
      return
    if saved is None:
      try:
        saved = tf.train.list_variables(path)
      except (tf.errors.OpError, ValueError) as e:
        raise WorkdirError(f"cannot read checkpoint {path}: {e}") from e
    saved_shapes = sorted(tuple(shape) for key, shape in saved if _MODEL_KEY.match(key))
    if not saved_shapes:
      # Written before every model variable was saved by position: trainable
      # ones are reached through the optimizer, the rest through the model.
      saved_shapes = sorted(
        tuple(shape)
        for key, shape in saved
        if key.startswith(("model/", "optimizer/_trainable_variables/"))
        and key.endswith("/.ATTRIBUTES/VARIABLE_VALUE")
      )
    our_shapes = sorted(tuple(v.shape) for v in model.variables)
    note = self._owner_note()
    if saved_shapes == our_shapes:
      if note:
        message = (
          f"the workdir {os.path.dirname(self.directory)} was written by another trainer"
          f"{note}; its model has the same variable shapes, so resuming from it"
        )
        self._note(message, warn=True)
      return
    missing = _multiset_minus(our_shapes, saved_shapes)[:3]
    extra = _multiset_minus(saved_shapes, our_shapes)[:3]
    raise WorkdirError(
      f"the checkpoint {path} was written for a different model{note}: it holds "
      f"{len(saved_shapes)} model variables, this model has {len(our_shapes)}"
      f" (shapes only in this model: {missing}; only in the checkpoint: {extra})."
      " Use a new --workdir, or the experiment that wrote this one."
    )


def _stem(name: str) -> str:
  return name.split(".", 1)[0]


def _remove(path: str) -> None:
  try:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  except FileNotFoundError:
    pass


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _atomic_write(path: str, text: str) -> None:
  """Replaces `path` with `text` by rename: a reader (or a kill) sees the old
  file or the new one, never part of one."""
  tmp = f"{path}.tmp{uuid.uuid4().hex}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    _remove(tmp)
    raise
  _fsync_dir(os.path.dirname(path))


def _why(e: BaseException) -> str:
  """One line from a TensorFlow error, without its function-node preamble."""
  text = re.sub(r"\{\{[^}]*\}\}\s*", "", str(e)).strip() or type(e).__name__
  text = text.splitlines()[0]
  if len(text) > 240:
    text = text[:237] + "..."
  return f"{type(e).__name__}: {text}"


def _multiset_minus(a: list, b: list) -> list:
  rest = list(b)
  out = []
  for x in a:
    if x in rest:
      rest.remove(x)
    else:
      out.append(list(x))
  return out
