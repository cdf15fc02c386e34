"""Healthy checkpoints: tf.train.Checkpoint + CheckpointManager, made kill-proof.

The store only ever saves what the trainer asks it to, and the trainer only
asks when every variable is finite and no divergence is open, so every file
here is a valid rollback target. Checkpoint numbers are training steps.

A save is committed when CheckpointManager rewrites the `checkpoint` state file
(atomically, by rename) after the data and index files are written. A process
killed at any moment therefore leaves one of: a `ckpt-N_temp/` directory (killed
while writing), complete or partial `ckpt-N.*` files the state file does not
list yet (killed before the commit), or a listed checkpoint whose files are
already deleted (killed while CheckpointManager swept old ones). On start,
`restore_latest` cleans all of these up and restores the newest checkpoint that
reads back whole. A listed checkpoint that does not read back (bytes changed,
file cut short, index missing) is corruption, not an interrupted save: it is
moved to `checkpoints/corrupt/`, never deleted, and the run falls back to the
previous one with a warning naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from safetrain.errors import WorkdirError

CORRUPT_DIR = "corrupt"
_NUM = re.compile(r"ckpt-(\d+)$")
_FILE = re.compile(r"^ckpt-(\d+)\.(index|data-\d{5}-of-\d{5})$")
_TEMP = re.compile(r"^(ckpt-\d+_temp.*|checkpoint\.tmp[0-9a-f]*)$")
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
    state_damaged: the state file exists but does not parse (then every
      checkpoint on disk counts as committed: nothing is deleted).
    listed: step -> save time of every checkpoint the state file lists, in
      save order (the last one is the latest).
    latest: the step the state file calls latest, or None.
    files: step -> names of the `ckpt-N.*` files on disk.
    leftovers: temporary files and directories of an interrupted save.
  """

  has_state: bool
  state_damaged: bool
  listed: dict[int, float]
  latest: int | None
  files: dict[int, list[str]]
  leftovers: list[str]

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
  leftovers = []
  names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  for name in names:
    m = _FILE.match(name)
    if m:
      files.setdefault(int(m.group(1)), []).append(name)
    elif _TEMP.match(name):
      leftovers.append(name)
  damaged = state is None and os.path.exists(os.path.join(directory, "checkpoint"))
  return Scan(state is not None, damaged, listed, latest, files, leftovers)


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
  """

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int,
    objects: dict,
    write: bool = True,
    owner: str | None = None,
  ):
    self.directory = directory
    self.objects = objects
    self.write = write
    self.owner = owner
    self.max_to_keep = max_to_keep
    self.checkpoint = tf.train.Checkpoint(**objects)
    self.repairs: list[str] = []  # what restore_latest cleaned up or set aside
    # False after a restore that had to leave the data iterator out (the input
    # pipeline changed since the save).
    self.iterator_restored = False
    self._own_latest: int | None = None  # non-chief: the step of its last save
    self._make_managers()

  def _make_managers(self) -> None:
    target = (
      self.directory if self.write else os.path.join(self.directory, ".scratch-" + str(os.getpid()))
    )
    self.manager = tf.train.CheckpointManager(
      self.checkpoint, target, max_to_keep=self.max_to_keep, checkpoint_name="ckpt"
    )
    self.read_manager = (
      self.manager
      if self.write
      else tf.train.CheckpointManager(
        self.checkpoint, self.directory, max_to_keep=self.max_to_keep, checkpoint_name="ckpt"
      )
    )

  def replace_objects(self, **objects) -> None:
    """Swaps tracked objects (a re-created data iterator) for later saves."""
    self.objects = dict(self.objects, **objects)
    self.checkpoint = tf.train.Checkpoint(**self.objects)
    self._make_managers()

  def save(self, step: int) -> str:
    path = self.manager.save(checkpoint_number=step)
    if not self.write:
      # Only the chief's files count: the scratch copy served the collective.
      _remove(self.manager.directory)
      self._make_managers()
      self._own_latest = step
      return os.path.join(self.directory, f"ckpt-{step}")
    logging.info("Saved healthy checkpoint %s", path)
    return path

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
      return self._own_latest
    path = self.latest_path()
    return step_of(path) if path else None

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
    from the checkpoint the chief chose)."""
    self.checkpoint.restore(path).assert_existing_objects_matched()
    self._own_latest = step_of(path)

  def restore_latest(self, healthy: Callable[[], bool] | None = None) -> str | None:
    """Restores the newest checkpoint that reads back whole; returns its path.

    Tries checkpoints newest save first. Leftovers of an interrupted save are
    removed; a committed checkpoint that does not read back, or (with
    `healthy`) restores non-finite values, is moved to `corrupt/` with a
    warning and the next older one is tried.

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
    # Newest save first: files the state file does not list yet come from the
    # last save (killed before its commit), then the listed ones, latest first.
    unlisted = sorted(
      found.unlisted, key=lambda s: self._mtime(s, found) if found.has_state else s, reverse=True
    )
    order = unlisted + list(reversed(found.listed))
    restored = None
    set_aside, corrupt = [], []
    for step in order:
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
      # Without a state file nothing was committed (CheckpointManager writes
      # it after the first save): a damaged one is an interrupted first save.
      if step in found.listed or found.state_damaged:
        corrupt.append(step)
        self._set_aside_corrupt(step, path, found, problem)
      else:
        self._note(f"{path} was never committed (killed while saving): removed ({problem})")
        if self.write:
          for name in found.files[step]:
            _remove(os.path.join(self.directory, name))
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
    if self.write and (set_aside or found.unlisted):
      self._rewrite_state(found, set_aside, restored)
    self._make_managers()
    if restored is None and corrupt:
      raise WorkdirError(
        f"no readable checkpoint in {self.directory}: every committed one is damaged "
        f"(moved to {os.path.join(self.directory, CORRUPT_DIR)}). Nothing was deleted; "
        "use a new --workdir to start over."
      )
    return restored

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
        os.replace(
          os.path.join(self.directory, name),
          os.path.join(dest_dir, prefix + name[len(_stem(name)) :]),
        )
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

  def _rewrite_state(self, found: Scan, set_aside: list[int], restored: str | None) -> None:
    """Lists exactly the usable checkpoints, the restored one last."""
    from tensorflow.python.checkpoint import checkpoint_management  # noqa: PLC0415

    keep = [s for s in found.listed if s not in set_aside]
    keep += [s for s in found.unlisted if s not in set_aside and s not in keep]
    if restored is not None:
      r = step_of(restored)
      keep = [s for s in keep if s != r] + [r]
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
    return max(os.path.getmtime(os.path.join(self.directory, n)) for n in found.files[step])

  def _note(self, message: str, warn: bool = False) -> None:
    self.repairs.append(message)
    if warn:
      logging.warning("%s", message)
      print(f"safetrain: warning: {message}", file=sys.stderr)
    else:
      logging.info("%s", message)

  def restore_rollback(self, path: str, objects: dict, data: dict | None = None) -> int:
    """Restores `objects` (and `data`, for replay) from `path`; returns its step.

    Objects not named (the recovery state, and the data iterator under
    recovery.data=skip) keep their current values.
    """
    ckpt = tf.train.Checkpoint(**objects, **(data or {}))
    ckpt.restore(path).expect_partial()
    return step_of(path)

  def position_of(self, path: str, data_state) -> int:
    del data_state
    return int(tf.train.load_variable(path, "data/position/.ATTRIBUTES/VARIABLE_VALUE"))

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
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  except FileNotFoundError:
    pass


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
