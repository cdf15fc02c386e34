"""Standard Keras callbacks, run between safetrain's inner loops.

The mapping (Keras's hook: when safetrain calls it):

- `on_train_begin`: once per `fit()`, after the restore, before the first loop.
- `on_train_batch_begin(batch)`: before each inner loop; `batch` is the index
  of its first step (the applied steps so far).
- `on_train_batch_end(batch, logs)`: after each inner loop, as Keras calls it
  once per execution with `steps_per_execution`; `batch` is the index of its
  last step, `logs` the loop's metrics.jsonl numbers.
- `on_epoch_begin(epoch)`: before the first loop of an evaluation period.
- `on_epoch_end(epoch, logs)`: after each evaluation (every
  `eval.every_steps`, and the final one); `logs` are the last loop's numbers
  plus `val_NAME` for each eval metric.
- `on_train_end(logs)`: when `fit()` returns (not on an exception).
- `on_test_*` and `on_predict_*`: never (safetrain's evaluation is not
  Keras's `evaluate`).

An epoch is an evaluation period: epoch k ends with the evaluation at step
`(k + 1) * eval.every_steps` (or the final one; with `eval.every_steps=0` the
final evaluation is epoch 0). `self.model` is the trainer's model, except that
`self.model.optimizer.learning_rate` is the rate before recovery's scale
(`base schedule * factor`); setting it (ReduceLROnPlateau,
LearningRateScheduler) sets the factor, and recovery's scale multiplies on top.
`model.stop_training = True` stops the run like an action's `record.stop()`.
"""

from __future__ import annotations

import math

import keras
from absl import logging

from safetrain.core import compat
from safetrain.core.config import ConfigError
from safetrain.training.actions import Actions, LoopRecord
from safetrain.training.optimizers import ScaledSchedule

# Callbacks that would fight safetrain's own machinery: refused, with why.
REFUSED = {
  "BackupAndRestore": (
    "safetrain checkpoints the whole run and resumes it itself (run the same command "
    "on the same workdir); BackupAndRestore would restore its own backup over the "
    "resumed state. Remove it"
  ),
  "ProgbarLogger": (
    "safetrain prints its own progress line, and a Keras progress bar per inner loop "
    "would print over it. Remove it"
  ),
}
# Callbacks that run, with a note on what safetrain already does.
NOTES = {
  "TerminateOnNaN": (
    "TerminateOnNaN never fires under safetrain: a step with a non-finite loss is "
    "skipped inside the compiled loop (recovery rolls back if they repeat), so the "
    "loss it sees is the mean over the loop's good steps, always finite; a run that "
    "cannot recover stops with DivergenceError (exit 3)"
  ),
  "ModelCheckpoint": (
    "ModelCheckpoint (save_freq='epoch') runs at each evaluation and writes the file it "
    "names; safetrain already checkpoints the full state in "
    "WORKDIR/checkpoints and exports the model to WORKDIR/export/model.keras at the end"
  ),
  "TensorBoard": (
    "Keras's TensorBoard callback writes epoch_* scalars per evaluation (by evaluation "
    "index) to its own log_dir; safetrain already writes every loop's numbers, by step, "
    "to WORKDIR/events"
  ),
}


def check(callbacks: list, trainer: str) -> list:
  """Checks the list `Trainer.callbacks()` returned; returns it.

  Raises:
    ConfigError: an element is not a Keras callback, or is refused (REFUSED).
  """
  if not isinstance(callbacks, (list, tuple)):
    raise ConfigError(
      "trainer", trainer, f"callbacks() must return a list, not {type(callbacks).__name__}"
    )
  for cb in callbacks:
    name = type(cb).__name__
    if not isinstance(cb, keras.callbacks.Callback):
      raise ConfigError(
        "trainer", trainer, f"callbacks() returned {name}, not a keras.callbacks.Callback"
      )
    for refused, why in REFUSED.items():
      if isinstance(cb, getattr(keras.callbacks, refused)):
        raise ConfigError("trainer", trainer, f"callbacks() returned {refused}: {why}")
    for noted, why in NOTES.items():
      if isinstance(cb, getattr(keras.callbacks, noted)):
        logging.warning("%s.", why)
  return list(callbacks)


class _OptimizerView:
  """`self.model.optimizer` for callbacks: the trainer's optimizer, whose
  `learning_rate` is the rate before recovery's scale, and settable."""

  def __init__(self, optimizer: keras.optimizers.Optimizer, schedule: ScaledSchedule):
    self.__dict__.update(_optimizer=optimizer, _schedule=schedule)

  def __getattr__(self, name):
    return getattr(self._optimizer, name)

  @property
  def learning_rate(self) -> float:
    return self._schedule.base_rate(self._optimizer.iterations)

  @learning_rate.setter
  def learning_rate(self, value) -> None:
    self._schedule.set_base_rate(
      self._optimizer.iterations, float(keras.ops.convert_to_numpy(value))
    )


class _ModelView:
  """`self.model` for callbacks: the trainer's model, with the optimizer view."""

  def __init__(self, model: keras.Model, optimizer: _OptimizerView):
    self.__dict__.update(_model=model, optimizer=optimizer)

  def __getattr__(self, name):
    return getattr(self._model, name)

  def __setattr__(self, name, value):
    setattr(self._model, name, value)


class KerasCallbacks:
  """Runs Keras callbacks from LoopRecords (see the module docstring).

  Args:
    callbacks: the checked callbacks.
    model: the trainer's model.
    optimizer: the trainer's optimizer; its learning rate is a ScaledSchedule.
    eval_every: `eval.every_steps` (0: only the final evaluation).
    train_steps: `train.steps`.
  """

  def __init__(
    self,
    callbacks: list,
    *,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    eval_every: int,
    train_steps: int,
  ):
    self._callbacks = callbacks
    self._model = model
    self._eval_every = eval_every
    view = _ModelView(model, _OptimizerView(optimizer, compat.learning_rate_schedule(optimizer)))
    epochs = math.ceil(train_steps / eval_every) if eval_every else 1
    for cb in callbacks:
      cb.set_model(view)
      cb.set_params({"verbose": 0, "epochs": epochs, "steps": None})
    self._epoch_logs: dict = {}
    self._in_epoch = False

  def __bool__(self) -> bool:
    return bool(self._callbacks)

  def _epoch_of(self, step: int) -> int:
    """The evaluation period that ends at or after `step`."""
    return max(math.ceil(step / self._eval_every) - 1, 0) if self._eval_every else 0

  def begin(self, step: int) -> None:
    del step
    self._epoch_logs = {}
    self._in_epoch = False
    self._call("on_train_begin", logs={})

  def before_loop(self, step: int) -> None:
    if not self._in_epoch:
      self._in_epoch = True
      self._call("on_epoch_begin", self._epoch_of(step + 1), logs={})
    self._call("on_train_batch_begin", step, logs={})

  def __call__(self, loop: LoopRecord) -> None:
    logs = _numbers(loop.metrics)
    if not loop.final:
      self._call("on_train_batch_end", max(loop.step - 1, 0), logs=logs, loop=loop)
    if loop.eval_metrics is None:
      return
    logs = {k: v for k, v in logs.items() if not k.startswith("eval_")}
    logs.update({f"val_{k}": v for k, v in _numbers(loop.eval_metrics).items()})
    self._epoch_logs = logs
    epoch = self._epoch_of(loop.step)
    self._in_epoch = False
    self._call("on_epoch_end", epoch, logs=logs, loop=loop)

  def end(self) -> None:
    self._call("on_train_end", logs=dict(self._epoch_logs))

  def _call(self, hook: str, *args, logs: dict, loop: LoopRecord | None = None) -> None:
    for cb in self._callbacks:
      stopping = getattr(self._model, "stop_training", False)
      # A copy each: ReduceLROnPlateau adds to the logs it gets, and
      # CSVLogger fixes its columns from the first logs it sees.
      getattr(cb, hook)(*args, dict(logs))  # positional, as Keras calls them
      if loop is not None and not stopping and getattr(self._model, "stop_training", False):
        loop.stop(f"{type(cb).__name__} set model.stop_training")


def _numbers(record: dict) -> dict:
  """The numeric fields of a record, as floats (Keras logs)."""
  return {
    k: float(v)
    for k, v in record.items()
    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "time"
  }


def make_actions(actions, callbacks, *, trainer: str, model, optimizer, config) -> Actions:
  """The user's actions and Keras callbacks, checked, for the controller.

  Args:
    actions, callbacks: the trainer's `actions` and `callbacks` hooks, called
      here in that order.
    trainer: the Trainer class's name, for the error messages.
    model, optimizer: the live ones.
    config: the run's config (eval.every_steps, train.steps).
  """
  user_actions = actions()
  if not isinstance(user_actions, (list, tuple)) or not all(map(callable, user_actions)):
    raise ConfigError(
      "trainer", trainer, "actions() must return a list of callables taking a LoopRecord"
    )
  checked = check(callbacks(), trainer)
  keras_callbacks = None
  if checked:
    keras_callbacks = KerasCallbacks(
      checked,
      model=model,
      optimizer=optimizer,
      eval_every=config.eval.every_steps,
      train_steps=config.train.steps,
    )
  return Actions(list(user_actions), keras_callbacks, model=model, trainer=trainer)
