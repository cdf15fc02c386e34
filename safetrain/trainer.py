"""The Trainer: the hooks a user implements, and the one place that turns the
config into the parts of a run.

The split follows Orbit. The compiled inner loop is `step.GuardedLoop`: up to
`train.steps_per_loop` guarded steps in one `tf.function` call. Between calls,
`controller.Controller` (eager Python, like Orbit's `Controller.train`) records
incidents and metrics, hands divergences to `recovery.Recovery`, evaluates and
checkpoints. `Trainer.build()` makes those parts; `fit()` hands them over.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import keras
import ml_collections
import tensorflow as tf
from absl import logging

from safetrain import actions as actions_lib
from safetrain import callbacks as callbacks_lib
from safetrain import (
  checkpointing,
  clipping,
  distribute,
  evaluation,
  examples,
  forensics,
  guard,
  health,
  losses,
  recovery,
  snapshots,
  state,
  stateful_metrics,
)
from safetrain import config as config_lib
from safetrain import controller as controller_lib
from safetrain import data as data_lib
from safetrain import export as export_lib
from safetrain import optimizers as optimizers_lib
from safetrain import spike as spike_lib
from safetrain import step as step_lib
from safetrain import workdir as workdir_lib
from safetrain.actions import LoopRecord
from safetrain.drill import Drill
from safetrain.errors import BadInputError, WorkdirError
from safetrain.loss_scale import DynamicLossScale
from safetrain.results import FitResult, summary_line

__all__ = ["FitResult", "LoopRecord", "Trainer"]


class Trainer:
  """Trains a Keras model with guarded steps and automatic recovery.

  Subclass it and implement `build_model` and `build_train_dataset`; override
  the other hooks when the defaults do not fit. Hooks run once, eagerly, when
  the trainer is built (under the distribution strategy's scope), except
  `compute_loss`, which is traced into the compiled step.

  Args:
    config: a ConfigDict starting from `safetrain.default_config()`. It is
      validated here, before any TensorFlow work.
    workdir: directory for checkpoints, summaries and records. Running again
      on the same workdir resumes.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config_lib.validate(config)
    self.config, clamped = config_lib.fit_to_steps(config)
    if clamped:
      logging.info("Fitted to train.steps=%d: %s.", config.train.steps, ", ".join(clamped))
    self.workdir = os.fspath(workdir)
    self.model: keras.Model | None = None
    self.optimizer: keras.optimizers.Optimizer | None = None
    self._built = False
    # True once evaluate() restored a checkpoint into the model.
    self._state_ready = False
    # Where this trainer comes from, for `safetrain export` (config.json): the
    # file of its class's module, and the experiment's :ARG (the command sets
    # it). Not a script run as __main__: importing it again could train again.
    module = sys.modules.get(type(self).__module__)
    file = getattr(module, "__file__", None) if type(self).__module__ != "__main__" else None
    self._origin = {"file": os.path.abspath(file) if file else None, "arg": None}

  # ---------------------------------------------------------------- hooks

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
    o = self.config.optimizer
    return optimizers_lib.build_optimizer(
      name=o.name,
      learning_rate=o.learning_rate,
      beta_1=o.beta_1,
      beta_2=o.beta_2,
      epsilon=o.epsilon,
      momentum=o.momentum,
      nesterov=o.nesterov,
      weight_decay=o.weight_decay,
    )

  def compute_loss(self, model: keras.Model, batch, training: bool):
    """Returns the loss, or `(loss, {name: scalar metric})`.

    Traced into the compiled step (inside the graph, in replica context), so
    it must be graph-safe: no Python side effects, no `.numpy()`. The loss is
    either the mean over the batch it is given (after bad rows are dropped),
    or the per-example losses, a tensor of shape [batch] (or [batch, ...],
    averaged over the other axes): then safetrain takes the mean over the
    examples whose loss is finite, and drops and counts the others
    (`guard.drop_examples`). The default applies `config.loss` per example
    to `model(x)` and `y` and adds the model's regularization losses (to each
    example, so to the mean), as Keras `fit` does. An override that wants them
    adds `self.regularization_loss(model)` after calling the model.
    """
    return self._default_loss(model, batch, training)[0]

  def _default_loss(self, model: keras.Model, batch, training: bool):
    """The default compute_loss, and the predictions it made (for the
    stateful metrics)."""
    x, y, sample_weight = data_lib.unpack_batch(batch)
    pred = model(x, training=training)
    pred = losses.float32_predictions(pred)
    per_example = self._loss_fn(y, pred, sample_weight=sample_weight)
    return per_example + self.regularization_loss(model), pred

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

    See README ("Actions and Keras callbacks") for the mapping of Keras's
    hooks onto inner loops and evaluations, and which callbacks are refused.
    Called once, when the trainer is built.
    """
    return []

  # ------------------------------------------------------------- building

  def build(self) -> None:
    """Builds the strategy, data, model, optimizer and compiled loop.

    fit() and evaluate() call it; call it yourself to inspect the model or
    the strategy before training. Creates the workdir, and writes nothing in it.
    """
    if self._built:
      return
    c = self.config
    if c.train.deterministic:
      tf.config.experimental.enable_op_determinism()
    self._strategy = distribute.make_strategy(
      strategy=c.distribute.strategy, cpu_replicas=c.distribute.cpu_replicas
    )
    self._is_chief = distribute.is_chief(self._strategy)
    self._num_workers = distribute.num_workers(self._strategy)
    keras.utils.set_random_seed(c.seed)
    os.makedirs(self.workdir, exist_ok=True)
    self._loss_fn = losses.make_loss(c.loss)
    self._drill = Drill(**c.drill)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(c.precision.policy)
    try:
      with self._strategy.scope():
        self._build_in_scope()
    finally:
      keras.mixed_precision.set_global_policy(previous_policy)
    self._built = True

  @property
  def strategy(self) -> tf.distribute.Strategy:
    """The distribution strategy (once built: see `build()`)."""
    if not self._built:
      raise RuntimeError("the trainer is not built yet: call build(), fit() or evaluate() first")
    return self._strategy

  def _build_in_scope(self) -> None:
    c = self.config
    self._run = state.RunState(c.precision.policy)
    self._recovery = recovery.RecoveryState()
    ls = c.loss_scale
    self._loss_scale = DynamicLossScale(
      initial=ls.initial,
      growth_interval=ls.growth_interval,
      growth_factor=ls.growth_factor,
      backoff_factor=ls.backoff_factor,
      hysteresis=ls.hysteresis,
      min_scale=ls.min_scale,
      max_scale=ls.max_scale,
      enabled=c.precision.policy == "mixed_float16",
    )
    g = c.guard
    self._spike = spike_lib.SpikeDetector(
      enabled=g.spike_detection,
      warmup_steps=g.spike_warmup_steps,
      threshold=g.spike_threshold,
      rel_floor=g.spike_rel_floor,
      decay=g.spike_decay,
      first_loss_fraction=g.spike_first_loss_fraction,
      growth_factor=g.growth_factor,
    )
    self._clip = clipping.GradientClip(
      mode=c.clip.mode,
      global_norm=c.clip.global_norm,
      ema=c.clip.ema,
      z_threshold=c.clip.z_threshold,
      warmup_steps=c.clip.warmup_steps,
    )
    self._health_state = health.HealthState()

    self._train_data = data_lib.TrainData(
      self.build_train_dataset, repeat=c.train.repeat_data, strategy=self._strategy
    )
    self._element_spec = self._train_data.element_spec
    self._first_batch = self._train_data.first_batch
    self._leaf_names = self._train_data.leaf_names
    iterator = self._train_data.iterator()
    # An iterator that cannot be checkpointed (distributed, or a pipeline with
    # state outside the graph) is found again by its data position: resume
    # and replay re-create it there.
    iterator_in_checkpoint = self._train_data.checkpointable(iterator)
    if self._train_data.stateful is not None:
      data_lib.log_position_based(self._train_data.stateful)
    self._data = state.DataState(self._train_data)
    # A drill that cannot fire on this data is a config error, not a no-op.
    self._drill.check(self._element_spec, self._strategy.num_replicas_in_sync)

    self.model = self.build_model()
    if not isinstance(self.model, keras.Model):
      raise TypeError(f"build_model() returned {type(self.model).__name__}, not a keras.Model")
    if not self.model.built:
      # Build variables outside the compiled step, on a sample batch.
      self._sample_loss()
    self.optimizer = self.build_optimizer()
    self._lr_factor = optimizers_lib.LearningRateFactor()
    default_schedule = None
    if type(self).build_optimizer is Trainer.build_optimizer:
      o = c.optimizer
      default_schedule = lambda: optimizers_lib.build_schedule(  # noqa: E731
        name=o.schedule,
        learning_rate=o.learning_rate,
        total_steps=c.train.steps,
        warmup_steps=o.warmup_steps,
        end_lr_factor=o.end_lr_factor,
      )
    optimizers_lib.wrap_learning_rate(
      self.optimizer,
      default_schedule=default_schedule,
      lr_scale=self._recovery.lr_scale,
      rewarm_start=self._recovery.rewarm_start,
      rewarm_steps=c.recovery.rewarm_steps,
      base_factor=self._lr_factor.factor,
    )
    self.optimizer.build(self.model.trainable_variables)
    self._skip_keras_all_reduce = distribute.skip_optimizer_all_reduce(
      self.optimizer, self._strategy
    )
    # The offending batch is kept for the replay on one replica only.
    one_replica = self._strategy.num_replicas_in_sync == 1
    self._stash = forensics.Stash(self._element_spec) if one_replica else None
    replica_state = distribute.replica_local_state(
      self._strategy,
      self.model,
      lambda: self._call_compute_loss(self.model, self._first_batch, True),
    )
    _, sample_metrics = self._sample_loss()
    self._train_metrics, self._eval_metrics = stateful_metrics.build_sets(
      self.build_metrics,
      type(self).__qualname__,
      taken=set(sample_metrics),
      first_batch=self._first_batch,
      # Fails now, eagerly, if an override does not return y_pred.
      check_pred=lambda: self._call_compute_loss(
        self.model, self._first_batch, False, with_pred=True
      ),
    )
    loss_for_metrics = functools.partial(
      self._call_compute_loss_per_example, with_pred=bool(self._train_metrics)
    )
    mean_for_metrics = functools.partial(
      self._call_compute_loss, with_pred=bool(self._train_metrics)
    )

    self._rollback_objects = dict(
      model=self.model,
      # Every model variable by position, so that state Keras does not expose
      # to tf.train.Checkpoint (dropout's SeedGenerator) is saved too.
      model_variables=list(self.model.variables),
      optimizer=self.optimizer,
      run=self._run,
      loss_scale=self._loss_scale,
      spike=self._spike,
      health=self._health_state,
    )
    self._checkpoints = checkpointing.CheckpointStore(
      os.path.join(self.workdir, "checkpoints"),
      max_to_keep=c.checkpoint.max_to_keep,
      objects=dict(
        self._rollback_objects,
        data=self._data,
        recovery=self._recovery,
        lr_factor=self._lr_factor,
        clip=self._clip,
        **({"iterator": iterator} if iterator_in_checkpoint else {}),
      ),
      write=self._is_chief,
      owner=type(self).__qualname__,
      # What a rollback keeps (not restored): persisted by the rollback
      # itself, with no model save (see checkpointing.record_rollback).
      carry=("data", "recovery", "lr_factor", "iterator", "clip"),
      generation_key="recovery/rollbacks_total/.ATTRIBUTES/VARIABLE_VALUE",
    )
    self._loop = step_lib.GuardedLoop(
      strategy=self._strategy,
      model=self.model,
      optimizer=self.optimizer,
      compute_loss=loss_for_metrics,
      loss_scale=self._loss_scale,
      spike=self._spike,
      drill=self._drill,
      input_guard=guard.InputGuard(
        enabled=g.check_inputs, policy=g.bad_inputs, leaf_count=len(self._leaf_names)
      ),
      clip=self._clip,
      drop_examples=g.drop_examples,
      max_dropped_examples=g.max_dropped_examples,
      rollback_after=g.rollback_after,
      raise_on_bad_inputs=g.bad_inputs == "raise",
      repeat_data=c.train.repeat_data,
      variables=step_lib.LoopVariables(
        step=self._run.step,
        consecutive_bad=self._run.consecutive_bad,
        attempts=self._recovery.attempts,
        position=self._data.position,
      ),
      replica_state=replica_state,
      stash=self._stash.variables if self._stash is not None else None,
      skip_keras_all_reduce=self._skip_keras_all_reduce,
      metric_names=sorted(sample_metrics),
      train_metrics=self._train_metrics or None,
    )
    self._train_loop_fn = self._loop.function
    self._all_finite_fn = tf.function(
      lambda: guard.all_finite(self.model.variables + self.optimizer.variables)
    )
    self._evaluator = evaluation.Evaluator(
      strategy=self._strategy,
      build_dataset=self.build_eval_dataset,
      compute_loss=lambda batch: mean_for_metrics(self.model, batch, False),
      steps=c.eval.steps,
      metrics=self._eval_metrics or None,
    )
    self._forensics = forensics.Context(
      model=self.model,
      optimizer=self.optimizer,
      compute_loss=self._call_compute_loss,
      fp16=self._loss_scale.enabled,
      loss_scale=self._loss_scale,
      spike=self._spike,
      drill_active=self._drill.active,
      max_abs_input=g.preflight_max_abs_input,
    )
    self._controller = controller_lib.Controller(
      controller_lib.Parts(
        config=c,
        workdir=self.workdir,
        trainer_name=type(self).__qualname__,
        strategy=self._strategy,
        is_chief=self._is_chief,
        num_workers=self._num_workers,
        run=self._run,
        data=self._data,
        recovery=self._recovery,
        loss_scale=self._loss_scale,
        train_data=self._train_data,
        iterator=iterator,
        iterator_in_checkpoint=iterator_in_checkpoint,
        checkpoints=self._checkpoints,
        rollback_objects=self._rollback_objects,
        loop=self._loop,
        all_finite=lambda: bool(self._all_finite_fn()),
        evaluate=self.evaluate,
        forensics=self._forensics,
        stash=self._stash,
        health=health.build(
          self.config,
          model=self.model,
          optimizer=self.optimizer,
          first_batch=self._first_batch,
          state=self._health_state,
          spike=self._spike,
          lr_scale=self._recovery.lr_scale,
        ),
        snapshots=snapshots.build(
          self.config.recovery,
          num_workers=self._num_workers,
          modules=[list(self.model.variables), list(self.optimizer.variables)]
          + [self._run, self._loss_scale, self._spike, self._health_state],
        ),
        actions=self._make_actions(),
        origin=self._origin,
        train_metrics=self._train_metrics,
      )
    )

  def _make_actions(self) -> actions_lib.Actions:
    """The user's actions and Keras callbacks, checked."""
    name = type(self).__qualname__
    user_actions = self.actions()
    if not isinstance(user_actions, (list, tuple)) or not all(map(callable, user_actions)):
      raise config_lib.ConfigError(
        "trainer", name, "actions() must return a list of callables taking a LoopRecord"
      )
    callbacks = callbacks_lib.check(self.callbacks(), name)
    return actions_lib.Actions(
      list(user_actions),
      callbacks_lib.KerasCallbacks(
        callbacks,
        model=self.model,
        optimizer=self.optimizer,
        eval_every=self.config.eval.every_steps,
        train_steps=self.config.train.steps,
      )
      if callbacks
      else None,
      model=self.model,
    )

  def _step(self) -> int:
    return int(self._run.step.numpy())

  @property
  def _iterator(self):
    """The live training data iterator (the controller re-creates it on a
    resume or replay by position)."""
    return self._controller.iterator

  def _call_compute_loss_per_example(self, model, batch, training, with_pred: bool = False):
    """compute_loss, normalised to (float32 loss or per-example losses,
    {name: float32 metric}), and y_pred as a third element `with_pred` (for
    the stateful metrics): what the compiled step takes."""
    if with_pred and type(self).compute_loss is Trainer.compute_loss:
      (loss, pred), metrics_ = self._default_loss(model, batch, training), {}
    else:
      out = self.compute_loss(model, batch, training)
      if not isinstance(out, (tuple, list)):
        out = (out, {})
      loss, metrics_, pred = (*out, None) if len(out) == 2 else out
    result = tf.cast(loss, tf.float32), {k: tf.cast(v, tf.float32) for k, v in metrics_.items()}
    if not with_pred:
      return result
    if pred is None:
      raise config_lib.ConfigError(
        "trainer",
        type(self).__qualname__,
        "build_metrics() needs y_pred: compute_loss must return (loss, metrics, y_pred)",
      )
    return (*result, pred)

  def _call_compute_loss(self, model, batch, training, with_pred: bool = False):
    """compute_loss, normalised to (float32 mean loss, {name: float32 metric}
    [, y_pred]): per-example losses are averaged plainly (a NaN stays NaN)."""
    loss, *rest = self._call_compute_loss_per_example(model, batch, training, with_pred)
    return (examples.plain_mean(loss), *rest)

  def _sample_loss(self):
    """compute_loss on the first batch, eagerly. A batch that does not fit the
    model or the loss fails here, as a BadInputError naming what the dataset
    yields, not later inside the compiled step."""
    try:
      return self._call_compute_loss(self.model, self._first_batch, False)
    except (ValueError, TypeError, KeyError, IndexError, tf.errors.OpError) as e:
      if isinstance(e, BadInputError):
        raise
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise BadInputError(
        f"the first training batch does not fit {type(self).__name__}'s model and "
        f"compute_loss ({type(e).__name__}: {first}). The dataset yields "
        f"{data_lib.describe_spec(self._element_spec)}; the default compute_loss expects "
        "(x, y), (x, y, sample_weight) or dicts with 'x' and 'y', with x as the model's input."
      ) from e

  # ----------------------------------------------------------- evaluation

  def evaluate(self) -> dict[str, float]:
    """Evaluates the model on `build_eval_dataset()`.

    Each batch counts by its rows, so the result is the mean over the examples
    seen, a short last batch included, as Keras `model.evaluate` reports it.
    `eval.steps` limits the batches (0, the default: the whole set). On a
    trainer that has not trained or resumed in this process, it first restores
    the workdir's newest healthy checkpoint (WorkdirError when there is none),
    so `Trainer(config, workdir).evaluate()` evaluates the trained model.

    Returns:
      {name: mean} for the loss and compute_loss's metrics, plus `examples`
      (how many were evaluated); {} when there is no eval dataset.
    """
    self.build()
    if not (self._state_ready or self._controller.started):
      self._restore_for_inference()
    return self._evaluator()

  def restore(self) -> str:
    """Builds the trainer and loads the workdir's newest healthy checkpoint
    into `self.model`, for evaluation and prediction.

    Read-only: nothing in the workdir is repaired, moved or written, so it is
    safe beside a run that is training there. A checkpoint that does not read
    back, or holds non-finite values, is passed over for the one before it.
    The optimizer is not restored (call fit() to train on).

    Returns:
      The path of the checkpoint restored. Raises WorkdirError when there is
      no healthy checkpoint.
    """
    self.build()
    return self._restore_for_inference()

  def _restore_for_inference(self) -> str:
    """Loads the newest committed checkpoint that reads back finite into the
    model, without repairing or moving anything (a run may be writing)."""
    path = self._checkpoints.restore_model_readonly(
      dict(model=self.model, model_variables=list(self.model.variables)),
      healthy=lambda: bool(self._all_finite_fn()),
    )
    if path is None:
      raise WorkdirError(
        f"no healthy checkpoint in {self._checkpoints.directory}: train first "
        "(fit()), or point the trainer at the workdir of a trained run"
      )
    logging.info("Restored the model of %s (read-only)", path)
    self._state_ready = True
    return path

  def export(self, path: str | None = None, format: str = "keras") -> str:
    """Writes the model for use without the trainer; returns the path.

    Args:
      path: where to write; default `WORKDIR/export/model.keras` (format
        "keras") or `WORKDIR/export/saved_model` ("saved_model").
      format: "keras": the model only (no optimizer), for
        `keras.saving.load_model`; "saved_model": `model.export()`, a
        SavedModel with a `serve` endpoint, for TensorFlow Serving.

    The model is the one trained in this process (fit()), or restored
    (restore()); on a fresh trainer, the newest healthy checkpoint is
    restored first. The write is atomic: a kill mid-export leaves the
    previous export whole.
    """
    path = path or export_lib.default_path(self.workdir, format)
    export_lib.check_target(path, format)
    self.build()
    if not (self._state_ready or self._controller.started):
      self._restore_for_inference()
    spec = export_lib.input_spec(self._element_spec, data_lib.unpack_batch)
    path = export_lib.export_model(self.model, path, format, input_signature=spec)
    logging.info("Exported the model to %s", path)
    return path

  # ----------------------------------------------------------- outer loop

  def fit(self) -> FitResult:
    """Trains to `config.train.steps` applied updates, resuming if possible.

    Holds an exclusive lock on the workdir for the whole run (the chief
    only, in a multi-worker run): a second run on the same workdir fails at
    once with WorkdirError naming the pid that holds it.

    Returns:
      A FitResult. Raises DivergenceError when recovery is spent (the last
      healthy checkpoint is intact), BadInputError for unusable data under
      guard.bad_inputs=raise, PreflightError under guard.preflight=strict,
      WorkdirError when the workdir is in use or cannot be written.
    """
    chief = (
      self._is_chief
      if self._built
      else workdir_lib.is_chief_process(self.config.distribute.strategy)
    )
    lock = workdir_lib.WorkdirLock(self.workdir) if chief else None
    if lock is not None:
      lock.acquire()
    try:
      self.build()
      result = self._controller.fit()
      if result.stopped != "preempted" and self._is_chief:
        result.exported = self._export_on_finish()
      return result
    finally:
      if lock is not None:
        lock.release()

  def _export_on_finish(self) -> str | None:
    """WORKDIR/export/model.keras at the end of a run; a failure is a warning,
    not a failed run: the final checkpoint holds the model, and
    `safetrain export WORKDIR` writes it once the cause is fixed."""
    try:
      return self.export()
    except Exception as e:  # noqa: BLE001 - the run itself succeeded
      logging.warning(
        "The model was not exported (%s: %s); the final checkpoint is intact, and "
        "`safetrain export %s` writes WORKDIR/export/model.keras from it.",
        type(e).__name__,
        str(e).strip().splitlines()[0] if str(e).strip() else "",
        self.workdir,
      )
      return None

  def summary_line(self, result: FitResult) -> str:
    """One line about a finished fit(): incidents, recovery, the last eval."""
    return summary_line(result)
