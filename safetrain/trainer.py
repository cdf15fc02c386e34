"""The Trainer: the one place that turns the config into the parts of a run
(the hooks a user implements, their contracts and defaults: hooks.py).

The split follows Orbit. The compiled inner loop is `step.GuardedLoop`: up to
`train.steps_per_loop` guarded steps in one `tf.function` call. Between calls,
`controller.Controller` (eager Python, like Orbit's `Controller.train`) records
incidents and metrics, hands divergences to `recovery.Recovery`, evaluates and
checkpoints. `Trainer.build()` makes those parts; `fit()` hands them over.
"""

from __future__ import annotations

import contextlib
import functools
import os

import keras
import ml_collections
import tensorflow as tf
from absl import logging

from safetrain import controller as controller_lib
from safetrain.checkpoint import store as checkpointing
from safetrain.core import boundary, distribute
from safetrain.core import config as config_lib
from safetrain.diagnosis import forensics, preflight
from safetrain.diagnosis import replay as replay_lib
from safetrain.hooks import TrainerHooks
from safetrain.records import incidents as incidents_lib
from safetrain.records import quarantine as quarantine_lib
from safetrain.recovery import health, precision, rate_probe, scalar_rows, snapshots
from safetrain.recovery import keeper as keeper_lib
from safetrain.recovery import response as response_lib
from safetrain.recovery import rollback as recovery
from safetrain.results import FitResult, summary_line
from safetrain.step import batch_checks, clipping, guard, loop_state, registry
from safetrain.step import loop as step_lib
from safetrain.step import loss_watch as spike_lib
from safetrain.step import piece as piece_lib
from safetrain.step.drill import Drill
from safetrain.step.loss_scale import DynamicLossScale
from safetrain.storage import files as storage
from safetrain.storage import lock as workdir_lib
from safetrain.training import callbacks as callbacks_lib
from safetrain.training import compiled as compiled_lib
from safetrain.training import data as data_lib
from safetrain.training import evaluation, hook_checks, losses, state
from safetrain.training import export as export_lib
from safetrain.training import feed as feed_lib
from safetrain.training import metrics as stateful_metrics
from safetrain.training import optimizers as optimizers_lib
from safetrain.training import reference as reference_lib
from safetrain.training.actions import LoopRecord

__all__ = ["FitResult", "LoopRecord", "Trainer"]


def _gpu_visible() -> bool:
  return bool(tf.config.list_logical_devices("GPU"))


def jit_compile(choice: bool | None) -> bool:
  """`train.jit_compile` resolved: None (auto) is XLA when a GPU is visible,
  as Keras's `jit_compile="auto"`; on a CPU XLA is slower (docs/speed.md)."""
  return bool(choice) if choice is not None else _gpu_visible()


def skip_update(choice: str, *, jit_compile: bool) -> str:
  """`train.skip_update` resolved: "auto" is the select with a GPU visible or
  under XLA (a cond's predicate is copied to the host there, each step) and
  the cond on a CPU, where a predicate costs no copy and the select's copy of
  the optimizer's state a step is the dearer (docs/speed.md)."""
  if choice != "auto":
    return choice
  return "select" if jit_compile or _gpu_visible() else "cond"


class Trainer(TrainerHooks):
  """Trains a Keras model with guarded steps and automatic recovery.

  Subclass it and implement `build_model` and `build_train_dataset`; override
  the other hooks (`safetrain.hooks`: when they run, their defaults) as needed.

  Args:
    config: a ConfigDict starting from `safetrain.default_config()`. It is
      validated here, before any TensorFlow work.
    workdir: directory for checkpoints, summaries and records. Running again
      on the same workdir resumes.
  """

  # safetrain.fit keeps a compiled optimizer's clipnorm (docs/keras_fit.md);
  # a Trainer's build_optimizer must not clip (hook_checks.check_optimizer).
  _optimizer_may_clip = False

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
    # Where this trainer comes from, for `safetrain export` (config.json).
    self._origin = export_lib.origin_of(type(self))

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
    self._workers = distribute.Workers.of(self._strategy)
    self._is_chief, self._num_workers = self._workers.is_chief, self._workers.count
    keras.utils.set_random_seed(c.seed)
    storage.makedirs(self.workdir)
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

  def _learn_reference(self) -> reference_lib.Reference | None:
    """What the `not_learning` check holds the run to (at build, so from the
    initial weights on a resume too): the trivial predictor's loss for the
    default compute_loss, else the loss at the initial weights."""
    if not self.config.guard.learn_steps:
      return None
    if type(self).compute_loss is Trainer.compute_loss:
      found = reference_lib.trivial(self.config.loss, self._loss_fn, self.model, self._first_batch)
      if found is not None:
        return found
    return reference_lib.initial(self._call_compute_loss, self.model, self._first_batch)

  def set_experiment(self, file: str | None, arg: str | None) -> None:
    """Records the experiment file (and its :ARG) this trainer came from, for
    config.json, which `safetrain export` rebuilds the trainer from. The
    command calls it; call it before `fit()`."""
    self._origin.update(file=file, arg=arg)

  @property
  def strategy(self) -> tf.distribute.Strategy:
    """The distribution strategy (once built: see `build()`)."""
    if not self._built:
      raise RuntimeError("the trainer is not built yet: call build(), fit() or evaluate() first")
    return self._strategy

  @property
  def parts(self) -> controller_lib.Parts:
    """What `build()` made, as `fit()` runs it: the feed (the live iterator,
    the first batch), the compiled functions (the guarded loop and its
    pieces, the evaluator), the checkpoint store, the keeper, the logs, the
    response, the replay context. For inspection and tests; the run's
    variables are `self.state`."""
    if not self._built:
      raise RuntimeError("the trainer is not built yet: call build(), fit() or evaluate() first")
    return self._controller.parts

  def _build_in_scope(self) -> None:
    """Builds every part, in order, under the strategy's scope: the run's
    variables, the data, the model and optimizer with compute_loss and the
    metrics, the state's declaration and the checkpoints, the compiled loop,
    then the host's parts and the controller."""
    name = type(self).__qualname__
    # Every user hook through the boundary: what it raises is a HookError
    # naming it (exit 2), never a traceback.
    hook = functools.partial(boundary.wrap, trainer=name)
    c = self.config
    self._run = state.RunState(c.precision.policy)
    self._recovery = recovery.RecoveryState()
    self._loss_scale = DynamicLossScale.from_config(c)
    self._spike = spike_lib.SpikeDetector.from_config(c)
    self._clip = clipping.GradientClip.from_config(c)
    self._health_state = health.HealthState()

    iterator, iterator_in_checkpoint = self._build_data(hook)
    replica_state, sample_metrics = self._build_model(hook, name)
    self._declare_state(iterator, iterator_in_checkpoint, name)
    self._build_loop(replica_state, sample_metrics)
    self._build_host(hook, name, iterator, iterator_in_checkpoint)

  def _build_data(self, hook) -> tuple:
    """The training data and its iterator; whether the iterator is checkpointed."""
    c = self.config
    self._train_data = data_lib.TrainData(
      hook("build_train_dataset", self.build_train_dataset),
      repeat=c.train.repeat_data,
      strategy=self._strategy,
      class_weight=config_lib.class_weights(c.class_weight),
    )
    self._element_spec = self._train_data.element_spec
    self._first_batch = self._train_data.first_batch
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
    return iterator, iterator_in_checkpoint

  def _build_model(self, hook, name: str) -> tuple[list, dict]:
    """compute_loss, the model, the optimizer and the metrics, each checked;
    returns the replica-local state and the metrics compute_loss returns."""
    c = self.config
    # compute_loss normalised (see losses.call_per_example), for the
    # compiled step, evaluation and forensics.
    default = None
    if type(self).compute_loss is Trainer.compute_loss:
      default = functools.partial(losses.default_loss, self._loss_fn, self.regularization_loss)
      compute_loss = self.compute_loss  # safetrain's own: its errors are about the data
    else:
      compute_loss = hook(
        "compute_loss", hook_checks.checking_loss(self.compute_loss, trainer=name)
      )
    self._call_compute_loss_per_example, self._call_compute_loss = losses.normalised(
      compute_loss, default, trainer=name
    )
    sample_loss = functools.partial(
      losses.sample_loss, self._call_compute_loss, trainer=type(self).__name__
    )

    self.model = hook("build_model", self.build_model)()
    if not isinstance(self.model, keras.Model):
      raise TypeError(f"build_model() returned {type(self.model).__name__}, not a keras.Model")
    self._labels = self._label_check()
    if self._labels is not None:
      # Every eager pass of the build (and the replays after) reads the first
      # batch with its bad labels replaced; the loop still drops them.
      self._first_batch = self._train_data.first_batch = self._labels.in_range(self._first_batch)
    if not self.model.built:
      sample_loss(self.model, self._first_batch, self._element_spec)  # builds the variables
    hook_checks.check_model(self.model, trainer=name)
    self.optimizer = hook("build_optimizer", self.build_optimizer)()
    if not self._optimizer_may_clip:
      hook_checks.check_optimizer(self.optimizer, trainer=name)
    self._lr_factor = optimizers_lib.LearningRateFactor()
    own = type(self).build_optimizer is Trainer.build_optimizer
    optimizers_lib.wrap_from_config(self.optimizer, c, self._recovery, self._lr_factor, own=own)
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
    _, sample_metrics = sample_loss(self.model, self._first_batch, self._element_spec)
    self._train_metrics, self._eval_metrics = stateful_metrics.build_sets(
      hook("build_metrics", self.build_metrics),
      name,
      taken=set(sample_metrics),
      first_batch=self._first_batch,
      # Fails now, eagerly, if an override does not return y_pred.
      check_pred=lambda: self._call_compute_loss(
        self.model, self._first_batch, False, with_pred=True
      ),
    )
    return replica_state, sample_metrics

  def _declare_state(self, iterator, iterator_in_checkpoint: bool, name: str) -> None:
    """The run's state, declared once, and the checkpoint store derived from it."""
    c = self.config
    E = state.Entry  # noqa: N806
    self.state = state.Declaration(
      [
        E("model", self.model, rolls_back=True),
        # Every model variable by position, so that state Keras does not
        # expose to tf.train.Checkpoint (dropout's SeedGenerator) is saved too.
        E("model_variables", list(self.model.variables), True, list(self.model.variables)),
        E("optimizer", self.optimizer, True, list(self.optimizer.variables)),
        E("run", self._run, True, self._run),
        E("loss_scale", self._loss_scale, True, self._loss_scale),
        E("spike", self._spike, True, self._spike),
        E("health", self._health_state, True, self._health_state),
        # Carried across rollbacks: where the data is, what recovery learned,
        # the user's rate factor and the gradient scale.
        E("data", self._data, rolls_back=False),
        E("recovery", self._recovery, rolls_back=False),
        E("lr_factor", self._lr_factor, rolls_back=False),
        E("clip", self._clip, rolls_back=False),
        E("iterator", iterator, rolls_back=False, checkpointed=iterator_in_checkpoint),
      ]
    )
    self._rollback_objects = self.state.rolled_back()
    self._checkpoints = checkpointing.build(
      c,
      self.workdir,
      rollback=self._rollback_objects,
      carried=self.state.carried(),
      write=self._is_chief,
      owner=name,
      position_key=self.state.key_of(self._data.position),
      generation_key=self.state.key_of(self._recovery.rollbacks_total),
    )

  def _build_loop(self, replica_state: list, sample_metrics: dict) -> None:
    """The guard pieces and the compiled loop."""
    c = self.config
    with_pred = bool(self._train_metrics)
    labels, shapes = self._batch_checks()
    self._label_classes = labels.num_classes if labels is not None else None
    self._pieces = registry.build(
      c,
      piece_lib.BuildContext(
        model=self.model,
        leaf_names=tuple(self._train_data.leaf_names),
        fp16=self._loss_scale.enabled,
        num_replicas=self._strategy.num_replicas_in_sync,
        loss_scale=self._loss_scale,
        spike=self._spike,
        clip=self._clip,
        replica_state=replica_state,
        labels=labels,
        shapes=shapes,
      ),
    )
    jit = jit_compile(c.train.jit_compile)
    self._loop = step_lib.GuardedLoop(
      strategy=self._strategy,
      model=self.model,
      optimizer=self.optimizer,
      compute_loss=functools.partial(self._call_compute_loss_per_example, with_pred=with_pred),
      pieces=self._pieces,
      drill=self._drill,
      rollback_after=c.guard.rollback_after,
      raise_on_bad_inputs=c.guard.bad_inputs == "raise",
      repeat_data=c.train.repeat_data,
      variables=loop_state.LoopVariables(
        step=self._run.step,
        consecutive_bad=self._run.consecutive_bad,
        attempts=self._recovery.attempts,
        position=self._data.position,
      ),
      replica_state=replica_state,
      stash=self._stash.variables if self._stash is not None else None,
      skip_keras_all_reduce=self._skip_keras_all_reduce,
      metric_names=sorted(sample_metrics),
      jit_compile=jit,
      train_metrics=self._train_metrics or None,
      skip_update=skip_update(c.train.skip_update, jit_compile=jit),
      element_spec=self._element_spec,
    )
    self._all_finite_fn = tf.function(self._loop.params_finite, autograph=False)

  def _takes_class_indices(self) -> bool:
    """Whether the loss reads `y` as integer class labels in [0, the
    model's output size): the default compute_loss with a sparse categorical
    `config.loss` (safetrain.fit's trainer says it for a compiled Keras loss)."""
    return type(self).compute_loss is Trainer.compute_loss and losses.takes_class_indices(
      self.config.loss
    )

  def _label_check(self) -> batch_checks.Labels | None:
    """The label check, when the loss takes class indices: `y` of the first
    batch against the model's output size (which an unbuilt model's call on
    the first batch's x builds, as the default compute_loss would)."""
    first = self._first_batch
    leaf = data_lib.label_leaf(first)
    if not self._takes_class_indices() or leaf is None:
      return None
    y = tf.nest.flatten(first)[leaf]
    x, _, _ = data_lib.unpack_batch(first)
    n = losses.num_classes(self.model, x)
    if n is None or not (y.dtype.is_integer or y.dtype.is_floating):
      return None
    name = guard.flatten_with_names(first)[leaf][0]
    return batch_checks.Labels(leaf=leaf, name=name, num_classes=n)

  def _batch_checks(self) -> tuple[batch_checks.Labels | None, batch_checks.Shapes | None]:
    """What the input check holds batches to beyond finiteness.

    Labels: when the loss takes class indices (`_takes_class_indices`), the
    label `y` against the model's output size (an override's labels may mean
    anything: not checked). Shapes: the leaves
    whose element spec leaves a non-batch dimension unknown, against the
    first batch's, unless the model declares a variable input dimension
    (a sequence model takes varying lengths) or declares no inputs.
    """
    first = self._first_batch
    labels = self._labels
    shapes = None
    unknown = batch_checks.unknown_dims(self._element_spec)
    if unknown and batch_checks.model_takes_any_shape(self.model) is False:
      names = [name for name, _ in guard.flatten_with_names(self._element_spec)]
      flat = tf.nest.flatten(first)
      shapes = batch_checks.Shapes(
        leaves=tuple(unknown),
        names=tuple(names[i] for i in unknown),
        expected=tuple(tuple(int(d) for d in flat[i].shape[1:]) for i in unknown),
        substitute=batch_checks.sanitised_row(first, labels),
      )
    return labels, shapes

  def _build_host(self, hook, name: str, iterator, iterator_in_checkpoint: bool) -> None:
    """The host's parts: the compiled evaluation, the feed, the kept states,
    forensics; then recovery (`_build_recovery`) and the controller."""
    c = self.config
    with_pred = bool(self._train_metrics)
    self._evaluator = evaluation.Evaluator(
      strategy=self._strategy,
      build_dataset=hook("build_eval_dataset", self.build_eval_dataset),
      compute_loss=lambda batch: self._call_compute_loss(self.model, batch, False, with_pred),
      steps=c.eval.steps,
      metrics=self._eval_metrics or None,
      check_inputs=c.guard.check_inputs,
      bad_inputs=c.guard.bad_inputs,
      num_classes=self._label_classes,
    )
    self._compiled = compiled_lib.Compiled(
      loop=self._loop, evaluator=self._evaluator, all_finite=self._all_finite_fn
    )
    self._forensics = replay_lib.Context(
      model=self.model,
      optimizer=self.optimizer,
      compute_loss=self._call_compute_loss,
      fp16=self._loss_scale.enabled,
      loss_scale=self._loss_scale,
      spike=self._spike,
      drill_active=self._drill.active,
      max_abs_input=c.guard.preflight_max_abs_input,
    )
    self._feed = feed_lib.Feed(
      data=self._data,
      source=self._train_data,
      iterator=iterator,
      checkpointed=iterator_in_checkpoint,
    )
    self._keeper = keeper_lib.Keeper(
      run=self._run,
      feed=self._feed,
      health=health.build(
        c,
        model=self.model,
        optimizer=self.optimizer,
        first_batch=self._first_batch,
        state=self._health_state,
        spike=self._spike,
        lr_scale=self._recovery.lr_scale,
        reference=self._learn_reference(),
        last_restored=self._recovery.last_restored_step,
      ),
      all_finite=self._all_finite_fn,
      checkpoints=self._checkpoints,
      snapshots=snapshots.build(
        c.recovery, num_workers=self._num_workers, modules=self.state.snapshotted()
      ),
    )
    logs = self._build_recovery(forensics.Examiner(self._forensics, self._stash))
    self._controller = controller_lib.Controller(
      controller_lib.Parts(
        config=c,
        schedule=controller_lib.Schedule.from_config(c),
        preflight=preflight.Preflight.from_config(c),
        workdir=self.workdir,
        trainer_name=name,
        origin=self._origin,
        workers=self._workers,
        run=self._run,
        recovery=self._recovery,
        loss_scale=self._loss_scale,
        feed=self._feed,
        checkpoints=self._checkpoints,
        compiled=self._compiled,
        keeper=self._keeper,
        logs=logs,
        response=self._response,
        forensics=self._forensics,
        actions=callbacks_lib.make_actions(
          hook("actions", self.actions),
          hook("callbacks", self.callbacks),
          trainer=name,
          model=self.model,
          optimizer=self.optimizer,
          config=c,
        ),
        train_metrics=self._train_metrics or None,
      )
    )

  def _build_recovery(self, examiner: forensics.Examiner) -> controller_lib.Logs:
    """The incident and quarantine logs, the recovery mechanics (rollback,
    the rate probe) and the response with its remedies; returns the logs."""
    c = self.config
    logs = controller_lib.Logs(
      incidents=incidents_lib.IncidentLog(
        os.path.join(self.workdir, "incidents.jsonl"),
        enabled=self._is_chief,
        counter=self._recovery.incidents_total,
      ),
      quarantine=quarantine_lib.QuarantineLog(
        os.path.join(self.workdir, "quarantine.jsonl"), enabled=self._is_chief
      ),
    )
    mechanics = recovery.Recovery(
      policy=recovery.Policy.from_config(c.recovery),
      state=self._recovery,
      run=self._run,
      feed=self._feed,
      checkpoints=self._checkpoints,
      rollback_objects=self._rollback_objects,
      keeper=self._keeper,
      workers=self._workers,
      incidents=logs.incidents,
      examiner=examiner,
      probe=rate_probe.RateProbe(
        factors=c.recovery.probe_factors,
        steps=c.recovery.probe_steps,
        min_lr_scale=c.recovery.min_lr_scale,
        loop=self._loop,
        feed=self._feed,
        lr_scale=self._recovery.lr_scale,
        # Carried across rollbacks, yet a trial moves the adaptive clip's
        # statistics: put back after each.
        carried=list(self._clip.variables),
      ),
    )
    remedies = c.recovery.enabled
    self._response = response_lib.Response(
      run=self._run,
      recovery_state=self._recovery,
      incidents=logs.incidents,
      quarantine_log=logs.quarantine,
      actions=mechanics,
      examiner=examiner,
      health=self._keeper.health,
      pieces=self._pieces,
      train_steps=c.train.steps,
      feed=self._feed,
      keeper=self._keeper,
      float32_fallback=precision.Float32Fallback(
        ctx=self._forensics,
        incidents=logs.incidents,
        loss_scale=self._loss_scale,
        compiled=self._compiled,
        lr_scale=self._recovery.lr_scale,
      )
      if c.recovery.float32_fallback and remedies
      else None,
      scalar_rows=scalar_rows.ScalarRows(
        ctx=self._forensics,
        piece=self._pieces.get("per_example") if c.recovery.scalar_rows and remedies else None,
        compiled=self._compiled,
        single_replica=self._strategy.num_replicas_in_sync == 1,
        incidents=logs.incidents,
        lr_scale=self._recovery.lr_scale,
      ),
    )
    return logs

  @property
  def _iterator(self):
    """The live training iterator (re-created by position after a restore)."""
    return self._feed.iterator

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
    self._ready_for_inference()
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
    path = evaluation.restore_model(
      self._checkpoints, self.model, healthy=lambda: bool(self._all_finite_fn())
    )
    self._state_ready = True
    return path

  def _ready_for_inference(self) -> None:
    """Builds, and restores unless this process trained, resumed or restored."""
    self.build()
    if not (self._state_ready or self._controller.started):
      self.restore()

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
    self._ready_for_inference()
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
    lock = workdir_lib.WorkdirLock.from_config(self.workdir, self.config)
    with lock if chief else contextlib.nullcontext():
      self.build()
      result = self._controller.fit()
      if result.stopped != "preempted" and self._is_chief:
        result.exported = export_lib.export_on_finish(self.export, self.workdir)
      return result

  def summary_line(self, result: FitResult) -> str:
    """One line about a finished fit(): incidents, recovery, the last eval."""
    return summary_line(result)
