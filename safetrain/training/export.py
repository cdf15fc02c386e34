"""Getting the trained model out: `WORKDIR/export/model.keras`, and on request
a SavedModel for serving.

The Keras file holds the model only (architecture and weights, no optimizer
and no compile state), so `keras.saving.load_model` reads it in a process
that has neither safetrain nor the trainer's code, as long as the model is
made of Keras's own layers (a custom layer needs its class, as in any Keras
file). The SavedModel (`model.export`, `format="tf_saved_model"`) has a
`serve` endpoint and needs no Python code at all.

Every write is atomic: the model goes to a temporary name in the same
directory, is flushed to disk, and is then renamed over the target, so a kill
mid-export never leaves a half-written model where a good one was. A
temporary left by a killed export is removed by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging

from safetrain.storage import files as storage

EXPORT_DIR = "export"
FORMATS = ("keras", "saved_model")
_DEFAULT_NAMES = {"keras": "model.keras", "saved_model": "saved_model"}
# ".NAME.tmp-PID" (a SavedModel directory) or ".NAME.tmp-PID.keras".
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(\.keras)?$")


def default_path(workdir: str, fmt: str = "keras") -> str:
  """WORKDIR/export/model.keras, or WORKDIR/export/saved_model."""
  return os.path.join(workdir, EXPORT_DIR, _DEFAULT_NAMES[fmt])


def check_target(path: str, fmt: str) -> None:
  """Raises ValueError when `path` cannot take the format `fmt`."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
  if fmt == "keras" and not path.endswith(".keras"):
    raise ValueError(f"a Keras model file must end with .keras: {path}")
  if fmt == "saved_model" and storage.isfile(path):
    raise ValueError(f"a SavedModel is a directory, and {path} is a file")
  if fmt == "keras" and storage.isdir(path):
    raise ValueError(f"{path} is a directory, not a .keras file")


def export_model(model: keras.Model, path: str, fmt: str = "keras", input_signature=None) -> str:
  """Writes `model` to `path` atomically and returns `path`.

  Args:
    model: the model to write.
    path: a `.keras` file (fmt "keras") or a directory (fmt "saved_model").
    fmt: "keras" or "saved_model".
    input_signature: for a SavedModel whose inputs Keras cannot infer (a
      subclassed model): the `tf.TensorSpec` structure of one input.

  Raises:
    ValueError: `path` does not fit `fmt`.
    OSError: the write failed; what was at `path` is untouched.
  """
  if not storage.is_local(path) or storage.store_for(path).renames is False:
    return _export_to_objects(model, path, fmt, input_signature)
  path = os.path.abspath(path)
  check_target(path, fmt)
  directory, name = os.path.split(path)
  os.makedirs(directory, exist_ok=True)
  _remove_stale_temporaries(directory)
  tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
  try:
    if fmt == "keras":
      tmp += ".keras"
      _model_only(model).save(tmp)
      _fsync(tmp)
      os.replace(tmp, path)
    else:
      _export_saved_model(model, tmp, input_signature)
      for root, _, files in os.walk(tmp):
        for f in files:
          _fsync(os.path.join(root, f))
      _replace_directory(tmp, path)
    _fsync(directory)
  except BaseException:
    _remove(tmp)
    raise
  return path


def _export_to_objects(model: keras.Model, path: str, fmt: str, input_signature) -> str:
  """The export on a store without rename (any tf.io.gfile path): written
  locally first, then stored. A Keras file is one object, stored whole or not
  at all; a SavedModel is a directory of objects, copied in under a temporary
  name, then moved into place (on an object store a move is a copy and a
  delete: a kill mid-move leaves the temporary, which the next export removes)."""
  check_target(path, fmt)
  directory, name = storage.dirname(path), storage.basename(path)
  storage.makedirs(directory)
  with tempfile.TemporaryDirectory(prefix="safetrain-export-") as local:
    if fmt == "keras":
      tmp = os.path.join(local, name)
      _model_only(model).save(tmp)
      with open(tmp, "rb") as f:
        storage.write(path, f.read())
      return path
    tmp = os.path.join(local, name)
    _export_saved_model(model, tmp, input_signature)
    for old in storage.listdir(directory):
      if old.startswith(f".{name}.tmp-"):
        storage.remove(storage.join(directory, old))
    staged = storage.join(directory, f".{name}.tmp-{os.getpid()}")
    storage.copy_in(tmp, staged)
    storage.remove(path)
    storage.move(staged, path)
  return path


def _model_only(model: keras.Model) -> keras.Model:
  """`model`, or for a compiled model a copy without its optimizer and compile
  state (a Keras file of a compiled model holds both, and the optimizer's
  learning-rate schedule is safetrain's)."""
  if not getattr(model, "compiled", False):
    return model
  config = keras.saving.serialize_keras_object(model)
  config.pop("compile_config", None)
  copy = keras.saving.deserialize_keras_object(config)
  copy.set_weights(model.get_weights())
  return copy


def _export_saved_model(model: keras.Model, path: str, input_signature) -> None:
  try:
    model.export(path, format="tf_saved_model", verbose=False)
  except (ValueError, TypeError):
    if input_signature is None:
      raise
    _remove(path)
    model.export(path, format="tf_saved_model", verbose=False, input_signature=[input_signature])


def _replace_directory(new: str, path: str) -> None:
  """Puts directory `new` at `path`: atomically swapped with an existing one
  (renameat2 RENAME_EXCHANGE) where the file system can, else by two renames
  (between them, the previous export is at `.NAME.tmp-PID-old`, and the next
  export puts it back if a kill came between them)."""
  if not os.path.exists(path):
    os.rename(new, path)
    return
  if not _exchange(new, path):
    aside = new + "-old"
    os.rename(path, aside)
    os.rename(new, path)
    new = aside
  shutil.rmtree(new)  # now the previous export


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths atomically (Linux renameat2); False where unsupported."""
  libc_name = ctypes.util.find_library("c")
  if libc_name is None:
    return False
  libc = ctypes.CDLL(libc_name, use_errno=True)
  renameat2 = getattr(libc, "renameat2", None)
  if renameat2 is None:
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), b)


def _remove_stale_temporaries(directory: str) -> None:
  """Removes the temporaries of exports whose process is gone (killed), and
  puts back a previous SavedModel a killed two-rename replacement had set aside."""
  for entry in sorted(os.listdir(directory)):
    m = _TEMP.match(entry.removesuffix("-old"))
    if not m or _alive(int(m.group("pid"))):
      continue
    target = os.path.join(directory, m.group("name"))
    if entry.endswith("-old") and not os.path.exists(target):
      os.rename(os.path.join(directory, entry), target)
    else:
      _remove(os.path.join(directory, entry))


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return False  # this process has no export in flight while starting one
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove(path: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def input_spec(element_spec, unpack) -> object | None:
  """The `tf.TensorSpec` structure of the model input `x` of a training
  element spec, with an unknown batch size; None if it cannot be told."""
  try:
    x = unpack(element_spec)[0]
  except (ValueError, TypeError, KeyError, IndexError):
    return None
  return tf.nest.map_structure(lambda s: tf.TensorSpec([None, *s.shape[1:]], s.dtype), x)


def export_on_finish(export: Callable[[], str], workdir: str) -> str | None:
  """`export()` (WORKDIR/export/model.keras) at the end of a run; a failure
  is a warning, not a failed run: the final checkpoint holds the model, and
  `safetrain export WORKDIR` writes it once the cause is fixed."""
  try:
    return export()
  except Exception as e:  # noqa: BLE001 - the run itself succeeded
    logging.warning(
      "The model was not exported (%s: %s); the final checkpoint is intact, and "
      "`safetrain export %s` writes WORKDIR/export/model.keras from it.",
      type(e).__name__,
      str(e).strip().splitlines()[0] if str(e).strip() else "",
      workdir,
    )
    return None


def origin_of(cls: type) -> dict:
  """Where a Trainer class comes from, for `safetrain export` (config.json):
  the file of its module, and the experiment's :ARG (None: the command sets
  it). Not a script run as __main__: importing it again could train again."""
  module = sys.modules.get(cls.__module__)
  file = getattr(module, "__file__", None) if cls.__module__ != "__main__" else None
  return {"file": os.path.abspath(file) if file else None, "arg": None}
