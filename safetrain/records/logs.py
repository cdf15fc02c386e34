"""What the `safetrain` command shows on the terminal, and `WORKDIR/log.txt`.

The terminal gets what a person reads during a run: one short line per
incident (step, kind, action, learning-rate scale), the full diagnosis once
per distinct cause (two diagnoses that differ only in their numbers are one
cause), the progress line, warnings (safetrain's as "safetrain: warning: ...",
other libraries' and errors in absl's format), and the summary (the command
prints it). Every log line, with absl's prefixes, goes to `WORKDIR/log.txt`
(appended across resumes): the full incident lines, the INFO lines (saves,
resumes, budget refills, progress), the library warnings. With `-v`
(`--verbose`) or `--alsologtostderr` the terminal shows every line as absl
prints it, as before, and no short lines; so does a non-chief worker of a
multi-worker run, which writes no log.txt.

Library code marks the records meant for the short terminal form: an
incident carries `extra={INCIDENT: record}` (incidents.py), the progress
line `extra={TERMINAL: True}` (metrics.py).
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import sys
import tempfile

from absl import logging

from safetrain.storage import files as storage

INCIDENT = "safetrain_incident"
TERMINAL = "safetrain_terminal"
LOG_FILE = "log.txt"

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


class _TerminalFilter(std_logging.Filter):
  """On absl's stderr handler: warnings and errors, not incidents (their
  short form is printed instead), no INFO."""

  def filter(self, record) -> bool:
    if hasattr(record, INCIDENT) or hasattr(record, TERMINAL) or _own_warning(record):
      return False
    return record.levelno >= std_logging.WARNING


def _own_warning(record) -> bool:
  """A warning safetrain itself logged (shown as "safetrain: warning: ...");
  errors and other libraries' warnings keep absl's format."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
  return record.levelno == std_logging.WARNING and os.path.abspath(record.pathname).startswith(
    package
  )


class _ShortLines(std_logging.Handler):
  """Prints incidents in short, each cause's diagnosis once, and the
  progress line, to stderr."""

  def __init__(self):
    super().__init__(std_logging.INFO)
    self.causes: set[tuple[str, str]] = set()

  def emit(self, record) -> None:
    incident = getattr(record, INCIDENT, None)
    if incident is not None:
      text = self.incident_lines(incident)
    elif getattr(record, TERMINAL, False):
      text = f"safetrain: {record.getMessage()}"
    elif _own_warning(record):
      text = f"safetrain: warning: {record.getMessage()}"
    else:
      return
    sys.stderr.write(text + "\n")
    sys.stderr.flush()

  def incident_lines(self, r: dict) -> str:
    line = f"safetrain: {short_line(r)}"
    diagnosis = (r.get("diagnosis") or "").strip()
    # An abort's diagnosis is what the command prints as it exits.
    if not diagnosis or r.get("action") == "abort":
      return line
    cause = (r.get("kind", ""), _NUMBER.sub("#", diagnosis))
    if cause in self.causes:
      return line + " (diagnosis as above)"
    self.causes.add(cause)
    return f"{line}\n  {diagnosis}"


class _Nothing(std_logging.Filter):
  def filter(self, record) -> bool:
    return False


class _Stderr(std_logging.Handler):
  """Every line in absl's format on the current sys.stderr."""

  def __init__(self):
    super().__init__(std_logging.INFO)
    self.setFormatter(logging.PythonFormatter())

  def emit(self, record) -> None:
    sys.stderr.write(self.format(record) + "\n")


def short_line(r: dict) -> str:
  """ "step 4: nonfinite_loss -> rollback to step 0, lr scale 1 -> 0.5" """
  text = f"step {r['step']}: {r['kind']} -> {r['action']}"
  if r.get("restored_step") is not None:
    text += f" to step {r['restored_step']}"
  if r.get("count", 1) != 1:
    text += f" ({r['count']}x, last at step {r.get('last_step')})"
  before, after = r.get("lr_scale_before"), r.get("lr_scale_after")
  if before is not None:
    text += f", lr scale {before:.4g}"
    if after is not None and after != before:
      text += f" -> {after:.4g}"
  return text


class NativeStartup:
  """Holds back TensorFlow's C++ start-up lines from the terminal.

  While TensorFlow loads, its C++ code writes to file descriptor 2 before
  absl's logging is initialised, whatever TF_CPP_MIN_LOG_LEVEL says: the
  oneDNN notice, "Could not find cuda drivers", and, when the GPU platform
  is first probed, `E0000 ... failed call to cuInit` on a machine without a
  GPU, which reads as a failure before safetrain has said anything. Inside
  this context fd 2 goes to a temporary file, while Python's `sys.stderr`
  (when it is fd 2) writes to the terminal as before; afterwards `text` holds
  what was captured, for `command_logging(preamble=...)` to put in log.txt.
  Only the start-up is captured: later TensorFlow errors reach the terminal.
  """

  def __init__(self):
    self.text = ""
    self._saved = None

  def __enter__(self) -> NativeStartup:
    try:
      sys.stderr.flush()
      saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
      return self  # no fd 2 to capture (a closed stderr): nothing to hold back
    self._saved, self._file = saved, tempfile.TemporaryFile()
    self._stderr = None
    try:
      own = sys.stderr.fileno() == 2
    except (OSError, ValueError, AttributeError):
      own = False
    if own:
      # Python's own writes (warnings, a message) still go to the terminal.
      self._stderr = sys.stderr
      sys.stderr = os.fdopen(
        os.dup(saved), "w", buffering=1, encoding=self._stderr.encoding, errors="backslashreplace"
      )
    os.dup2(self._file.fileno(), 2)
    return self

  def __exit__(self, *exc) -> None:
    if self._saved is None:
      return
    if self._stderr is not None:
      for stream in (sys.stderr, self._stderr):
        with contextlib.suppress(OSError, ValueError):
          stream.flush()
      sys.stderr.close()
      sys.stderr = self._stderr
    os.dup2(self._saved, 2)
    os.close(self._saved)
    self._saved = None
    self._file.seek(0)
    self.text = self._file.read().decode("utf-8", errors="replace")
    self._file.close()


class WorkdirLog(std_logging.Handler):
  """`WORKDIR/log.txt`, opened only once the run may write the workdir.

  Until `accept()` (the controller calls `accept_workdir()` once the workdir
  is known to be this run's: the lock taken, the checkpoints this model's),
  lines are held in memory: a refused run (another run holds the workdir,
  another experiment wrote it) writes nothing into it, and a run that fails
  before that writes them with its traceback (`failed`).
  """

  def __init__(self, path: str, preamble: str = ""):
    super().__init__(std_logging.INFO)
    self.path = path
    self._held: list[str] = [preamble if preamble.endswith("\n") else preamble + "\n"]
    if not preamble:
      self._held = []
    self._accepted = False
    self._discarded = False

  def emit(self, record) -> None:
    try:
      text = self.format(record) + "\n"
    except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
      self.handleError(record)
      return
    if self._accepted:
      try:
        self._write(text)
      except Exception:  # noqa: BLE001 - as FileHandler: never raise from emit
        self.handleError(record)
    elif not self._discarded:
      self._held.append(text)

  def accept(self) -> None:
    """The workdir is this run's: the held lines are written, then every line."""
    if self._accepted or self._discarded:
      return
    self._write("".join(self._held))
    self._accepted = True
    self._held = []

  def _write(self, text: str) -> None:
    # Through the storage layer: never through a link (O_NOFOLLOW locally),
    # and on any tf.io.gfile path (an object store rewrites the object).
    storage.append(self.path, text, durable=False)

  def discard(self) -> None:
    """The workdir was refused: nothing is written into it."""
    self._held = []
    self._discarded = True

  def failed(self, text: str) -> None:
    """The run failed (not a refusal): its lines and `text` (the traceback)
    go to log.txt. Never raises: the failure's message matters more."""
    with contextlib.suppress(OSError, ValueError):
      self.accept()
      if self._accepted:
        self._write(text if text.endswith("\n") else text + "\n")

  def close(self) -> None:
    self._accepted = False
    super().close()


# The WorkdirLog of the command's run in progress (None outside the command).
_active: list[WorkdirLog] = []


def accept_workdir() -> None:
  """The run may write its workdir: the command's log.txt opens (a no-op
  outside the command, and for a non-chief worker, which writes none)."""
  for handler in _active:
    handler.accept()


class _RunLogging:
  """What `command_logging` yields: log.txt's fate when the run fails."""

  def __init__(self, log: WorkdirLog | None):
    self._log = log

  def failed(self, text: str) -> None:
    """Writes the held lines and `text` to log.txt (no-op without one)."""
    if self._log is not None:
      self._log.failed(text)

  def discard(self) -> None:
    """A refused run: log.txt is not written."""
    if self._log is not None:
      self._log.discard()


@contextlib.contextmanager
def command_logging(workdir: str | None, *, verbose: bool, quiet_filter=None, preamble: str = ""):
  """The command's logging for one run: the short terminal and log.txt.

  Args:
    workdir: where log.txt goes, or None for none (a non-chief worker).
    verbose: `-v`/`--alsologtostderr`: the terminal shows every line.
    quiet_filter: a filter for log.txt (TensorFlow's INFO chatter).
    preamble: TensorFlow's start-up lines held back from the terminal
      (`NativeStartup.text`): written to log.txt first, and with -v to the
      terminal (without a log file, to the terminal).

  Yields:
    A `_RunLogging`: `failed(traceback)` or `discard()` when the run fails.
  """
  root = std_logging.getLogger()
  absl_handler = logging.get_absl_handler()
  added: list[std_logging.Handler] = []
  if preamble and (verbose or workdir is None):
    sys.stderr.write(preamble if preamble.endswith("\n") else preamble + "\n")
  file_handler = None
  if workdir is not None:
    file_handler = WorkdirLog(os.path.join(workdir, LOG_FILE), preamble)
    file_handler.setFormatter(logging.PythonFormatter())
    if quiet_filter is not None:
      file_handler.addFilter(quiet_filter)
    added.append(file_handler)
    _active.append(file_handler)
  # Without a log file (a non-chief worker) nothing may be left out: every
  # line on the terminal, as with -v.
  terminal_filter = _Nothing() if verbose or workdir is None else _TerminalFilter()
  # The terminal's lines go to the current sys.stderr through handlers of
  # this run; absl's own handler (which `run()` installs) stays quiet, so the
  # output is the same in-process and through the command.
  absl_handler.addFilter(terminal_filter)
  if verbose or workdir is None:
    every_line = _Stderr()
    if quiet_filter is not None:
      every_line.addFilter(quiet_filter)
    added.append(every_line)
  else:
    added.append(_ShortLines())
  for handler in added:
    root.addHandler(handler)
  try:
    yield _RunLogging(file_handler)
  finally:
    if file_handler is not None:
      _active.remove(file_handler)
      # A run that ended before the controller accepted the workdir (a
      # signal at start-up), not refused: its lines are kept.
      with contextlib.suppress(OSError, ValueError):
        file_handler.accept()
    for handler in added:
      root.removeHandler(handler)
      handler.close()
    absl_handler.removeFilter(terminal_filter)
