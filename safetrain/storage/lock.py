"""One run per workdir: an OS lock on WORKDIR/.lock, or a lease where there is none.

Two runs writing one workdir (a double launch, a second terminal, a scheduler
that retried too early) would interleave their records and checkpoints and
take each other's half-written saves for damage. `Trainer.fit()` therefore
holds the workdir for the life of the run, in one of two ways:

- **flock** (a local directory, `storage.locking=auto`): an exclusive
  `fcntl.flock` on `WORKDIR/.lock`. The kernel releases it when the process
  ends, however it ends (kill -9), so there is never a stale lock; the pid
  written into the file only names the holder in the message.
- **a lease** (any other store, which has no lock: a bucket, `ram://`; or
  `storage.locking=lease`, for a shared filesystem whose flock cannot be
  trusted): `WORKDIR/.lock` holds an owner (a random id, pid, host) and an
  expiry `storage.lease_seconds` ahead, rewritten every third of that by a
  thread of the running job. Another run is refused while the lease is live,
  with a message naming its owner; an expired lease (its job died without
  releasing it), or one whose pid is gone on this very host, is taken over
  with a warning. Without a conditional write, two runs starting within a
  few milliseconds could both write a lease: each reads it back after a
  pause and only the one whose id it holds goes on; a renewal that finds
  another owner's id marks the lease lost and logs an error.

Before either, the workdir's own entries are checked: a symbolic link, or a
file where safetrain keeps a directory (or the reverse), is refused with one
line naming it, so nothing is ever written through a link (the lock file
itself is opened with O_NOFOLLOW).

In a multi-worker run only the chief, the one process that writes the
workdir, takes the lock: the other workers read it and must not be refused.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from safetrain.core.errors import RefusedWorkdirError, WorkdirError
from safetrain.storage import files as storage

LOCK_FILE = ".lock"

# The workdir's entries and what each must be (see docs/workdir.md). An entry
# that exists as a link or as the other type is refused before anything is
# written; `checkpoints/corrupt` is repaired instead (repair.py sets it aside).
ENTRIES = {
  "config.json": "file",
  "log.txt": "file",
  "metrics.jsonl": "file",
  "incidents.jsonl": "file",
  "quarantine.jsonl": "file",
  "report.png": "file",
  LOCK_FILE: "file",
  "checkpoints": "directory",
  "checkpoints/checkpoint": "file",
  "checkpoints/rollback.json": "file",
  "events": "directory",
  "events/train": "directory",
  "events/eval": "directory",
  "export": "directory",
}


class WorkdirInUseError(RefusedWorkdirError):
  """Another process holds the workdir's lock (exit code 2).

  Attributes:
    workdir: the workdir.
    holder: the pid of the process holding the lock, or None if unknown.
  """

  def __init__(self, message: str, *, workdir: str, holder: int | None):
    super().__init__(message)
    self.workdir = workdir
    self.holder = holder


def check_entries(workdir: str) -> None:
  """Refuses a workdir whose own entries are links, or of the wrong type.

  Raises:
    WorkdirError: one line naming the entry (nothing was written).
  """
  for name, want in ENTRIES.items():
    path = storage.join(workdir, name)
    if storage.islink(path):
      raise storage.link_error(path)
    if not storage.exists(path):
      continue
    if storage.isdir(path) != (want == "directory"):
      raise storage.wrong_type_error(path, want)


class WorkdirLock:
  """An exclusive, non-blocking hold on `workdir`, until `release()`.

  Args:
    workdir: the run's directory (created if missing).
    mode: "auto" (flock where the store has it, else a lease), "flock" or
      "lease" (`storage.locking`).
    lease_seconds: a lease's life without renewal (`storage.lease_seconds`).
  """

  def __init__(self, workdir: str, *, mode: str = "auto", lease_seconds: float = 60.0):
    self.workdir = os.fspath(workdir)
    self.path = storage.join(self.workdir, LOCK_FILE)
    self.mode = mode
    self.lease_seconds = float(lease_seconds)
    self._fd: int | None = None
    self._lease: _Lease | None = None

  @classmethod
  def from_config(cls, workdir: str, config) -> WorkdirLock:
    """The lock `config.storage` asks for."""
    return cls(workdir, mode=config.storage.locking, lease_seconds=config.storage.lease_seconds)

  @property
  def held(self) -> bool:
    return self._fd is not None or self._lease is not None

  @property
  def kind(self) -> str:
    """ "flock" or "lease": how this workdir is held."""
    if self.mode != "auto":
      return self.mode
    return "flock" if storage.store_for(self.workdir).locks else "lease"

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirInUseError naming the holder.

    Raises:
      WorkdirInUseError: another process holds the lock.
      WorkdirError: an entry of the workdir is a link or of the wrong type,
        or the lock file cannot be created (the workdir is not writable).
    """
    if self.held:
      return
    try:
      storage.makedirs(self.workdir)
    except OSError as e:
      raise WorkdirError(
        f"cannot lock --workdir={self.workdir}: {e.strerror or e} ({self.path})"
      ) from None
    check_entries(self.workdir)
    if self.kind == "flock":
      if not storage.store_for(self.workdir).locks:
        raise WorkdirError(
          f"storage.locking=flock needs a local --workdir with locks; {self.workdir} has none "
          "(use storage.locking=auto or lease)"
        )
      self._acquire_flock()
    else:
      self._lease = _Lease(self.workdir, self.path, self.lease_seconds)
      try:
        self._lease.acquire()
      except BaseException:
        self._lease = None
        raise

  def _acquire_flock(self) -> None:
    import fcntl  # noqa: PLC0415 - POSIX only, and only for this lock

    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise storage.link_error(self.path) from None
      raise WorkdirError(
        f"cannot lock --workdir={self.workdir}: {e.strerror or e} ({self.path})"
      ) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(
          f"cannot lock --workdir={self.workdir}: {e.strerror or e} ({self.path})"
        ) from None
      holder, host = self._holder()
      who = f"pid {holder}" if holder is not None else "another process"
      if host and host != socket.gethostname():
        who += f" on {host}"
      raise WorkdirInUseError(
        f"--workdir={self.workdir} is in use by another safetrain run ({who} holds "
        f"{self.path}). Wait for it to finish or stop it, or use another --workdir; "
        "nothing was changed.",
        workdir=self.workdir,
        holder=holder,
      ) from None
    # Who holds it, for the message another run prints. Written after the
    # lock is taken, so only the holder ever writes the file.
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (info + "\n").encode(), 0)
    except OSError:
      pass  # the lock itself is what counts
    self._fd = fd

  def release(self) -> None:
    """Releases the lock. A flock's file stays (removing it would race a
    waiter); a lease still ours is deleted."""
    if self._lease is not None:
      lease, self._lease = self._lease, None
      lease.release()
    if self._fd is None:
      return
    import fcntl  # noqa: PLC0415

    fd, self._fd = self._fd, None
    try:
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  @property
  def lost(self) -> bool:
    """A lease whose renewal found another owner's id (never for flock)."""
    return self._lease is not None and self._lease.lost

  def _holder(self) -> tuple[int | None, str | None]:
    """The pid and host written by the holder (retried briefly: it writes
    them just after taking the lock)."""
    for _ in range(20):
      info = _read_info(self.path)
      if isinstance(info, dict) and isinstance(info.get("pid"), int):
        return info["pid"], info.get("host")
      time.sleep(0.02)
    return None, None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> bool:
    self.release()
    return False


def _read_info(path: str) -> dict | None:
  try:
    info = json.loads(storage.read_text(path) or "null")
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def _pid_gone(pid: object) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except OSError:
    return False
  return False


class _Lease:
  """The lease on `path`: written, confirmed, renewed by a thread, released."""

  def __init__(self, workdir: str, path: str, seconds: float):
    self.workdir = workdir
    self.path = path
    self.seconds = seconds
    self.owner = uuid.uuid4().hex
    self.lost = False
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _record(self) -> str:
    now = time.time()
    return (
      json.dumps(
        {
          "owner": self.owner,
          "pid": os.getpid(),
          "host": socket.gethostname(),
          "time": now,
          "expires": now + self.seconds,
          "lease_seconds": self.seconds,
        }
      )
      + "\n"
    )

  def _refuse(self, info: dict, now: float) -> WorkdirInUseError:
    pid, host = info.get("pid"), info.get("host")
    who = f"pid {pid}" if isinstance(pid, int) else "another process"
    if host:
      who += f" on {host}"
    left = max(0.0, float(info.get("expires", now)) - now)
    return WorkdirInUseError(
      f"--workdir={self.workdir} is in use by another safetrain run ({who} holds the lease "
      f"{self.path}, renewed {now - float(info.get('time', now)):.0f} s ago; it expires in "
      f"{left:.0f} s unless renewed). Wait for it to finish or stop it, or use another "
      "--workdir; nothing was changed.",
      workdir=self.workdir,
      holder=pid if isinstance(pid, int) else None,
    )

  def acquire(self) -> None:
    now = time.time()
    info = _read_info(self.path)
    if info is not None and info.get("owner") != self.owner:
      expires = info.get("expires")
      same_host = info.get("host") == socket.gethostname()
      dead = same_host and _pid_gone(info.get("pid"))
      live = isinstance(expires, (int, float)) and expires > now and not dead
      if live:
        raise self._refuse(info, now)
      why = "its process is gone" if dead else "it expired"
      logging.warning(
        "taking over the lease %s of pid %s on %s: %s",
        self.path,
        info.get("pid"),
        info.get("host"),
        why,
      )
    try:
      storage.write(self.path, self._record())
    except OSError as e:
      raise WorkdirError(
        f"cannot lock --workdir={self.workdir}: {e.strerror or e} ({self.path})"
      ) from None
    # No conditional write: a run that wrote its lease just after ours would
    # have overwritten it. Read back after a pause longer than a write takes;
    # only the run whose id is there goes on.
    time.sleep(min(0.2, self.seconds / 10))
    info = _read_info(self.path)
    if info is None or info.get("owner") != self.owner:
      raise self._refuse(info or {}, time.time())
    self._thread = threading.Thread(target=self._renew, name="safetrain-lease", daemon=True)
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.seconds / 3):
      info = _read_info(self.path)
      if info is not None and info.get("owner") != self.owner:
        self.lost = True
        logging.error(
          "the lease %s is held by pid %s on %s now: another run took over this workdir "
          "(this one was not renewed for %.0f s)",
          self.path,
          info.get("pid"),
          info.get("host"),
          self.seconds,
        )
        return
      try:
        storage.write(self.path, self._record())
      except OSError as e:  # the next renewal tries again
        logging.warning("cannot renew the lease %s: %s", self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    info = _read_info(self.path)
    if info is not None and info.get("owner") == self.owner:
      try:
        storage.remove(self.path)
      except OSError as e:
        logging.warning("cannot remove the lease %s: %s", self.path, e)


def is_chief_process(strategy_name: str, tf_config: str | None = None) -> bool:
  """Whether this process writes the workdir, decided before any TensorFlow
  work, from `distribute.strategy` and TF_CONFIG (as `distribute.is_chief`
  decides it once the strategy exists)."""
  if strategy_name != "multi_worker":
    return True
  raw = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
  try:
    spec = json.loads(raw) if raw else {}
  except ValueError:
    return True
  task = spec.get("task") or {}
  cluster = spec.get("cluster") or {}
  task_type, index = task.get("type"), task.get("index", 0)
  if task_type is None or task_type == "chief":
    return True
  return task_type == "worker" and int(index) == 0 and "chief" not in cluster
