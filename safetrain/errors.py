"""Exceptions of safetrain. The command maps them to exit codes."""

from __future__ import annotations

from safetrain.config import ConfigError

__all__ = [
  "BadInputError",
  "ConfigError",
  "DivergenceError",
  "PreflightError",
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
  """The workdir holds checkpoints this run cannot use (exit code 2)."""
