"""safetrain: TensorFlow/Keras training whose runs survive numerical failure."""

import importlib
import os

# Before TensorFlow is first imported: keep its C++ start-up chatter quiet
# unless the user asked for it. The one place safetrain sets TensorFlow's log
# level (the command also shows TensorFlow's Python warnings, not its INFO).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from safetrain.core.config import ConfigError, default_config, validate
from safetrain.core.errors import BadInputError, DivergenceError, PreflightError, WorkdirError
from safetrain.storage.jsonl import read_jsonl

# Imported on first use, not here: importing TensorFlow takes seconds, and the
# command must own that time (a Ctrl-C in it stops the command cleanly).
_LAZY = {
  "FitResult": "safetrain.trainer",
  "KerasFitResult": "safetrain.keras_fit",
  "LoopRecord": "safetrain.training.actions",
  "Trainer": "safetrain.trainer",
  "unpack_batch": "safetrain.training.data",
  # safetrain.fit: a compiled Keras model, as model.fit takes it. Its module
  # is keras_fit, not fit: a submodule `fit` would shadow this function.
  "fit": "safetrain.keras_fit",
}


def __getattr__(name: str):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'safetrain' has no attribute {name!r}")


__all__ = [
  "BadInputError",
  "ConfigError",
  "DivergenceError",
  "FitResult",
  "KerasFitResult",
  "LoopRecord",
  "PreflightError",
  "Trainer",
  "WorkdirError",
  "default_config",
  "fit",
  "read_jsonl",
  "unpack_batch",
  "validate",
]
__version__ = "0.1.0"
