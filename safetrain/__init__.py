"""safetrain: TensorFlow/Keras training whose runs survive numerical failure."""

import os

# Before TensorFlow is first imported: keep its C++ start-up chatter quiet
# unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from safetrain.config import ConfigError, default_config, validate
from safetrain.data import unpack_batch
from safetrain.errors import BadInputError, DivergenceError, PreflightError, WorkdirError
from safetrain.records import read_jsonl
from safetrain.trainer import FitResult, Trainer

__all__ = [
  "BadInputError",
  "ConfigError",
  "DivergenceError",
  "FitResult",
  "PreflightError",
  "Trainer",
  "WorkdirError",
  "default_config",
  "read_jsonl",
  "unpack_batch",
  "validate",
]
__version__ = "0.1.0"
