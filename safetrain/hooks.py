"""The hooks of a Trainer: what a user implements or overrides, their
contracts and their defaults.

`Trainer` (trainer.py) inherits them, and `Trainer.build()` calls them. Hooks
run once, eagerly, when the trainer is built (under the distribution
strategy's scope), except `compute_loss`, which is traced into the compiled
step.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import ml_collections
import tensorflow as tf

from safetrain.training import losses
from safetrain.training import optimizers as optimizers_lib
from safetrain.training.actions import LoopRecord


class TrainerHooks:
  """The hooks of `safetrain.Trainer`; subclass Trainer, not this class.

  Attributes:
    config: the run's validated config (set by `Trainer.__init__`).
  """

  config: ml_collections.ConfigDict
  # config.loss as a per-example loss function (set by `Trainer.build()`).
  _loss_fn: Callable

  def build_model(self) -> keras.Model:
    """Returns the Keras model. Required. Runs eagerly, once, in scope."""
    raise NotImplementedError("subclasses of Trainer implement build_model()")

  def build_train_dataset(self) -> tf.data.Dataset:
    """Returns the training dataset, batched with `config.train.batch_size`.

    Required. Yields `(x, y)`, `(x, y, sample_weight)` or dicts. Runs eagerly,
    once (again on a resume by data position). It need not repeat: safetrain
    repeats it (`train.repeat_data`).
    """
    raise NotImplementedError("subclasses of Trainer implement build_train_dataset()")

  def build_eval_dataset(self) -> tf.data.Dataset | None:
    """Returns the evaluation dataset, or None (the default) for no eval.
    Runs eagerly, once, at the first evaluation."""
    return None

  def build_optimizer(self) -> keras.optimizers.Optimizer:
    """Returns the optimizer; by default built from `config.optimizer`.

    Do not set clipnorm/global_clipnorm here: safetrain clips. The learning
    rate (a float or a schedule) is wrapped so recovery can scale it.
    Runs eagerly, once, in scope.
    """
    return optimizers_lib.from_config(self.config)

  def compute_loss(self, model: keras.Model, batch, training: bool):
    """Returns the loss, or `(loss, {name: scalar metric})`.

    Traced into the compiled step (inside the graph, in replica context), so
    it must be graph-safe: no Python side effects, no `.numpy()`. An override
    is converted by AutoGraph (Python `if`/`for` over tensors work, as in a
    `tf.function`); safetrain's own step code is not, which is what keeps the
    first trace short. The loss is
    either the mean over the batch it is given (after bad rows are dropped),
    or the per-example losses, a tensor of shape [batch] (or [batch, ...],
    averaged over the other axes): then safetrain takes the mean over the
    examples whose loss is finite, and drops and counts the others
    (`guard.drop_examples`). The default applies `config.loss` per example
    to `model(x)` and `y` and adds the model's regularization losses (to each
    example, so to the mean), as Keras `fit` does. An override that wants them
    adds `self.regularization_loss(model)` after calling the model.
    """
    return losses.default_loss(self._loss_fn, self.regularization_loss, model, batch, training)[0]

  def regularization_loss(self, model: keras.Model) -> tf.Tensor:
    """The sum of `model.losses`, in float32: kernel, bias and activity
    regularizers and `add_loss` terms, as Keras `fit` adds them to the loss.

    Call it in `compute_loss` after the model's forward pass (activity
    regularizers and `add_loss` terms come from that call). It is part of the
    loss the guard checks: a non-finite term makes a non-finite loss.
    """
    return losses.regularization_loss(model)

  def build_metrics(self) -> dict[str, keras.metrics.Metric]:
    """Returns stateful Keras metrics, `{name: keras.metrics.Metric}`
    (default: none), for example `{"auc": keras.metrics.AUC()}`.

    Called twice when the trainer is built, in the strategy's scope: once
    for training and once for evaluation, so it must return new objects on
    each call. Each metric gets `update_state(y, y_pred, sample_weight)` on
    every good training step (a skipped step changes no metric state) and
    on every eval batch: `y` and `sample_weight` come from the batch as the
    default compute_loss reads it, `y_pred` from compute_loss (the default
    has it; an override returns `(loss, metrics, y_pred)`). Training metrics
    are reset at the start of each inner loop and reported in its record
    (metrics.jsonl, TensorBoard, the progress line, actions); evaluation
    metrics are reset at the start of each evaluation and reported with its
    results. Each result must be a scalar.
    """
    return {}

  def actions(self) -> list[Callable[[LoopRecord], None]]:
    """Returns callables run after every inner loop (default: none).

    Each gets the loop's `safetrain.LoopRecord` (step, loss, metrics,
    incidents, eval metrics when an evaluation ran) and may end the run with
    `record.stop(reason)`: it then ends as a finished run does (checkpoint,
    final evaluation, export, exit 0), with `FitResult.stopped == "action"`.
    Their return value is ignored. Called once, when the trainer is built;
    the callables run eagerly, in order, before the Keras callbacks.
    """
    return []

  def callbacks(self) -> list[keras.callbacks.Callback]:
    """Returns Keras callbacks to run between inner loops (default: none).

    See docs/callbacks.md for the mapping of Keras's
    hooks onto inner loops and evaluations, and which callbacks are refused.
    Called once, when the trainer is built.
    """
    return []
