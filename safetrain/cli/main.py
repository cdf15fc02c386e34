"""The `safetrain` command.

  safetrain --config=experiments/NAME.py[:ARG] --workdir=DIR [--config.a.b=V ...] [-v]
  safetrain report WORKDIR
  safetrain export WORKDIR [--format keras|saved_model] [--output PATH]

  ARG is a word the experiment lists in its ARGS tuple (or several, joined
  by commas).

The terminal shows a short line per incident, each cause's diagnosis once,
the progress, warnings and the summary; every log line (absl's format) goes
to WORKDIR/log.txt, and to the terminal as well with -v or --alsologtostderr.

Exit codes (docs/errors.md):
  0    trained to train.steps (or the data ended, with train.repeat_data=False).
  1    a bug in safetrain: one line saying so; the traceback is in log.txt.
  2    bad flags, config, experiment file or data; a user hook that raised;
       an op error inside the compiled loop; any OSError (disk full,
       read-only, path too long); a workdir that another run holds or that
       was written for another model: one message on stderr naming the
       problem, no traceback (it goes to log.txt), nothing committed lost.
  3    diverged with recovery spent; the diagnosis is printed and the last
       healthy checkpoint is intact.
  143  stopped by SIGTERM or SIGINT (preemption, Ctrl-C): the current inner
       loop finished, a healthy checkpoint was written and the records
       flushed. Run the same command again to resume from that step. (A
       signal before training starts, even while TensorFlow is imported, or
       after it ends stops the command at once, also with 143: the last
       checkpoint is intact.)

A run killed without warning (kill -9, power loss) resumes too: the same
command restores the newest checkpoint that reads back whole, cleaning up a
save or a rollback that was cut short and setting damaged files aside in
WORKDIR/checkpoints/corrupt/; only the leftovers of an interrupted save are
ever deleted.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import math
import os
import re
import signal
import sys

from absl import flags, logging
from ml_collections import config_flags

from safetrain.core import boundary, errors

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 1, 2, 3, 143

_CONFIG_ARG = re.compile(r"^--?config(?:=(.*))?$")
_OVERRIDE_ARG = re.compile(r"^--?(?:no)?config\.([^=]+)")
_HELP = ("-h", "-help", "--help", "--helpfull", "-?")


class UsageError(Exception):
  """Bad command-line input: printed as one line, exit code 2."""


def main_with_exit_code(argv: list[str]) -> int:
  """Runs the command on `argv` (argv[0] is the program name).

  Safe to call more than once in a process: every call parses its own flags.

  Returns:
    The exit code (see the module docstring).
  """
  try:
    return _main(argv)
  except UsageError as e:
    print(f"safetrain: error: {e}", file=sys.stderr)
    return EXIT_USAGE


def _main(argv: list[str]) -> int:
  if any(a in _HELP for a in argv[1:]):
    print(__doc__.strip())
    return EXIT_OK
  from safetrain.records.logs import NativeStartup  # noqa: PLC0415 - no TensorFlow

  # TensorFlow's C++ start-up lines (its import, the first probe of the GPU
  # platform) go to log.txt, not ahead of safetrain's own lines.
  with NativeStartup() as native:
    module, file_config, arg = _load_experiment(argv)
    import tensorflow as tf  # noqa: PLC0415

    tf.config.list_physical_devices()  # the probe; devices stay configurable
  return _run(argv, module, file_config, arg, native.text)


def _run(argv: list[str], module, file_config, arg, native: str) -> int:
  fv = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment file: path/to/experiment.py[:arg].",
    flag_values=fv,
    lock_config=True,
    sys_argv=argv,
  )
  workdir_flag = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and records.", flag_values=fv
  )
  verbose_flag = flags.DEFINE_boolean(
    "verbose", False, "Every log line on the terminal too.", short_name="v", flag_values=fv
  )
  also_flag = flags.DEFINE_boolean(
    "alsologtostderr", False, "Every log line on the terminal too (as -v).", flag_values=fv
  )
  _check_override_keys(argv, file_config)
  try:
    rest = fv(argv)
  except Exception as e:  # noqa: BLE001 - absl and config_flags raise several kinds
    raise UsageError(errors.one_line(e)) from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
  workdir = workdir_flag.value
  if not workdir:
    raise UsageError("--workdir is required")
  config = config_flag.value

  import tensorflow as tf  # noqa: PLC0415 - after the cheap checks above

  import safetrain  # noqa: PLC0415
  from safetrain.cli import experiment  # noqa: PLC0415
  from safetrain.records import logs  # noqa: PLC0415
  from safetrain.storage import lock as workdir_lib  # noqa: PLC0415

  logging.set_verbosity(logging.INFO)
  tf.get_logger().setLevel("WARNING")
  try:
    safetrain.validate(config)
    trainer_cls = experiment.resolve_trainer(config.trainer, module)
    _check_workdir(workdir)
  except (safetrain.ConfigError, safetrain.WorkdirError) as e:
    raise UsageError(str(e)) from None
  chief = workdir_lib.is_chief_process(config.distribute.strategy)
  with logs.command_logging(
    workdir if chief else None,
    verbose=verbose_flag.value or also_flag.value,
    quiet_filter=_quiet_library_info,
    preamble=native,
  ) as run_logging:
    try:
      trainer = trainer_cls(config, workdir)
      # For `safetrain export` (config.json): the experiment file and its :ARG.
      trainer.set_experiment(os.path.abspath(module.__file__), arg or None)
      result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - every failure, by boundary.outcome's policy
      code, line = boundary.outcome(e, workdir=workdir)
      if boundary.refused(e):
        run_logging.discard()  # a refused workdir is not written, log.txt neither
      elif not isinstance(e, safetrain.DivergenceError):
        run_logging.failed(f"safetrain: {line}\n{boundary.traceback_text(e)}")
      print(f"safetrain: {line}", file=sys.stderr)
      return code
  # No loop ran when the workdir was already at train.steps: no loss to show.
  loss = f", final loss {result.loss:.4g}" if math.isfinite(result.loss) else ""
  print(trainer.summary_line(result) + loss)
  if result.exported:
    print(f"model exported to {result.exported}")
  if result.step > config.train.steps:
    print(
      f"safetrain: note: the workdir was already at step {result.step}, past "
      f"train.steps={config.train.steps}: nothing was trained (a lower train.steps never "
      "undoes steps; raise it to train further).",
      file=sys.stderr,
    )
  if result.stopped == "preempted":
    print(
      f"safetrain: stopped by a signal at step {result.step} after checkpointing; "
      "run the same command to resume.",
      file=sys.stderr,
    )
    return EXIT_PREEMPTED
  if result.stopped == "action":
    print(
      f"safetrain: stopped at step {result.step} of {config.train.steps}: "
      f"{result.stop_reason}; run the same command to train on.",
      file=sys.stderr,
    )
  if result.stopped == "data_exhausted":
    print(
      f"safetrain: the training data ended at step {result.step} "
      "(train.repeat_data=False); stopped there.",
      file=sys.stderr,
    )
  return EXIT_OK


def _load_experiment(argv: list[str]):
  """Finds --config, imports the experiment file and checks get_config.

  Returns the module (where config.trainer is looked up) and the config
  get_config returns, before the overrides.

  Done before absl parses the flags, so each problem gets its own message
  instead of a wrapped traceback from the flag parser.
  """
  value = None
  for i, a in enumerate(argv[1:], 1):
    m = _CONFIG_ARG.match(a)
    if m:
      value = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
  if value is None:
    raise UsageError("--config=experiments/NAME.py is required")
  path, _, arg = value.partition(":")
  if not path:
    raise UsageError("--config needs a path: --config=experiments/NAME.py")
  if not os.path.isfile(path):
    raise UsageError(f"--config: no experiment file at {path}")
  if not path.endswith(".py"):
    raise UsageError(
      f"--config: {path} is not an experiment file: expected a Python file (.py) that "
      "defines get_config(arg=None)"
    )
  from safetrain.cli import experiment  # noqa: PLC0415 - imports TensorFlow

  try:
    module = experiment.load_module(path)
  except Exception as e:  # noqa: BLE001 - anything the user's file raises
    raise UsageError(f"--config: cannot import {path}: {errors.one_line(e, typed=True)}") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UsageError(f"--config: {path} defines no get_config(arg=None) function")
  try:
    experiment.check_arg(module, path, arg)
  except ValueError as e:
    raise UsageError(f"--config: {e}") from None
  try:
    config = get_config(arg) if arg else get_config()
  except Exception as e:  # noqa: BLE001
    call = f"get_config({arg!r})" if arg else "get_config()"
    raise UsageError(
      f"--config: {call} in {path} failed: {errors.one_line(e, typed=True)}"
    ) from None
  import ml_collections  # noqa: PLC0415

  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(
      f"--config: get_config() in {path} returned {type(config).__name__}, not an "
      "ml_collections.ConfigDict (start from safetrain.default_config())"
    )
  return module, config, arg


def _check_override_keys(argv: list[str], config) -> None:
  """An override of a key the config does not have names the key and the
  closest existing ones (absl would say only AttributeError: 'stepz')."""
  for a in argv[1:]:
    m = _OVERRIDE_ARG.match(a)
    if not m:
      continue
    node, done = config, []
    for part in m.group(1).split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = "config." + ".".join(done) if done else "config"
        close = difflib.get_close_matches(part, keys, n=1)
        hint = f"; did you mean {where}.{close[0]}?" if close else ""
        if not keys:
          raise UsageError(f"--config.{m.group(1)}: {where} is a value, not a group")
        raise UsageError(
          f"--config.{m.group(1)}: {where} has no key {part!r}{hint} "
          f"(keys of {where}: {', '.join(sorted(keys))})"
        )
      node = node[part]
      done.append(part)


# The longest path safetrain writes below the workdir: a TensorBoard event
# file (its name holds the host name) or a checkpoint's temporary data file,
# "checkpoints/ckpt-STEP_temp/part-00000-of-00001.data-00000-of-00001.tempstateN".
_DEEPEST = 120


def _check_workdir(workdir: str) -> None:
  """The workdir must be a directory we can write, before any training."""
  import socket  # noqa: PLC0415

  from safetrain.core.errors import WorkdirError  # noqa: PLC0415
  from safetrain.storage import files as storage  # noqa: PLC0415

  probe = storage.join(workdir, f".safetrain-write-test-{os.getpid()}")
  try:
    # Locally os.makedirs, whose error names the cause ("Not a directory").
    os.makedirs(workdir, exist_ok=True) if storage.is_local(workdir) else storage.makedirs(workdir)
    storage.write(probe, "ok")
    storage.remove(probe)
  except OSError as e:
    raise WorkdirError(
      f"--workdir={workdir} is not a writable directory: {e.strerror or e}"
    ) from None
  if not storage.is_local(workdir):
    return  # no PATH_MAX on an object store
  try:
    limit = os.pathconf(workdir, "PC_PATH_MAX")
  except (OSError, ValueError):
    limit = 4096
  deepest = len(os.fspath(workdir)) + _DEEPEST + len(socket.gethostname())
  if deepest >= limit:
    raise WorkdirError(
      f"--workdir is {len(os.fspath(workdir))} characters long: safetrain writes files up to "
      f"{deepest - len(os.fspath(workdir))} characters below it, over this system's path "
      f"limit of {limit} (PATH_MAX); use a shorter --workdir"
    )


def _quiet_library_info(record) -> bool:
  """Drops INFO lines TensorFlow and Keras log through absl (for example the
  checkpoint saver's "Sharding callback duration" on every save); their
  warnings and errors still show."""
  if record.levelno >= std_logging.WARNING:
    return True
  path = record.pathname.replace("\\", "/")
  return not any(f"/{lib}/" in path for lib in ("tensorflow", "keras", "tf_keras"))


def run() -> None:
  """Console-script entry point (`safetrain`, `python -m safetrain`)."""
  if len(sys.argv) > 1 and sys.argv[1] == "report":
    from safetrain.records import report  # noqa: PLC0415

    sys.exit(report.main(sys.argv[2:]))
  # What absl.app.run would set up: absl log lines on stderr, without the
  # "logging before flag parsing" notice (this command parses its own flags).
  flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.get_absl_handler().addFilter(_quiet_library_info)
  # Inside Trainer.fit a signal stops the run after the current loop; outside
  # it (start-up, restore, final evaluation) there is nothing to finish.
  signal.signal(signal.SIGTERM, _stop)
  if len(sys.argv) > 1 and sys.argv[1] == "export":
    sys.exit(_export(sys.argv[2:]))
  try:
    code = main_with_exit_code(sys.argv)
  except (_Stopped, KeyboardInterrupt):
    print(
      "safetrain: stopped by a signal outside the training loop; the last checkpoint "
      "is intact: run the same command to resume.",
      file=sys.stderr,
    )
    code = EXIT_PREEMPTED
  sys.exit(code)


def _export(argv: list[str]) -> int:
  """`safetrain export`: a signal stops it with 143, the previous export whole."""
  try:
    from safetrain.cli import export as export_command  # noqa: PLC0415

    return export_command.main(argv)
  except (_Stopped, KeyboardInterrupt):
    print("safetrain export: stopped by a signal; nothing was written", file=sys.stderr)
    return EXIT_PREEMPTED


class _Stopped(BaseException):
  """SIGTERM outside the training loop (a BaseException, like KeyboardInterrupt,
  so that no `except Exception` on the way swallows it)."""


def _stop(signum, frame) -> None:
  del frame
  raise _Stopped(signum)


if __name__ == "__main__":
  run()


def entry_point() -> None:
  """The `safetrain` command and `python -m safetrain`: `run()`, then a hard exit.

  After a run whose input pipeline failed (a `from_generator` or
  `py_function` dataset raising), TensorFlow's interpreter-shutdown teardown
  can wait forever on the pipeline's threads: the run has finished, written
  everything and decided its exit code, and the process hangs. So the command
  flushes what it printed and logged, then leaves with `os._exit`. In-process
  callers (tests, notebooks) use `run()`, which raises SystemExit as usual.
  """
  try:
    run()
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if e.code is not None and not isinstance(e.code, int):
      print(e.code, file=sys.stderr)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  std_logging.shutdown()
  os._exit(code)
