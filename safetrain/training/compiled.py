"""The run's compiled functions, owned together: the guarded loop, the
evaluation step and the check that every variable is finite.

A remedy that changes what a graph fixed (a layer moved to float32, a loss
evaluated per row) drops the loop and the evaluation step at once: the next
call of each traces anew, once.
"""

from __future__ import annotations

from safetrain.step.loop import GuardedLoop
from safetrain.training.evaluation import Evaluator


class Compiled:
  """The guarded loop, the evaluator and the all-finite check.

  Args:
    loop: the compiled guarded loop.
    evaluator: the compiled evaluation.
    all_finite: a `tf.function`: whether every model and optimizer variable
      is finite.
  """

  def __init__(self, *, loop: GuardedLoop, evaluator: Evaluator, all_finite):
    self.loop = loop
    self.evaluator = evaluator
    self.all_finite = all_finite

  @property
  def scalar_loss(self) -> bool | None:
    """Whether compute_loss returns a scalar (known once the loop traced)."""
    return self.loop.scalar_loss

  def retrace(self) -> None:
    """Drops the compiled loop and evaluation step: the next call traces."""
    self.loop.retrace()
    self.evaluator.retrace()
