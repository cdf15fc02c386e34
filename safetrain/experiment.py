"""Loading experiment files: `get_config(arg)` and the Trainer they name."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

from safetrain.config import ConfigError


def load_module(path: str) -> types.ModuleType:
  """Imports an experiment file by path."""
  if not os.path.isfile(path):
    raise ConfigError("config", path, "an existing experiment file")
  name = "safetrain_experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


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
