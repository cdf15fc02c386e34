"""Loading experiment files: `get_config(arg)` and the Trainer they name."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

from safetrain.core.config import ConfigError


def load_module(path: str) -> types.ModuleType:
  """Imports an experiment file by path."""
  if not os.path.isfile(path):
    raise ConfigError("config", path, "an existing experiment file")
  if not path.endswith(".py"):
    raise ConfigError("config", path, "a Python file (.py) that defines get_config(arg=None)")
  name = "safetrain_experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def check_arg(module: types.ModuleType, path: str, arg: str) -> list[str]:
  """Checks `--config=PATH:ARG` against the ARGS the experiment declares.

  ARG is one word or several joined by commas (`smoke,bf16`); each must be in
  the module's `ARGS` tuple, once. A file without ARGS takes no ARG.

  Returns:
    The words of `arg` ([] for none).

  Raises:
    ValueError: naming the unknown word and the choices.
  """
  if not arg:
    return []
  declared = getattr(module, "ARGS", ())
  if not isinstance(declared, (tuple, list)) or not all(isinstance(a, str) for a in declared):
    raise ValueError(f"{path}: ARGS must be a tuple of strings, not {declared!r}")
  words = arg.split(",")
  how = "one of them, or several joined by commas"
  for word in words:
    if word not in declared:
      if not declared:
        raise ValueError(
          f"{path} takes no :ARG (got {arg!r}): it declares no ARGS; an experiment "
          'lists the ones it accepts, as in ARGS = ("smoke",)'
        )
      raise ValueError(f"{path} has no :ARG {word!r}; it accepts {', '.join(declared)} ({how})")
  if len(set(words)) != len(words):
    raise ValueError(f"{path}: :ARG {arg!r} repeats a word; it accepts {', '.join(declared)}")
  return words


def resolve_trainer(name: str, module: types.ModuleType | None):
  """Finds the Trainer class `config.trainer` names."""
  from safetrain.trainer import Trainer  # noqa: PLC0415

  if not name:
    raise ConfigError("trainer", name, "the name of a Trainer subclass in the experiment file")
  if module is not None and hasattr(module, name):
    cls = getattr(module, name)
  elif "." in name or ":" in name:
    mod_name, _, attr = name.replace(":", ".").rpartition(".")
    try:
      cls = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
      raise ConfigError("trainer", name, f"an importable Trainer subclass ({e})") from e
  else:
    where = getattr(module, "__file__", "the experiment file")
    defined = sorted(
      k
      for k, v in vars(module or types.SimpleNamespace()).items()
      if isinstance(v, type) and issubclass(v, Trainer) and v is not Trainer
    )
    hint = f" (it defines {', '.join(defined)})" if defined else ""
    raise ConfigError("trainer", name, f"a Trainer subclass defined in {where}{hint}")
  if not (isinstance(cls, type) and issubclass(cls, Trainer)):
    raise ConfigError("trainer", name, "a subclass of safetrain.Trainer")
  return cls
