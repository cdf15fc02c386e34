"""User actions between inner loops, like the actions of Orbit's controller.

`Trainer.actions()` returns callables; after every inner loop each is called
with that loop's `LoopRecord`, and may end the run with `record.stop(reason)`.
A stop ends the run as a finished one ends: checkpoint, final evaluation,
export, exit 0, with `FitResult.stopped == "action"` and the reason in
`FitResult.stop_reason`. Keras callbacks (`Trainer.callbacks()`) run through
the same seam (`safetrain.callbacks.KerasCallbacks`), and setting
`model.stop_training = True` stops the run the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
from absl import logging

from safetrain.core import boundary


@dataclasses.dataclass
class LoopRecord:
  """What an action gets after each inner loop.

  Attributes:
    step: applied updates after the loop (after a rollback: the step it
      restored).
    loss: the mean training loss over the loop's good steps (None if none).
    metrics: the loop's metrics.jsonl record: `loss`, `grad_norm`, `lr`,
      `lr_scale`, the step-class counts, compute_loss's metrics by name, and
      `eval_*` when an evaluation ran.
    incidents: the incident records this loop added (as in incidents.jsonl).
    eval_metrics: the evaluation run after this loop ({name: mean, plus
      `examples`}; {} at an evaluation point without an eval dataset), or None
      when none ran.
    rolled_back: whether recovery rolled back after this loop.
    final: True for the one record after the final evaluation at the end of
      fit(): its `eval_metrics` are that evaluation's, `metrics` and `loss`
      the last loop's, and `incidents` empty. Stopping then changes nothing.
  """

  step: int
  loss: float | None
  metrics: dict
  incidents: list
  eval_metrics: dict | None = None
  rolled_back: bool = False
  final: bool = False
  stop_reason: str | None = dataclasses.field(default=None, repr=False)

  def stop(self, reason: str = "an action asked to stop") -> None:
    """Ends the run after this loop as a finished one ends (checkpoint,
    final evaluation, export, exit 0). The first reason given is kept."""
    if self.stop_reason is None:
      self.stop_reason = reason

  @property
  def stop_requested(self) -> bool:
    return self.stop_reason is not None


class Actions:
  """Runs the user's actions and the Keras callbacks adapter for the controller.

  Args:
    actions: callables taking a LoopRecord, in the order they run.
    callbacks: the Keras callbacks adapter (runs after the actions), or None.
    model: the trainer's model; its `stop_training` attribute is reset when
      training begins and honoured after every loop.
    trainer: the Trainer class's name, for the message when an action or a
      callback raises (`boundary.HookError`).
  """

  def __init__(
    self,
    actions: list[Callable[[LoopRecord], object]],
    callbacks=None,
    model: keras.Model | None = None,
    trainer: str | None = None,
  ):
    self._trainer = trainer
    self._actions = list(actions)
    self._callbacks = callbacks
    self._model = model
    self._last: LoopRecord | None = None

  @property
  def active(self) -> bool:
    """Whether there is anything to run."""
    return bool(self._actions or self._callbacks)

  def begin(self, step: int) -> None:
    """Training begins (after the restore), at `step`."""
    if self._model is not None:
      self._model.stop_training = False
    if self._callbacks is not None:
      boundary.call("callbacks", self._callbacks.begin, step, trainer=self._trainer)

  def before_loop(self, step: int) -> None:
    """An inner loop is about to start at `step`."""
    if self._callbacks is not None:
      boundary.call("callbacks", self._callbacks.before_loop, step, trainer=self._trainer)

  def after_loop(
    self,
    *,
    record: dict,
    incidents: list,
    eval_metrics: dict | None,
    rolled_back: bool,
  ) -> str | None:
    """Runs every action on the loop's record; returns the stop reason or None."""
    loop = LoopRecord(
      step=int(record["step"]),
      loss=record.get("loss"),
      metrics=dict(record),
      incidents=list(incidents),
      eval_metrics=None if eval_metrics is None else dict(eval_metrics),
      rolled_back=rolled_back,
    )
    self._run(loop)
    self._last = loop
    if loop.stop_requested:
      logging.info("Stopping at step %d: %s.", loop.step, loop.stop_reason)
    return loop.stop_reason

  def final(self, step: int, eval_metrics: dict) -> None:
    """The final evaluation of fit() ran at `step`."""
    if not (self._actions or self._callbacks):
      return
    last = self._last
    if (
      last is not None
      and last.step == step
      and last.eval_metrics is not None
      and not last.rolled_back
    ):
      return  # the last loop ended with an evaluation of this same state
    self._run(
      LoopRecord(
        step=step,
        loss=last.loss if last else None,
        metrics=dict(last.metrics) if last else {},
        incidents=[],
        eval_metrics=dict(eval_metrics),
        final=True,
      )
    )

  def end(self) -> None:
    """fit() returns (finished, stopped or preempted; not on an exception)."""
    if self._callbacks is not None:
      boundary.call("callbacks", self._callbacks.end, trainer=self._trainer)

  def _run(self, loop: LoopRecord) -> None:
    for action in self._actions:
      boundary.call("actions", action, loop, trainer=self._trainer)
    if self._callbacks is not None:
      boundary.call("callbacks", self._callbacks, loop, trainer=self._trainer)
    if self._model is not None and getattr(self._model, "stop_training", False):
      loop.stop("model.stop_training was set")
