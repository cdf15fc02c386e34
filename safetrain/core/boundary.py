"""One policy for every failure, at the boundary where it happens.

safetrain does not keep a list of the errors it has seen; it knows where an
error crossed into its own code, and that decides the exit code:

- a user hook raised (`build_model`, `build_train_dataset`,
  `build_eval_dataset`, `build_optimizer`, `compute_loss` when traced or
  tried, `build_metrics`, `actions`, `callbacks` and the callables they
  return): `HookError`, exit 2, one line naming the hook and the exception's
  first line;
- a TensorFlow op failed inside the compiled loop and it is not a numerical
  incident (those the guard handles without an error): `LoopError`, exit 2,
  the op's message, the steps and data position, and the last checkpoint;
- any `OSError`: exit 2 naming the path (the one safetrain was working on,
  `working_on`, when the error carries none);
- safetrain's own errors (`ConfigError`, `BadInputError`, `PreflightError`,
  `WorkdirError`: exit 2; `DivergenceError`: exit 3) say what they say;
- anything else is a bug in safetrain: exit 1, one line saying so and where
  the traceback is.

The full traceback of every failure except a refusal (a workdir another run
holds or another experiment wrote, where safetrain writes nothing) goes to
`WORKDIR/log.txt`, never only to the terminal.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Iterator

from safetrain.core import errors

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 1, 2, 3, 143

# The hooks a Trainer subclass implements or overrides (hooks.py).
HOOKS = (
  "build_model",
  "build_train_dataset",
  "build_eval_dataset",
  "build_optimizer",
  "compute_loss",
  "build_metrics",
  "actions",
  "callbacks",
)


class HookError(Exception):
  """A user hook raised (exit code 2).

  Attributes:
    hook: the hook's name ("build_model", ...).
    error: the exception the hook raised (also `__cause__`).
  """

  def __init__(self, hook: str, error: BaseException, *, trainer: str | None = None):
    where = f"{trainer}.{hook}()" if trainer else f"{hook}()"
    super().__init__(f"{where} raised {type(error).__name__}: {first_line(error)}")
    self.hook = hook
    self.error = error


class LoopError(Exception):
  """A TensorFlow op failed inside the compiled loop, outside the guard's
  view (exit code 2). The loop's updates are not counted and nothing of the
  loop is saved: the last checkpoint is the resume point.

  Attributes:
    first_step, last_step: the steps the loop was making (1-based, inclusive).
    position: the data position (batches read) the loop started from.
    checkpoint_step: the step of the last committed checkpoint, or None.
  """

  def __init__(
    self,
    error: BaseException,
    *,
    first_step: int,
    last_step: int,
    position: int,
    checkpoint_step: int | None,
  ):
    steps = f"step {first_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
    intact = (
      f"the last checkpoint (step {checkpoint_step}) is intact"
      if checkpoint_step is not None
      else "no checkpoint was written yet"
    )
    super().__init__(
      f"a TensorFlow op failed in the training loop ({steps}, batches from data position "
      f"{position}): {type(error).__name__}: {op_message(error)}. Nothing of this loop was "
      f"saved and {intact}: fix the cause and run the same command to resume."
    )
    self.error = error
    self.first_step, self.last_step = first_step, last_step
    self.position = position
    self.checkpoint_step = checkpoint_step


# Errors safetrain raises itself, with a message already meant for the user:
# a hook that calls safetrain's code (the default build_optimizer) passes
# them on as they are.
OWN_ERRORS: tuple[type[BaseException], ...] = (
  errors.DivergenceError,
  errors.BadInputError,
  errors.ConfigError,
  errors.PreflightError,
  errors.WorkdirError,
  HookError,
  LoopError,
)


def call(hook: str, fn: Callable, *args, trainer: str | None = None, **kwargs):
  """`fn(*args, **kwargs)`, a user hook: any exception it raises, other than
  safetrain's own (`OWN_ERRORS`), becomes a HookError naming `hook`."""
  try:
    return fn(*args, **kwargs)
  except OWN_ERRORS:
    raise
  except Exception as e:  # noqa: BLE001 - whatever user code raises is the hook's failure
    raise remember(HookError(hook, e, trainer=trainer)) from e


def remember(error: HookError) -> HookError:
  """Keeps `error` for `unwrap` (it may be raised while TensorFlow traces)."""
  _raised.append(error)
  del _raised[:-4]
  return error


# The last HookErrors raised: one raised while TensorFlow traced a function
# (compute_loss in the compiled step) reaches the boundary as autograph's
# StagingError, which keeps its text but not the exception (`unwrap`).
_raised: list[HookError] = []


def unwrap(e: BaseException) -> BaseException:
  """The HookError behind `e` when `e` is TensorFlow's rewrap of one raised
  while tracing (its text holds the HookError's), else `e`."""
  if isinstance(e, HookError) or not _raised:
    return e
  text = str(e)
  for error in reversed(_raised):
    if f"HookError: {error}" in text:
      return error
  return e


def wrap(hook: str, fn: Callable, *, trainer: str | None = None) -> Callable:
  """`fn` with its calls made through `call(hook, ...)`."""

  def wrapped(*args, **kwargs):
    return call(hook, fn, *args, trainer=trainer, **kwargs)

  wrapped.__name__ = getattr(fn, "__name__", hook)
  wrapped.__wrapped__ = fn
  return wrapped


def first_line(e: BaseException) -> str:
  """The first non-empty line of an exception's text (its type's name if none)."""
  for line in str(e).splitlines():
    if line.strip():
      return line.strip()[:300]
  return type(e).__name__


def op_message(e: BaseException) -> str:
  """A TensorFlow op error's own message on one line, without the graph
  preamble ("Graph execution error:", "Detected at node ...", the stack)."""
  text = getattr(e, "message", None)
  text = text if isinstance(text, str) else str(e)
  keep = []
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith(("Graph execution error", "Detected at node", "File ", "[[")):
      continue
    if line.startswith(("<stack", "Stack trace")) or line.endswith(":") and " " not in line:
      continue
    keep.append(line)
  return (" ".join(keep) or first_line(e))[:400]


# ------------------------------------------------------------ I/O paths

_working_on: list[str] = []


@contextlib.contextmanager
def working_on(path: str) -> Iterator[None]:
  """Marks `path` as the file or directory safetrain is writing: an OSError
  raised inside that names no path (a failed flush or rename) gets it, so
  its message names a path."""
  _working_on.append(os.fspath(path))
  try:
    yield
  except OSError as e:
    if e.filename is None:
      e.filename = os.fspath(path)
    raise
  finally:
    _working_on.pop()


def current_path() -> str | None:
  """The innermost `working_on` path, or None."""
  return _working_on[-1] if _working_on else None


def io_path_and_cause(e: BaseException, fallback: str | None) -> tuple[str, str] | None:
  """(path, cause) when `e` is an OSError (any errno) or a TensorFlow error
  wrapping a file error; the path is the error's own, else the one safetrain
  was working on when it was raised, else `fallback`. None for other errors."""
  if isinstance(e, OSError):
    path = e.filename
    if path is None:
      path = fallback if fallback is not None else "?"
    cause = e.strerror or first_line(e)
    if e.filename2 is not None:
      cause = f"{cause} (and {os.fspath(e.filename2)})"
    return os.fspath(path), cause
  fault = errors.io_fault(e)
  if fault is None:
    return None
  path, cause = fault
  if path == "?" and fallback is not None:
    path = fallback
  return path, cause


# ------------------------------------------------------------- the policy


def refused(e: BaseException) -> bool:
  """Whether `e` refused the workdir (another run holds it, another
  experiment wrote it): then nothing may be written into it, log.txt neither."""
  return isinstance(e, errors.RefusedWorkdirError)


def outcome(e: BaseException, *, workdir: str | None) -> tuple[int, str]:
  """(exit code, the one line for the terminal) of an exception that ended a
  command, by the policy of this module. The line has no "safetrain: " prefix.
  """
  log = os.path.join(workdir, "log.txt") if workdir else "log.txt"
  e = unwrap(e)
  if isinstance(e, errors.DivergenceError):
    return EXIT_DIVERGED, f"diverged: {e.diagnosis}"
  if isinstance(e, OWN_ERRORS):
    return EXIT_USAGE, f"error: {e}"
  found = io_path_and_cause(e, current_path() or workdir)
  if found is not None:
    path, cause = found
    return EXIT_USAGE, (
      f"error: I/O error on {path}: {cause}. Nothing committed was lost"
      f"{_last_checkpoint_note(workdir)}; fix the cause and run the same command to resume "
      f"(traceback in {log})."
    )
  return EXIT_BUG, (
    f"internal error: a bug in safetrain: {type(e).__name__}: {first_line(e)}. "
    f"The traceback is in {log}; please report it with that file."
  )


def traceback_text(e: BaseException) -> str:
  """The full traceback of `e`, chained causes included."""
  return "".join(traceback.format_exception(type(e), e, e.__traceback__))


def _last_checkpoint_note(workdir: str | None) -> str:
  """ ": the last committed checkpoint (PATH) is intact", or "" if none."""
  if not workdir:
    return ""
  try:
    from safetrain.checkpoint import files  # noqa: PLC0415 - imports TensorFlow

    directory = os.path.join(workdir, "checkpoints")
    latest = files.scan(directory).latest
  except Exception:  # noqa: BLE001 - the note must not hide the error itself
    return ""
  if latest is None:
    return ""
  return f": the last committed checkpoint ({files.path_of(directory, latest)}) is intact"
