"""`safetrain export WORKDIR [--format keras|saved_model] [--output PATH]`.

Writes the model of the workdir's newest healthy checkpoint for use without
the trainer: `WORKDIR/export/model.keras` (the default) or, with
`--format saved_model`, the SavedModel `WORKDIR/export/saved_model`. A
checkpoint that does not read back or holds non-finite values is passed over
for the one before it. Read-only on the checkpoints (nothing is repaired,
moved or deleted), so it is safe beside a run that is training there.

The trainer and its config are found from `WORKDIR/config.json`, which every
start of a run writes: the experiment file (or the file of the Trainer
subclass, for a run started from Python), the experiment's `:ARG`, the
trainer's class name and the resolved config.

Exit codes: 0 written; 2 the workdir, its config.json, the experiment file,
the trainer or a healthy checkpoint cannot be found, or the write failed
(one line, no traceback; the previous export is untouched).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections

from safetrain.core import errors
from safetrain.storage import files as storage
from safetrain.training import export as export_lib


class ExportError(Exception):
  """Why a workdir cannot be exported: printed as one line, exit code 2."""


def main(argv: list[str]) -> int:
  """Runs the command on `argv` (without the program and `export` words)."""
  parser = argparse.ArgumentParser(
    prog="safetrain export",
    description="Write the model of WORKDIR's newest healthy checkpoint for use without "
    "the trainer.",
  )
  parser.add_argument("workdir")
  parser.add_argument("--format", choices=export_lib.FORMATS, default="keras")
  parser.add_argument(
    "--output",
    default=None,
    help="default WORKDIR/export/model.keras, or WORKDIR/export/saved_model",
  )
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:
    return 0 if e.code == 0 else 2
  try:
    output = args.output or export_lib.default_path(args.workdir, args.format)
    try:
      export_lib.check_target(output, args.format)
    except ValueError as e:
      raise ExportError(f"--output: {e}") from None
    trainer = load_trainer(args.workdir)
    checkpoint, path = _export(trainer, output, args.format)
  except ExportError as e:
    print(f"safetrain export: error: {e}", file=sys.stderr)
    return 2
  print(f"safetrain export: the model of {checkpoint} -> {path}")
  return 0


def _export(trainer, output: str, fmt: str) -> tuple[str, str]:
  import tensorflow as tf  # noqa: PLC0415

  import safetrain  # noqa: PLC0415

  try:
    checkpoint = trainer.restore()
    return checkpoint, trainer.export(output, fmt)
  except (
    safetrain.ConfigError,
    safetrain.BadInputError,
    safetrain.WorkdirError,
    safetrain.PreflightError,
  ) as e:
    raise ExportError(str(e)) from None
  except (OSError, tf.errors.OpError) as e:
    why = getattr(e, "strerror", None) or errors.one_line(e)
    raise ExportError(f"cannot write {output}: {why}") from None


def load_trainer(workdir: str):
  """The Trainer that trained `workdir`, built from its config.json (not yet
  restored). Raises ExportError naming what cannot be found."""
  if not storage.isdir(workdir):
    raise ExportError(f"no such workdir: {workdir}")
  path = os.path.join(workdir, "config.json")
  try:
    recorded = json.loads(storage.read_text(path))
  except FileNotFoundError:
    raise ExportError(
      f"{workdir} has no config.json: not a safetrain workdir, or no run has started there"
    ) from None
  except (OSError, ValueError) as e:
    raise ExportError(f"cannot read {path}: {e}") from None
  origin = recorded.get("experiment") if isinstance(recorded, dict) else None
  file = origin.get("file") if isinstance(origin, dict) else None
  if not file:
    raise ExportError(
      f"{path} does not name the experiment that trained {workdir} (written by an older "
      "safetrain, or by a trainer defined in a script run as __main__ or a notebook): in "
      "Python, MyTrainer(config, workdir).export() writes the model"
    )
  if not os.path.isfile(file):
    raise ExportError(
      f"the experiment file {file} that trained {workdir} is gone: restore it, or in "
      "Python, MyTrainer(config, workdir).export() writes the model"
    )
  from safetrain.cli import experiment  # noqa: PLC0415 - imports TensorFlow

  try:
    module = experiment.load_module(file)
  except Exception as e:  # noqa: BLE001 - anything the user's file raises
    raise ExportError(f"cannot import {file}: {errors.one_line(e, typed=True)}") from None
  config = _rebuild_config(module, origin.get("arg"), recorded.get("config") or {}, path)
  cls = _trainer_class(module, recorded.get("trainer"), config, file)
  # Exporting trains nothing: one device, whatever the run used.
  config.distribute.strategy = "one_device"
  config.distribute.cpu_replicas = 0
  try:
    return cls(config, workdir)
  except ValueError as e:
    raise ExportError(f"the config recorded in {path} is not valid now: {e}") from None


def _trainer_class(module, name, config, file: str):
  from safetrain.cli import experiment  # noqa: PLC0415

  candidates = [n for n in (name, config.trainer) if isinstance(n, str) and n]
  for candidate in candidates:
    try:
      return experiment.resolve_trainer(candidate, module)
    except ValueError:
      continue
  raise ExportError(
    f"{file} defines no Trainer subclass {candidates[0] if candidates else '(unnamed)'!r}, "
    "the one that trained this workdir"
  )


def _rebuild_config(module, arg, values: dict, path: str) -> ml_collections.ConfigDict:
  """The run's config: the experiment's get_config(arg) (for the types of its
  keys), with every value config.json recorded on top (the overrides)."""
  import safetrain  # noqa: PLC0415

  config = None
  get_config = getattr(module, "get_config", None)
  if callable(get_config):
    try:
      config = get_config(arg) if arg else get_config()
    except Exception:  # noqa: BLE001 - the recorded values are what counts
      config = None
  if not isinstance(config, ml_collections.ConfigDict):
    config = safetrain.default_config()
  try:
    _overlay(config, values)
  except (TypeError, ValueError) as e:
    raise ExportError(f"the config recorded in {path} does not fit the experiment: {e}") from None
  return config


def _overlay(node: ml_collections.ConfigDict, values: dict) -> None:
  with node.unlocked():
    for key, value in values.items():
      current = node[key] if key in node else None
      if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
        _overlay(current, value)
        continue
      if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
      if isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
      node[key] = value
