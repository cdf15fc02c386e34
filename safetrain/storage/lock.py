"""One run per workdir: an exclusive OS lock on WORKDIR/.lock.

Two runs writing one workdir (a double launch, a second terminal, a scheduler
that retried too early) would interleave their records and checkpoints and
take each other's half-written saves for damage. `Trainer.fit()` therefore
holds an exclusive `fcntl.flock` on `WORKDIR/.lock` for the life of the run.
The kernel releases it when the process ends, however it ends (kill -9, power
loss of the client), so there is never a stale lock to clean up by hand; the
pid written into the file is only read to name the holder in the message.

In a multi-worker run only the chief, the one process that writes the
workdir, takes the lock: the other workers read it and must not be refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from safetrain.core.errors import RefusedWorkdirError, WorkdirError

LOCK_FILE = ".lock"


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


class WorkdirLock:
  """An exclusive, non-blocking lock on `workdir`, held until `release()`.

  Args:
    workdir: the run's directory (created if missing).
  """

  def __init__(self, workdir: str):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirInUseError naming the holder's pid.

    Raises:
      WorkdirInUseError: another process holds the lock.
      WorkdirError: the lock file cannot be created (the workdir is not
        writable).
    """
    if self._fd is not None:
      return
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
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
    """Releases the lock (the file stays: removing it would race a waiter)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def _holder(self) -> tuple[int | None, str | None]:
    """The pid and host written by the holder (retried briefly: it writes
    them just after taking the lock)."""
    for _ in range(20):
      try:
        with open(self.path, encoding="utf-8") as f:
          info = json.loads(f.read() or "null")
        if isinstance(info, dict) and isinstance(info.get("pid"), int):
          return info["pid"], info.get("host")
      except (OSError, ValueError):
        pass
      time.sleep(0.02)
    return None, None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> bool:
    self.release()
    return False


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
