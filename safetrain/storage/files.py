"""Every file operation on a workdir, on a local directory or any `tf.io.gfile` path.

A workdir may live where every host of a large run can reach it: a bucket
(`gs://`, `s3://` through tensorflow-io), a shared filesystem, or TensorFlow's
in-memory `ram://`. safetrain's own files (records, config.json, the lock, the
repair's moves, the export) go through this module, which picks a store by
the path:

- a local path (no scheme, or `file://`): `Posix`, today's guarantees: a write
  replaces the file by rename after an fsync, an append is one `write` of
  whole lines, nothing is ever written through a symbolic link (O_NOFOLLOW),
  and the lock is `flock`;
- any other scheme: `Objects`, through `tf.io.gfile`, assuming no more than an
  object store gives: a single object written whole or not at all. There is no
  rename (a write is that one put), no append (the object is rewritten whole),
  no lock (a lease file instead, see lock.py), and a move is a copy, then a
  delete.

`SAFETRAIN_STORE=objects` in the environment makes a local workdir behave as
an object store (`LocalObjects`: rename and locks refused, a write one atomic
put): the drills use it to exercise the rename-free path across processes,
and it suits a shared filesystem whose `flock` cannot be trusted (NFS).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat as stat_lib
import uuid

from safetrain.core.errors import RefusedWorkdirError

STORE_ENV = "SAFETRAIN_STORE"


class _LazyGfile:
  """tf.io.gfile, imported on first use: a local workdir (and `safetrain
  report` on one) never pays for importing TensorFlow here."""

  def __getattr__(self, name):
    import tensorflow as tf  # noqa: PLC0415

    return getattr(tf.io.gfile, name)


_gfile = _LazyGfile()


def _as_os_error(e: Exception, path: str) -> OSError:
  """A TensorFlow file error as the OSError the local store would raise, so
  callers handle one family (a missing object is FileNotFoundError)."""
  import tensorflow as tf  # noqa: PLC0415

  codes = {
    tf.errors.NotFoundError: errno.ENOENT,
    tf.errors.PermissionDeniedError: errno.EACCES,
    tf.errors.ResourceExhaustedError: errno.ENOSPC,
    tf.errors.AlreadyExistsError: errno.EEXIST,
    tf.errors.FailedPreconditionError: errno.ENOTDIR,
  }
  code = next((c for t, c in codes.items() if isinstance(e, t)), errno.EIO)
  message = getattr(e, "message", str(e)).splitlines()[0] if str(e) else type(e).__name__
  err = OSError(code, f"{os.strerror(code)} ({message})", path)
  return err


class _Translated:
  """Wraps each public method of a gfile store so its TensorFlow errors are OSErrors."""

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    for name, fn in list(vars(cls).items()):
      if name.startswith("_") or not callable(fn):
        continue
      cls_fn = fn

      def wrapped(self, path, *args, _fn=cls_fn):
        import tensorflow as tf  # noqa: PLC0415

        try:
          return _fn(self, path, *args)
        except tf.errors.OpError as e:
          raise _as_os_error(e, path) from e

      wrapped.__name__ = name
      wrapped.__doc__ = fn.__doc__
      setattr(cls, name, wrapped)


def is_local(path: str) -> bool:
  """Whether `path` is on the local filesystem (no scheme, or `file://`)."""
  return "://" not in os.fspath(path) or os.fspath(path).startswith("file://")


def _local(path: str) -> str:
  path = os.fspath(path)
  return path[len("file://") :] if path.startswith("file://") else path


def join(*parts: str) -> str:
  """Joins path parts with "/" (a URL's scheme is kept)."""
  return os.path.join(*parts)


def dirname(path: str) -> str:
  """The directory part of `path`."""
  return os.path.dirname(os.fspath(path).rstrip("/"))


def basename(path: str) -> str:
  """The last part of `path`."""
  return os.path.basename(os.fspath(path).rstrip("/"))


def link_error(path: str) -> RefusedWorkdirError:
  """The one-line refusal of a workdir entry that is a symbolic link."""
  try:
    target = os.readlink(_local(path))
  except OSError:
    target = "?"
  return RefusedWorkdirError(
    f"{path} is a symbolic link (to {target}): safetrain never writes through a link. "
    "Remove the link, or use another --workdir."
  )


def wrong_type_error(path: str, want: str) -> RefusedWorkdirError:
  """The one-line refusal of a path that exists with the wrong type."""
  have = "a directory" if want == "file" else "a file"
  return RefusedWorkdirError(
    f"{path} is {have} where safetrain keeps a {want}: move it away, or use another "
    "--workdir. Nothing was changed."
  )


class Posix:
  """A local directory: atomic rename, fsync, flock, O_NOFOLLOW."""

  name = "posix"
  renames = True
  locks = True

  def exists(self, path: str) -> bool:
    return os.path.lexists(_local(path))

  def isdir(self, path: str) -> bool:
    return os.path.isdir(_local(path))

  def islink(self, path: str) -> bool:
    return os.path.islink(_local(path))

  def listdir(self, path: str) -> list[str]:
    return sorted(os.listdir(_local(path)))

  def makedirs(self, path: str) -> None:
    os.makedirs(_local(path), exist_ok=True)

  def size(self, path: str) -> int:
    return os.path.getsize(_local(path))

  def mtime(self, path: str) -> float:
    return os.path.getmtime(_local(path))

  def read(self, path: str) -> bytes:
    fd = os.open(_local(path), os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
      return f.read()

  def write(self, path: str, data: bytes) -> None:
    """Replaces `path` by rename after an fsync: a reader or a kill sees the
    old file or the new one. A link at `path` is replaced, never followed."""
    path = _local(path)
    tmp = f"{path}.tmp{uuid.uuid4().hex}"
    try:
      fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
      try:
        _write_all(fd, data, path)
        os.fsync(fd)
      finally:
        os.close(fd)
      self._check_not_dir(path)
      os.replace(tmp, path)
    except BaseException:
      _quiet_remove(tmp)
      raise
    fsync_dir(os.path.dirname(path) or ".")

  def _check_not_dir(self, path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
      raise wrong_type_error(path, "file")

  def append(self, path: str, data: bytes, durable: bool = True) -> None:
    """One `write` of whole lines, then fsync (a kill never tears a line)."""
    path = _local(path)
    try:
      fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise link_error(path) from None
      if e.errno == errno.EISDIR:
        raise wrong_type_error(path, "file") from None
      raise
    try:
      _write_all(fd, data, path)
      if durable:
        os.fsync(fd)
    finally:
      os.close(fd)

  def truncate(self, path: str, size: int) -> None:
    fd = os.open(_local(path), os.O_WRONLY | os.O_NOFOLLOW)
    try:
      os.ftruncate(fd, size)
      os.fsync(fd)
    finally:
      os.close(fd)

  def remove(self, path: str) -> None:
    path = _local(path)
    try:
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    except FileNotFoundError:
      pass

  def move(self, src: str, dst: str) -> None:
    os.replace(_local(src), _local(dst))

  def rename(self, src: str, dst: str) -> None:
    os.rename(_local(src), _local(dst))

  def sync(self, path: str) -> None:
    """Flushes a file, or every file under a directory, to disk."""
    path = _local(path)
    if os.path.isdir(path):
      for root, _, names in os.walk(path):
        for n in names:
          _fsync_path(os.path.join(root, n))
    else:
      _fsync_path(path)
    fsync_dir(os.path.dirname(path) or ".")


class Objects(_Translated):
  """Any `tf.io.gfile` path, as an object store: a single object is written
  whole or not at all, and that is all that is assumed."""

  name = "objects"
  renames = False
  locks = False

  def exists(self, path: str) -> bool:
    # By the parent's listing: on ram:// (and some object stores) every prefix
    # of a name "exists" as a directory, so `ckpt-1` would exist beside `ckpt-10.index`.
    parent, name = dirname(path), basename(path)
    if "://" not in parent or parent.endswith(":"):
      return _gfile.exists(path)
    try:
      return name in self.listdir(parent)
    except OSError:
      return False

  def isdir(self, path: str) -> bool:
    return self.exists(path) and _gfile.isdir(path)

  def islink(self, path: str) -> bool:
    del path
    return False

  def listdir(self, path: str) -> list[str]:
    return sorted(n.rstrip("/") for n in _gfile.listdir(path))

  def makedirs(self, path: str) -> None:
    _gfile.makedirs(path)

  def size(self, path: str) -> int:
    return _gfile.stat(path).length

  def mtime(self, path: str) -> float:
    return _gfile.stat(path).mtime_nsec / 1e9

  def read(self, path: str) -> bytes:
    with _gfile.GFile(path, "rb") as f:
      return f.read()

  def write(self, path: str, data: bytes) -> None:
    if self.isdir(path):
      raise wrong_type_error(path, "file")
    if path.startswith("ram://") and _gfile.exists(path):
      # ram:// writes over an old file without truncating it (a longer old
      # file keeps its tail). In memory a kill loses everything anyway, so
      # deleting first costs no atomicity; an object store's put replaces.
      _gfile.remove(path)
    with _gfile.GFile(path, "wb") as f:
      f.write(data)

  def append(self, path: str, data: bytes, durable: bool = True) -> None:
    """No append on an object store: the object is rewritten whole, so a
    reader sees it with or without the new lines, never part of one."""
    del durable  # a closed object is stored
    old = self.read(path) if self.exists(path) else b""
    self.write(path, old + data)

  def truncate(self, path: str, size: int) -> None:
    self.write(path, self.read(path)[:size])

  def remove(self, path: str) -> None:
    if not _gfile.exists(path):
      return
    if _gfile.isdir(path):
      _gfile.rmtree(path)
    else:
      _gfile.remove(path)

  def move(self, src: str, dst: str) -> None:
    """A copy, then a delete: a kill between them leaves both, never neither."""
    if _gfile.isdir(src):
      for root, _, names in _gfile.walk(src):
        rel = os.path.relpath(root, src) if root != src else ""
        _gfile.makedirs(join(dst, rel) if rel else dst)
        for n in names:
          _gfile.copy(join(root, n), join(dst, rel, n) if rel else join(dst, n), True)
    else:
      _gfile.copy(src, dst, overwrite=True)
    self.remove(src)

  def rename(self, src: str, dst: str) -> None:
    raise OSError(errno.ENOTSUP, "this store has no rename", src)

  def sync(self, path: str) -> None:
    del path  # a closed object is stored


class LocalObjects(Objects):
  """A local directory that behaves as an object store (`SAFETRAIN_STORE=objects`):
  a write is one atomic put (emulated by a private rename), and callers get no
  rename and no lock. The test store of the rename-free commit protocol."""

  name = "local-objects"

  def write(self, path: str, data: bytes) -> None:
    Posix().write(path, data)  # the atomic put an object store gives

  def islink(self, path: str) -> bool:
    return os.path.islink(_local(path))

  # A local directory answers these itself (and faster than gfile).
  exists = Posix.exists
  isdir = Posix.isdir
  listdir = Posix.listdir
  makedirs = Posix.makedirs


_POSIX = Posix()
_OBJECTS = Objects()
_LOCAL_OBJECTS = LocalObjects()


def store_for(path: str) -> Posix | Objects:
  """The store that serves `path`."""
  if not is_local(path):
    return _OBJECTS
  if os.environ.get(STORE_ENV, "") == "objects":
    return _LOCAL_OBJECTS
  return _POSIX


# ---------------------------------------------------------------- helpers


def exists(path: str) -> bool:
  """Whether `path` exists (a dangling link counts)."""
  return store_for(path).exists(path)


def isdir(path: str) -> bool:
  """Whether `path` is a directory."""
  return store_for(path).isdir(path)


def isfile(path: str) -> bool:
  """Whether `path` exists and is not a directory."""
  s = store_for(path)
  return s.exists(path) and not s.isdir(path)


def islink(path: str) -> bool:
  """Whether `path` is a symbolic link (never on an object store)."""
  return store_for(path).islink(path)


def listdir(path: str) -> list[str]:
  """The names in directory `path`, sorted; [] when it does not exist."""
  s = store_for(path)
  if not s.isdir(path):
    return []
  return s.listdir(path)


def makedirs(path: str) -> None:
  """Creates directory `path` and its parents; one that exists is fine.

  Raises:
    WorkdirError: `path`, or a directory above it, exists and is a file or
      a link (named in the message).
  """
  s = store_for(path)
  if s.isdir(path) and not s.islink(path):
    return
  probe = path
  while probe and probe != dirname(probe):
    if s.islink(probe) and not s.isdir(probe):
      raise link_error(probe)
    if s.exists(probe) and not s.isdir(probe):
      raise wrong_type_error(probe, "directory")
    if s.isdir(probe):
      break
    probe = dirname(probe)
  s.makedirs(path)


def size(path: str) -> int:
  """The size of file `path` in bytes."""
  return store_for(path).size(path)


def mtime(path: str) -> float:
  """The modification time of `path` (seconds; 0 where the store keeps none)."""
  return store_for(path).mtime(path)


def read_bytes(path: str) -> bytes:
  """The bytes of file `path`."""
  return store_for(path).read(path)


def read_text(path: str) -> str:
  """The text of file `path` (UTF-8; undecodable bytes replaced)."""
  return read_bytes(path).decode("utf-8", errors="replace")


def write(path: str, data: bytes | str) -> None:
  """Replaces file `path` with `data` atomically: a reader, or a kill, sees
  the old content or the new, never part of one; never through a link."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  store_for(path).write(path, data)


def append(path: str, data: bytes | str, *, durable: bool = True) -> None:
  """Appends whole lines to `path` (created if missing), fsynced when `durable`."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  store_for(path).append(path, data, durable)


def truncate(path: str, size_: int) -> None:
  """Cuts file `path` to `size_` bytes."""
  store_for(path).truncate(path, size_)


def remove(path: str) -> None:
  """Removes a file or a directory tree (a link itself, never its target);
  one already gone is fine."""
  store_for(path).remove(path)


def move(src: str, dst: str) -> None:
  """Moves `src` to `dst`, replacing a file there: a rename where the store
  has one, else a copy, then a delete."""
  store_for(src).move(src, dst)


def copy_in(local: str, dst: str) -> None:
  """Copies a local file or directory tree to `dst` on any store (by copies:
  no rename), replacing what is there file by file."""
  _OBJECTS.move(local, dst)


def sync(path: str) -> None:
  """Makes file `path` (or every file under a directory) durable."""
  store_for(path).sync(path)


def fsync_dir(directory: str) -> None:
  """Makes the renames and removals in a local `directory` durable (best
  effort; nothing to do on an object store)."""
  if not is_local(directory):
    return
  try:
    fd = os.open(_local(directory), os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def lstat_mode(path: str) -> int | None:
  """The st_mode of a local `path` without following a link, or None."""
  try:
    return os.lstat(_local(path)).st_mode
  except OSError:
    return None


def is_link_mode(mode: int | None) -> bool:
  """Whether `mode` (from `lstat_mode`) is a symbolic link's."""
  return mode is not None and stat_lib.S_ISLNK(mode)


def _write_all(fd: int, data: bytes, path: str) -> None:
  try:
    while data:  # a short write (disk full, a signal) continues, never tears
      data = data[os.write(fd, data) :]
  except OSError as e:
    if e.filename is None:  # os.write's errors name no file: name ours
      e.filename = path
    raise


def _fsync_path(path: str) -> None:
  fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _quiet_remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass
