"""Exceptions of safetrain. The command maps them to exit codes."""

from __future__ import annotations

import errno
import os
import re

from safetrain.core.config import ConfigError

__all__ = [
  "BadInputError",
  "ConfigError",
  "DivergenceError",
  "PreflightError",
  "RefusedWorkdirError",
  "WorkdirError",
]


class DivergenceError(RuntimeError):
  """The run diverged and recovery is spent (exit code 3).

  Attributes:
    diagnosis: one paragraph: what happened, where, how often, what was tried.
    step: the step at which the run stopped.
    last_healthy_checkpoint: path of the checkpoint left intact.
    incidents: the run's incident records.
  """

  def __init__(
    self,
    diagnosis: str,
    *,
    step: int = 0,
    last_healthy_checkpoint: str | None = None,
    incidents: list | None = None,
  ):
    super().__init__(diagnosis)
    self.diagnosis = diagnosis
    self.step = step
    self.last_healthy_checkpoint = last_healthy_checkpoint
    self.incidents = incidents or []


class BadInputError(ValueError):
  """A data batch or dataset is unusable (exit code 2). Nothing is lost: the
  last healthy state is checkpointed before this is raised."""


class PreflightError(ValueError):
  """guard.preflight = strict found problems before step 1 (exit code 2)."""


class WorkdirError(ValueError):
  """The workdir cannot be used (exit code 2): it holds checkpoints this run
  cannot use, another run holds it, or writing to it failed (disk full,
  read-only, a path too long). Nothing committed is lost: the last committed
  checkpoint is intact and the same command resumes once the cause is fixed."""


class RefusedWorkdirError(WorkdirError):
  """The workdir is not this run's to write (exit code 2): another run holds
  it, or another experiment wrote it. A refused run writes nothing into it:
  no log.txt lines, no event files, no records."""


# What TensorFlow's file errors say when a write fails for a reason outside
# the program: a full disk, a read-only or vanished filesystem, permissions, a path too long.
_IO_ERRNOS = {
  errno.ENOSPC,
  errno.EDQUOT,
  errno.EROFS,
  errno.EACCES,
  errno.EPERM,
  errno.ENAMETOOLONG,
  errno.EISDIR,
  errno.ENOTDIR,
  errno.EFBIG,
  errno.EIO,
  errno.ENOENT,
  errno.ESTALE,
}
_IO_TEXTS = tuple(os.strerror(n) for n in sorted(_IO_ERRNOS))


def io_fault(e: BaseException) -> tuple[str, str] | None:
  """(path, cause) when `e` is an I/O fault (any OSError, or a TensorFlow
  error that wraps one of the errnos below, as SaveV2 does on a full disk),
  else None."""
  if isinstance(e, OSError):
    # Any OSError: the OS refused something outside the program, whatever
    # its errno (a file where a directory must be, EEXIST, ELOOP, ...).
    path = e.filename if e.filename is not None else "?"
    return os.fspath(path), e.strerror or type(e).__name__
  message = getattr(e, "message", None)
  if not isinstance(message, str) or type(e).__module__.split(".")[0] != "tensorflow":
    return None
  # TensorFlow's file errors read "PATH; Cause" or "... PATH: Cause", with
  # "[Op:SaveV2]" or a function-node preamble around them.
  text = re.sub(r"\{\{[^}]*\}\}|\s*\[Op:[^\]]*\]", "", message).strip()
  text = text.splitlines()[0] if text else ""
  for cause in _IO_TEXTS:
    at = text.find(cause)
    if at < 0:
      continue
    head = text[:at].rstrip(" ;:,")
    m = re.search(r"(/[^\s;,']*|[^\s;,']*/[^\s;,']*)$", head)
    return (m.group(1) if m else head or "?"), cause
  return None


def one_line(e: BaseException, typed: bool = False) -> str:
  """An exception as one line for a message (the command's and `safetrain
  export`'s errors): its text on one line, or the last line of a wrapped
  traceback; with `typed`, prefixed by the exception's type."""
  text = str(e).strip()
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if len(lines) > 3:
    lines = lines[-1:]  # a wrapped traceback: its last line is the error
  text = " ".join(lines) or type(e).__name__
  return f"{type(e).__name__}: {text}" if typed else text
