"""The files of a checkpoint directory: their names, what is there, whether it reads.

WORKDIR/checkpoints holds full checkpoints `ckpt-STEP.index` and
`ckpt-STEP.data-*` (written by tf.train.CheckpointManager, STEP the training
step), the state file `checkpoint` that commits them, the side states of
rollbacks `rollback-K.*` with their commit `rollback.json`, and `corrupt/`,
where damage is kept. `scan` lists all this without building a model;
`verify` reads back every tensor of one checkpoint. What is done about what
they find lives in repair.py and rollback_state.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import NoReturn

import tensorflow as tf
from absl import logging

from safetrain.core.errors import WorkdirError, io_fault
from safetrain.storage import files as storage

CHECKPOINT_NAME = "ckpt"  # CheckpointManager's checkpoint_name
STATE_FILE = "checkpoint"
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


def path_of(directory: str, step: int) -> str:
  """The path (prefix of its files) of the checkpoint of `step` in `directory`."""
  return os.path.join(directory, f"{CHECKPOINT_NAME}-{step}")


def step_of(path: str) -> int:
  """The step of the checkpoint at `path` (the inverse of `path_of`)."""
  m = _NUM.search(path)
  if not m:
    raise ValueError(f"not a safetrain checkpoint path: {path}")
  return int(m.group(1))


def side_path(directory: str, k: int) -> str:
  """The path (prefix of its files) of the side state of the K-th rollback."""
  return os.path.join(directory, f"rollback-{k}")


def is_side_file(name: str) -> bool:
  """Whether `name` is a file of a rollback side state."""
  return bool(_SIDE.match(name))


@dataclasses.dataclass
class Scan:
  """What a checkpoint directory holds, as named on disk.

  Attributes:
    has_state: the `checkpoint` state file exists and parses.
    state_damaged: the state file exists but does not parse (empty, cut
      short, garbled), or names as latest a checkpoint with no file on disk
      (a save commits its files before the state file names it, so that is
      damage, never an interrupted save); `state_problem` says which.
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
  state_problem: str = "does not parse"

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
  names = storage.listdir(directory)
  for name in names:
    m = _FILE.match(name)
    if m:
      files.setdefault(int(m.group(1)), []).append(name)
    elif _TEMP.match(name):
      leftovers.append(name)
    elif m := _SIDE.match(name):
      side.setdefault(int(m.group(1)), []).append(name)
  damaged = state is None and storage.exists(storage.join(directory, STATE_FILE))
  problem = "does not parse"
  if latest is not None and latest not in files:
    # It parses but lies: rebuilt from the files present, as a garbled one is.
    problem = f"names ckpt-{latest} as the latest, which has no file here"
    state, damaged, listed, latest = None, True, {}, None
  return Scan(
    state is not None,
    damaged,
    listed,
    latest,
    files,
    leftovers,
    side,
    ROLLBACK_FILE in names,
    problem,
  )


def verify(path: str) -> None:
  """Reads every tensor of the checkpoint at `path`, checksums included.

  Raises whatever TensorFlow raises for an unreadable checkpoint (a missing or
  truncated file, changed bytes). Independent of any model, so it tells a
  corrupt checkpoint from one written for a different model.
  """
  reader = open_reader(path)
  dtypes = reader.get_variable_to_dtype_map()
  names = sorted(dtypes)
  with tf.device("CPU:0"):
    tf.raw_ops.RestoreV2(
      prefix=path,
      tensor_names=names,
      shape_and_slices=[""] * len(names),
      dtypes=[dtypes[n] for n in names],
    )


def open_reader(path: str):
  """A reader of the checkpoint `path` (a prefix). Not `tf.train.load_checkpoint`,
  which first asks whether `path` is a directory: on `ram://` every prefix of
  a file name is one, and the checkpoint is then looked for inside it."""
  return tf.compat.v1.train.NewCheckpointReader(path)


def list_variables(path: str) -> list[tuple[str, list[int]]]:
  """(key, shape) of every variable in checkpoint `path`, sorted, as
  `tf.train.list_variables` returns them."""
  shapes = open_reader(path).get_variable_to_shape_map()
  return [(k, shapes[k]) for k in sorted(shapes)]


def load_variable(path: str, key: str):
  """The value of `key` in checkpoint `path` (`tf.train.load_variable`)."""
  return open_reader(path).get_tensor(key)


def index_readable(path: str) -> bool:
  """The index of checkpoint `path` exists and parses. TensorFlow writes it
  last, straight to its final name, after the data file is renamed into
  place: a save killed before it finished has none, or one cut short."""
  if not storage.exists(path + ".index"):
    return False
  try:
    list_variables(path)
  except Exception:  # noqa: BLE001 - any failure to parse it
    return False
  return True


def describe(e: BaseException) -> str:
  """One line from a TensorFlow error, without its function-node preamble."""
  text = re.sub(r"\{\{[^}]*\}\}\s*", "", str(e)).strip() or type(e).__name__
  text = text.splitlines()[0]
  if len(text) > 240:
    text = text[:237] + "..."
  return f"{type(e).__name__}: {text}"


def raise_io_error(directory: str, what: str, e: BaseException, *, write: bool) -> NoReturn:
  """Raises WorkdirError for an I/O fault (one line: path, cause, and that the
  last committed checkpoint is intact), or re-raises anything else."""
  fault = io_fault(e)
  if fault is None:
    raise e
  latest = None
  try:
    latest = scan(directory).latest if write else None
  except OSError:
    pass
  intact = (
    f"the last committed checkpoint ({path_of(directory, latest)}) is intact"
    if latest is not None
    else "no checkpoint was committed yet"
  )
  raise WorkdirError(
    f"{what}: {fault[1]}. Nothing committed was lost: {intact}; fix the cause and run "
    "the same command to resume."
  ) from e


# ------------------------------------------------------------ file changes


def remove(path: str) -> None:
  """Removes a file or a directory tree; one already gone is fine."""
  storage.remove(path)


def fsync_dir(directory: str) -> None:
  """Makes the renames and removals in `directory` durable (best effort)."""
  storage.fsync_dir(directory)


def atomic_write(path: str, text: str) -> None:
  """Replaces `path` with `text`: a reader (or a kill) sees the old file or
  the new one, never part of one (a rename locally, one put on an object
  store)."""
  storage.write(path, text)
