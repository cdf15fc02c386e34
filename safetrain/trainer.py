"""The Trainer: a compiled, guarded inner loop and an eager outer loop.

The split follows Orbit. `_train_loop` is one `tf.function` that runs up to
`train.steps_per_loop` guarded steps in a `tf.while_loop` and returns per-loop
counters; the host reads them once per loop. Between loops, eager Python writes
checkpoints, summaries, metrics and incidents, evaluates, and runs recovery.
"""

from __future__ import annotations

import dataclasses
import json
import logging as py_logging
import os
import signal
import sys
import time
from typing import Any

import keras
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from safetrain import checkpointing, distribute, evaluation, forensics, guard, kinds, preflight
from safetrain import config as config_lib
from safetrain import data as data_lib
from safetrain import optimizers as optimizers_lib
from safetrain import spike as spike_lib
from safetrain import step as step_lib
from safetrain import workdir as workdir_lib
from safetrain.drill import Drill
from safetrain.errors import BadInputError, DivergenceError, PreflightError, WorkdirError
from safetrain.loss_scale import DynamicLossScale
from safetrain.records import JsonlWriter, read_jsonl


@dataclasses.dataclass
class FitResult:
  """What `Trainer.fit()` returns.

  Attributes:
    step: applied updates (skipped steps do not count).
    loss: mean training loss over the good steps of the last loop (NaN when
      no loop ran, as on a workdir already at train.steps).
    incidents: the incident records of the run (as in incidents.jsonl).
    rollbacks: rollbacks performed over the whole run, resumes included.
    lr_scale: the learning-rate scale recovery left in force.
    attempts: steps attempted, skipped ones included.
    skipped_steps: attempts that did not update the model.
    batches_skipped: batches passed over by rollbacks with recovery.data=skip.
    loss_scale: the loss scale at the end (1.0 unless mixed_float16).
    eval_metrics: the last evaluation's metrics ({} if none ran).
    stopped: "completed", "preempted" or "data_exhausted".
  """

  step: int
  loss: float
  incidents: list
  rollbacks: int
  lr_scale: float
  attempts: int = 0
  skipped_steps: int = 0
  batches_skipped: int = 0
  loss_scale: float = 1.0
  eval_metrics: dict = dataclasses.field(default_factory=dict)
  stopped: str = "completed"


class _RunState(tf.Module):
  """State that rolls back with the model."""

  def __init__(self, precision: str):
    super().__init__(name="run_state")
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    self.consecutive_bad = tf.Variable(0, dtype=tf.int64, trainable=False, name="consecutive_bad")
    # The policy the checkpoint was written under (an index into
    # config.POLICIES; numbers, since strings cannot be mirrored): a resume
    # under another one starts the loss scale afresh.
    self.precision = tf.Variable(
      config_lib.POLICIES.index(precision), dtype=tf.int64, trainable=False, name="precision"
    )


class _DataState(tf.Module):
  """Batches consumed, and what the data looked like. Rolls back only with
  recovery.data=replay."""

  def __init__(self, data: data_lib.TrainData):
    super().__init__(name="data_state")
    self.position = tf.Variable(0, dtype=tf.int64, trainable=False, name="position")
    # Compared on resume with the dataset the resumed run builds (as hashes:
    # strings cannot be mirrored over replicas).
    v = lambda x, name: tf.Variable(x, dtype=tf.int64, trainable=False, name=name)  # noqa: E731
    self.spec = v(data_lib.hash64(data.spec_text), "spec")
    self.rows = v(data.batch_rows or 0, "rows")
    self.fingerprint = v(data_lib.hash64(data.fingerprint), "fingerprint")


class _RecoveryState(tf.Module):
  """What the run has learned about itself. Never rolled back; checkpointed,
  so a resumed run keeps its lowered learning rate and spent budget."""

  def __init__(self):
    super().__init__(name="recovery_state")
    v = lambda x, name, dt=tf.int64: tf.Variable(x, dtype=dt, trainable=False, name=name)  # noqa: E731
    self.lr_scale = v(1.0, "lr_scale", tf.float32)
    self.rewarm_start = v(-1, "rewarm_start")
    self.attempts = v(0, "attempts")
    self.rollbacks_used = v(0, "rollbacks_used")
    self.rollbacks_total = v(0, "rollbacks_total")
    self.incidents_total = v(0, "incidents_total")
    self.skipped_total = v(0, "skipped_total")
    self.batches_skipped = v(0, "batches_skipped")
    self.last_restored_step = v(-1, "last_restored_step")
    self.budget_anchor_step = v(0, "budget_anchor_step")

  def snapshot(self) -> dict[str, Any]:
    return {k: var.numpy().item() for k, var in self._vars().items()}

  def _vars(self) -> dict[str, tf.Variable]:
    return {k: x for k, x in vars(self).items() if isinstance(x, tf.Variable)}


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
    self._built = False
    # True once the model holds a trained or restored state (fit() ran, or
    # evaluate() restored a checkpoint).
    self._state_ready = False
    self._stop_signal = None
    self.model: keras.Model | None = None
    self.optimizer: keras.optimizers.Optimizer | None = None

  # ---------------------------------------------------------------- hooks

  def build_model(self) -> keras.Model:
    """Returns the Keras model. Required. Runs eagerly, once, in scope."""
    raise NotImplementedError("subclasses of Trainer implement build_model()")

  def build_train_dataset(self) -> tf.data.Dataset:
    """Returns the training dataset, batched with `config.train.batch_size`.

    Required. Yields `(x, y)`, `(x, y, sample_weight)` or dicts. Runs eagerly,
    once. It need not repeat: safetrain repeats it (`train.repeat_data`).
    """
    raise NotImplementedError("subclasses of Trainer implement build_train_dataset()")

  def build_eval_dataset(self) -> tf.data.Dataset | None:
    """Returns the evaluation dataset, or None (the default) for no eval."""
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
    the mean over the batch it is given (after bad rows are dropped). The
    default applies `config.loss` to `model(x)` and `y` and adds the model's
    regularization losses, as Keras `fit` does. An override that wants them
    adds `self.regularization_loss(model)` after calling the model.
    """
    x, y, sample_weight = data_lib.unpack_batch(batch)
    pred = model(x, training=training)
    pred = tf.nest.map_structure(lambda p: tf.cast(p, tf.float32), pred)
    loss = self._loss_fn(y, pred, sample_weight=sample_weight)
    return loss + self.regularization_loss(model)

  def regularization_loss(self, model: keras.Model) -> tf.Tensor:
    """The sum of `model.losses`, in float32: kernel, bias and activity
    regularizers and `add_loss` terms, as Keras `fit` adds them to the loss.

    Call it in `compute_loss` after the model's forward pass (activity
    regularizers and `add_loss` terms come from that call). It is part of the
    loss the guard checks: a non-finite term makes a non-finite loss.
    """
    losses = [tf.reduce_sum(tf.cast(term, tf.float32)) for term in model.losses]
    if not losses:
      return tf.constant(0.0)
    # A sum of a stacked vector, not tf.add_n: an AddN of many terms inside the
    # compiled loop is what Grappler rewrites into temporary variables.
    return tf.reduce_sum(tf.stack(losses))

  # ------------------------------------------------------------- building

  @property
  def strategy(self) -> tf.distribute.Strategy:
    self._build()
    return self._strategy

  def _build(self) -> None:
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
    self._loss_fn = _make_loss(c.loss)
    self._fp16 = c.precision.policy == "mixed_float16"
    self._drill = Drill(**c.drill)
    os.makedirs(self.workdir, exist_ok=True)

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(c.precision.policy)
    try:
      with self._strategy.scope():
        self._build_in_scope()
    finally:
      keras.mixed_precision.set_global_policy(previous_policy)
    self._built = True

  def _build_in_scope(self) -> None:
    c = self.config
    self._run = _RunState(c.precision.policy)
    self._recovery = _RecoveryState()
    ls = c.loss_scale
    self._loss_scale = DynamicLossScale(
      initial=ls.initial,
      growth_interval=ls.growth_interval,
      growth_factor=ls.growth_factor,
      backoff_factor=ls.backoff_factor,
      hysteresis=ls.hysteresis,
      min_scale=ls.min_scale,
      max_scale=ls.max_scale,
      enabled=self._fp16,
    )
    g = c.guard
    self._spike = spike_lib.SpikeDetector(
      enabled=g.spike_detection,
      warmup_steps=g.spike_warmup_steps,
      threshold=g.spike_threshold,
      rel_floor=g.spike_rel_floor,
      decay=g.spike_decay,
    )

    self._train_data = data_lib.TrainData(
      self.build_train_dataset, repeat=c.train.repeat_data, strategy=self._strategy
    )
    self._element_spec = self._train_data.element_spec
    self._first_batch = self._train_data.first_batch
    self._leaf_names = self._train_data.leaf_names
    self._iterator = self._train_data.iterator()
    # An iterator that cannot be checkpointed (distributed, or a pipeline with
    # state outside the graph) is found again by its data position: resume
    # and replay re-create it there (`_seek_data`).
    self._iterator_in_checkpoint = self._train_data.checkpointable(self._iterator)
    if self._train_data.stateful is not None:
      data_lib.log_position_based(self._train_data.stateful)
    self._data = _DataState(self._train_data)

    self.model = self.build_model()
    if not isinstance(self.model, keras.Model):
      raise TypeError(f"build_model() returned {type(self.model).__name__}, not a keras.Model")
    if not self.model.built:
      # Build variables outside the compiled step, on a sample batch.
      self._sample_loss()
    self.optimizer = self.build_optimizer()
    self._wrap_learning_rate(self.optimizer)
    self.optimizer.build(self.model.trainable_variables)
    self._skip_keras_all_reduce = distribute.skip_optimizer_all_reduce(
      self.optimizer, self._strategy
    )
    self._stash = self._make_stash()
    self._replica_state = self._find_replica_state()
    _, metrics = self._sample_loss()
    self._metric_names = sorted(metrics)

    self._rollback_objects = dict(
      model=self.model,
      # Every model variable by position, so that state Keras does not expose
      # to tf.train.Checkpoint (dropout's SeedGenerator) is saved too.
      model_variables=list(self.model.variables),
      optimizer=self.optimizer,
      run=self._run,
      loss_scale=self._loss_scale,
      spike=self._spike,
    )
    # A drill that cannot fire on this data is a config error, not a no-op.
    self._drill.check(self._element_spec, self._strategy.num_replicas_in_sync)
    self._checkpoints = checkpointing.CheckpointStore(
      os.path.join(self.workdir, "checkpoints"),
      max_to_keep=c.checkpoint.max_to_keep,
      objects=dict(
        self._rollback_objects,
        data=self._data,
        recovery=self._recovery,
        **({"iterator": self._iterator} if self._iterator_in_checkpoint else {}),
      ),
      write=self._is_chief,
      owner=type(self).__qualname__,
      # What a rollback keeps (not restored): persisted by the rollback
      # itself, with no model save (see checkpointing.record_rollback).
      carry=("data", "recovery", "iterator"),
      generation_key="recovery/rollbacks_total/.ATTRIBUTES/VARIABLE_VALUE",
    )
    self._loop = step_lib.GuardedLoop(
      strategy=self._strategy,
      model=self.model,
      optimizer=self.optimizer,
      compute_loss=self._call_compute_loss,
      loss_scale=self._loss_scale,
      spike=self._spike,
      drill=self._drill,
      input_guard=guard.InputGuard(
        enabled=c.guard.check_inputs, policy=c.guard.bad_inputs, leaf_count=len(self._leaf_names)
      ),
      clip_norm=c.clip.global_norm,
      rollback_after=c.guard.rollback_after,
      raise_on_bad_inputs=c.guard.bad_inputs == "raise",
      repeat_data=c.train.repeat_data,
      variables=step_lib.LoopVariables(
        step=self._run.step,
        consecutive_bad=self._run.consecutive_bad,
        attempts=self._recovery.attempts,
        position=self._data.position,
      ),
      replica_state=self._replica_state,
      stash=self._stash,
      skip_keras_all_reduce=self._skip_keras_all_reduce,
      metric_names=self._metric_names,
    )
    self._train_loop_fn = self._loop.function
    self._all_finite_fn = tf.function(self._all_finite)
    self._evaluator = evaluation.Evaluator(
      strategy=self._strategy,
      build_dataset=self.build_eval_dataset,
      compute_loss=lambda batch: self._call_compute_loss(self.model, batch, training=False),
      steps=c.eval.steps,
    )

  def _sample_loss(self):
    """compute_loss on the first batch, eagerly. A batch that does not fit the
    model or the loss fails here, as a BadInputError naming what the dataset
    yields, not later inside the compiled step."""
    try:
      return self._call_compute_loss(self.model, self._first_batch, training=False)
    except (ValueError, TypeError, KeyError, IndexError, tf.errors.OpError) as e:
      if isinstance(e, BadInputError):
        raise
      spec = tf.nest.map_structure(lambda s: f"{s.dtype.name}{list(s.shape)}", self._element_spec)
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise BadInputError(
        f"the first training batch does not fit {type(self).__name__}'s model and "
        f"compute_loss ({type(e).__name__}: {first}). The dataset yields {spec}; the default "
        "compute_loss expects (x, y), (x, y, sample_weight) or dicts with 'x' and 'y', "
        "with x as the model's input."
      ) from e

  def _resume_data(self) -> None:
    """Finds the data position of a restored checkpoint in this run's dataset.

    A checkpointed iterator that does not fit this run's pipeline (its
    definition or element spec changed: another train.batch_size, a new map)
    is re-created from build_train_dataset() at the same number of examples
    in. A dataset whose first batch changed (the data was fixed) is said once
    in the log.
    """
    d, data = self._data, self._train_data
    changed = int(d.spec.numpy()) != data_lib.hash64(data.spec_text)
    if self._iterator_in_checkpoint and (changed or not self._checkpoints.iterator_restored):
      saved_rows, position = int(d.rows.numpy()), int(d.position.numpy())
      if saved_rows and data.batch_rows:
        position = position * saved_rows // data.batch_rows
      what = (
        f"the data changed shape since the checkpoint (batches of {saved_rows or '?'} rows "
        f"then, {data.spec_text} now)"
        if changed
        else "the input pipeline's definition changed since the checkpoint"
      )
      logging.warning(
        "%s: the data iterator is re-created from build_train_dataset() at batch %d (the "
        "same number of examples in) instead of restored, so the batch order from here "
        "differs from an uninterrupted run.",
        what[0].upper() + what[1:],
        position,
      )
      d.position.assign(position)
      self._iterator = data.iterator(position, checkpointed=True)
      self._checkpoints.replace_objects(iterator=self._iterator)
    elif not self._iterator_in_checkpoint:
      self._seek_data()
    if int(d.fingerprint.numpy()) != data_lib.hash64(data.fingerprint):
      logging.warning(
        "The first training batch differs from the one the checkpointed run read: the "
        "data (or an unseeded shuffle) changed. %s",
        "The rest of the current epoch still comes from the checkpointed iterator's "
        "buffers (the old data); the new data is read from the next pass on."
        if self._iterator_in_checkpoint and self._checkpoints.iterator_restored and not changed
        else "The iterator was re-created from the new data.",
      )
    d.spec.assign(data_lib.hash64(data.spec_text))
    d.rows.assign(data.batch_rows or 0)
    d.fingerprint.assign(data_lib.hash64(data.fingerprint))

  def _resume_precision(self) -> None:
    saved = config_lib.POLICIES[int(self._run.precision.numpy())]
    policy = self.config.precision.policy
    if saved != policy:
      self._loss_scale.reset()
      logging.warning(
        "Resuming a %s checkpoint under precision.policy=%s: the loss scale starts afresh at %g.",
        saved,
        policy,
        float(self._loss_scale.scale.numpy()),
      )
      self._run.precision.assign(config_lib.POLICIES.index(policy))

  def _seek_data(self) -> None:
    """Re-creates an iterator that is not checkpointed at `data.position`."""
    self._iterator = self._train_data.iterator(int(self._data.position.numpy()))

  def _wrap_learning_rate(self, optimizer) -> None:
    base = optimizer._learning_rate  # Keras keeps either a schedule or a variable.
    if isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
      pass
    elif optimizer is not None and self._uses_default_optimizer():
      o = self.config.optimizer
      base = optimizers_lib.build_schedule(
        name=o.schedule,
        learning_rate=o.learning_rate,
        total_steps=self.config.train.steps,
        warmup_steps=o.warmup_steps,
        end_lr_factor=o.end_lr_factor,
      )
    else:
      base = float(np.asarray(base))
    # Assigned to the attribute, not through the `learning_rate` setter: the
    # setter untracks the optimizer's learning-rate variable in place, which
    # breaks tf.train.Checkpoint's append-only tracking of optimizer.variables.
    optimizer._learning_rate = optimizers_lib.ScaledSchedule(
      base, self._recovery.lr_scale, self._recovery.rewarm_start, self.config.recovery.rewarm_steps
    )

  def _uses_default_optimizer(self) -> bool:
    return type(self).build_optimizer is Trainer.build_optimizer

  def _find_replica_state(self) -> list:
    """Float non-trainable variables the training forward pass updates.

    Keras updates them (BatchNorm's moving statistics) on each replica from its
    own shard, so replicas would drift apart; the step sets them to their mean
    over replicas instead. Found once by a probe forward pass, which is undone.
    """
    if self._strategy.num_replicas_in_sync == 1:
      return []
    variables = self.model.non_trainable_variables
    before = [v.numpy() for v in variables]
    self._call_compute_loss(self.model, self._first_batch, training=True)
    changed = [
      v
      for v, b in zip(variables, before)
      if tf.as_dtype(v.dtype).is_floating and not np.array_equal(v.numpy(), b)
    ]
    for v, b in zip(variables, before):
      v.assign(b)
    return changed

  def _make_stash(self):
    """Variables that keep the last divergent batch for forensics."""
    if self._strategy.num_replicas_in_sync != 1:
      return None
    specs = tf.nest.flatten(self._element_spec)
    return [
      tf.Variable(
        tf.zeros([0] * len(s.shape), s.dtype),
        shape=tf.TensorShape([None] * len(s.shape)),
        trainable=False,
        name=f"stash_{i}",
      )
      if s.dtype != tf.string
      else None
      for i, s in enumerate(specs)
    ]

  # ------------------------------------------------------- compiled step

  def _call_compute_loss(self, model, batch, training):
    out = self.compute_loss(model, batch, training)
    if isinstance(out, (tuple, list)):
      loss, metrics = out
    else:
      loss, metrics = out, {}
    return tf.cast(loss, tf.float32), {k: tf.cast(v, tf.float32) for k, v in metrics.items()}

  def _all_finite(self):
    variables = self.model.variables + self.optimizer.variables
    flags = [
      tf.reduce_all(tf.math.is_finite(v)) for v in variables if tf.as_dtype(v.dtype).is_floating
    ]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)

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
    self._build()
    if not self._state_ready:
      self._restore_for_inference()
    return self._evaluator()

  def _restore_for_inference(self) -> None:
    """Loads the newest committed checkpoint that reads back finite into the
    model, without repairing or moving anything (a run may be writing)."""
    path = self._checkpoints.restore_model_readonly(
      dict(model=self.model, model_variables=list(self.model.variables)),
      healthy=lambda: bool(self._all_finite_fn()),
    )
    if path is None:
      raise WorkdirError(
        f"no healthy checkpoint in {self._checkpoints.directory} to evaluate: train first "
        "(fit()), or point the trainer at the workdir of a trained run"
      )
    logging.info("Evaluating the model of %s", path)
    self._state_ready = True

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
      return self._fit()
    finally:
      if lock is not None:
        lock.release()

  def _fit(self) -> FitResult:
    self._build()
    c = self.config
    self._metrics_log = JsonlWriter(
      os.path.join(self.workdir, "metrics.jsonl"), enabled=self._is_chief
    )
    self._incident_log = JsonlWriter(
      os.path.join(self.workdir, "incidents.jsonl"), enabled=self._is_chief
    )
    self._incidents: list[dict] = []
    resumed = self._restore_latest()
    self._state_ready = True
    if resumed is not None:
      self._resume_data()
      self._resume_precision()
    self._write_config(resumed)
    if resumed is None:
      self._run_preflight()
      self._save_checkpoint(force=True)  # the initial state is always a target
    else:
      logging.info(
        "Resumed from %s at step %d (lr scale %.4g, %d rollbacks used).",
        resumed,
        self._step(),
        self._recovery.lr_scale.numpy(),
        self._recovery.rollbacks_used.numpy(),
      )
    writer = (
      tf.summary.create_file_writer(os.path.join(self.workdir, "events"))
      if self._is_chief
      else tf.summary.create_noop_writer()
    )
    progress = _Progress(c.train.steps, c.train.log_every_steps)
    eval_metrics: dict = {}
    last_loss = float("nan")
    stopped = "completed"
    with _SignalCatcher(self):
      while self._step() < c.train.steps:
        step0 = self._step()
        n = self._next_loop_length(step0)
        t0 = time.perf_counter()
        try:
          out = self._loop(self._iterator, n)
        except tf.errors.OpError as e:
          cause = data_lib.pipeline_failure(e)
          if cause is None:
            raise
          # The loop's updates are in the variables but not in the counters:
          # nothing of it is saved, the last checkpoint stays the resume point.
          raise BadInputError(
            f"the training data pipeline failed after step {step0} ({cause}). The last "
            f"checkpoint ({self._checkpoints.latest_path()}) is intact: fix the data and run "
            "the same command to resume."
          ) from None
        dt = time.perf_counter() - t0
        step = self._step()
        applied = int(out.applied)
        if applied:
          last_loss = float(out.loss_sum) / applied
        record = self._loop_record(out, step, dt)
        params_ok = bool(self._all_finite_fn())
        self._record_loop_incidents(out, params_ok)
        stop = int(out.stop)
        if stop == step_lib.STOP_RAISE:
          self._save_checkpoint()
          raise BadInputError(self._bad_input_message(out))
        if stop == step_lib.STOP_ROLLBACK or not params_ok:
          kind = "nonfinite_params" if not params_ok else self._last_kind(out)
          self._recover(kind, out)
          record.update(rollback=True, step=self._step())
        self._refill_budget()
        if (
          c.eval.every_steps
          and self._step() % c.eval.every_steps == 0
          and self._step() < c.train.steps
          and stop != step_lib.STOP_ROLLBACK
        ):
          eval_metrics = self.evaluate()
          record.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        self._metrics_log.write(record)
        self._write_summaries(writer, record)
        progress.update(self._step(), dt, applied, record)
        if self._step() % c.checkpoint.every_steps == 0 or self._stop_signal:
          self._save_checkpoint()
        if stop == step_lib.STOP_DATA_END:
          logging.warning(
            "The training data ended at step %d before train.steps=%d; "
            "stopping cleanly (train.repeat_data is False).",
            self._step(),
            c.train.steps,
          )
          stopped = "data_exhausted"
          break
        if applied == 0 and int(out.counts[kinds.SKIPPED_BATCH]) == int(out.attempts):
          self._save_checkpoint()
          raise BadInputError(
            f"no usable batch in {int(out.attempts)} consecutive batches after step "
            f"{self._step()}: every one had non-finite inputs ({self._bad_leaves(out)}); "
            "clean the data or check the input pipeline"
          )
        if self._stop_signal:
          stopped = "preempted"
          break
    progress.close()
    if stopped != "preempted":
      self._save_checkpoint()
      eval_metrics = self.evaluate() or eval_metrics
      if eval_metrics:
        with writer.as_default(step=self._step()):
          for k, v in eval_metrics.items():
            tf.summary.scalar(f"eval/{k}", v)
        self._metrics_log.write(
          {
            "step": self._step(),
            "final_eval": True,
            **{f"eval_{k}": v for k, v in eval_metrics.items()},
          }
        )
    writer.flush()
    result = self._result(last_loss, eval_metrics, stopped)
    logging.info("%s", self.summary_line(result))
    return result

  def summary_line(self, result: FitResult) -> str:
    """One line about a finished fit(): incidents, recovery, the last eval."""
    text = (
      f"step {result.step}: {len(result.incidents)} incidents, "
      f"{result.rollbacks} rollbacks, lr scale {result.lr_scale:.4g}, "
      f"{result.batches_skipped} batches skipped, {result.skipped_steps} steps skipped"
    )
    ev = dict(result.eval_metrics)
    n = ev.pop(evaluation.EXAMPLES, None)
    if n is not None:
      shown = ", ".join(
        f"{k} {v:.4g}" for k, v in sorted(ev.items(), key=lambda kv: kv[0] != "loss")
      )
      text += f"; eval on {n} examples: {shown}"
    return text

  def _step(self) -> int:
    return int(self._run.step.numpy())

  def _next_loop_length(self, step: int) -> int:
    c = self.config
    bounds = [c.train.steps, _next_multiple(step, c.checkpoint.every_steps)]
    if c.eval.every_steps:
      bounds.append(_next_multiple(step, c.eval.every_steps))
    return max(1, min(min(bounds) - step, c.train.steps_per_loop))

  def _loop_record(self, out, step: int, dt: float) -> dict:
    applied = int(out.applied)
    counts = out.counts
    rec = {
      "step": step,
      "attempts": int(self._recovery.attempts.numpy()),
      "loss": float(out.loss_sum) / applied if applied else None,
      "last_loss": _finite_or_none(out.last_loss),
      "grad_norm": float(out.norm_sum) / applied if applied else None,
      "grad_norm_max": float(out.norm_max),
      "lr": float(out.lr),
      "lr_scale": float(self._recovery.lr_scale.numpy()),
      "loss_scale": float(self._loss_scale.scale.numpy()),
      "good": int(counts[kinds.GOOD]),
      "overflow": int(counts[kinds.OVERFLOW]),
      "divergence": int(counts[kinds.DIVERGENCE]),
      "skipped_batches": int(counts[kinds.SKIPPED_BATCH]),
      "dropped_rows": int(out.dropped),
      "spikes": int(out.kind_counts[kinds.LOSS_SPIKE]),
      "steps_per_sec": applied / dt if dt > 0 else None,
    }
    for k, v in out.metric_sums.items():
      rec[k] = float(v) / applied if applied else None
    return rec

  def _write_summaries(self, writer, record: dict) -> None:
    with writer.as_default(step=record["step"]):
      for k, v in record.items():
        if k in ("step", "time") or v is None or isinstance(v, bool):
          continue
        tf.summary.scalar(k if not k.startswith("eval_") else "eval/" + k[5:], v)

  # ------------------------------------------------------------ incidents

  def _incident(self, **fields) -> dict:
    rec = {
      "step": fields.pop("step"),
      "kind": fields.pop("kind"),
      "action": fields.pop("action"),
      "restored_step": fields.pop("restored_step", None),
      "lr_scale_before": fields.pop("lr_scale_before", None),
      "lr_scale_after": fields.pop("lr_scale_after", None),
      "batches_skipped": fields.pop("batches_skipped", 0),
      "diagnosis": fields.pop("diagnosis", ""),
      "time": time.time(),
      **fields,
    }
    self._incidents.append(rec)
    self._incident_log.write(rec)
    self._recovery.incidents_total.assign_add(1)
    logging.warning(
      "incident at step %s: %s -> %s. %s", rec["step"], rec["kind"], rec["action"], rec["diagnosis"]
    )
    return rec

  def _record_loop_incidents(self, out, params_ok: bool) -> None:
    """One record per kind seen in the loop, with how often it happened."""
    kc, first, last = out.kind_counts, out.kind_first, out.kind_last
    lr = float(self._recovery.lr_scale.numpy())
    for k, name in enumerate(kinds.KINDS):
      count = int(kc[k])
      if not count:
        continue
      if k == kinds.NONFINITE_INPUTS:
        action = "dropped_rows" if self.config.guard.bad_inputs == "drop_rows" else "skipped_batch"
        if self.config.guard.bad_inputs == "drop_rows" and int(out.counts[kinds.SKIPPED_BATCH]):
          action = "skipped_batch" if not int(out.dropped) else action
        diag = (
          f"non-finite values in {self._bad_leaves(out)}; "
          f"{int(out.dropped)} rows dropped, "
          f"{int(out.counts[kinds.SKIPPED_BATCH])} batches skipped"
        )
      else:
        action = "skipped_step"
        diag = kinds.text(name)
      self._incident(
        step=int(first[k]),
        kind=name,
        action=action,
        count=count,
        last_step=int(last[k]),
        lr_scale_before=lr,
        lr_scale_after=lr,
        diagnosis=diag,
      )
    skipped = int(out.attempts) - int(out.applied)
    self._recovery.skipped_total.assign_add(skipped)

  def _bad_leaves(self, out) -> str:
    parts = []
    for name, bad, col in zip(self._leaf_names, out.leaf_bad, out.cols):
      if bad:
        where = f"{name}[:, {int(col)}]" if col >= 0 else name
        parts.append(f"{where} ({int(bad)} rows)")
    return ", ".join(parts) or "the inputs"

  def _bad_input_message(self, out) -> str:
    return (
      f"non-finite input at step {self._step() + 1}: {self._bad_leaves(out)} "
      "(guard.bad_inputs=raise). The last healthy state is checkpointed; use "
      "guard.bad_inputs=drop_rows or skip_batch to train past it."
    )

  def _last_kind(self, out) -> str:
    last = out.kind_last
    candidates = [(int(last[k]), k) for k in range(1, len(kinds.KINDS)) if int(out.kind_counts[k])]
    return kinds.KINDS[max(candidates)[1]] if candidates else "nonfinite_loss"

  # ------------------------------------------------------------- recovery

  def _recover(self, kind: str, out) -> None:
    """Rolls back to a healthy checkpoint with a lower learning rate, or
    raises DivergenceError when the budget or the learning rate is spent."""
    c = self.config.recovery
    rec = self._recovery
    step = self._step()
    at_step = step + 1
    diagnosis = self._diagnose(kind, out)
    lr_before = float(rec.lr_scale.numpy())
    lr_after = lr_before * c.lr_backoff
    used = int(rec.rollbacks_used.numpy())
    reason = None
    if not c.enabled:
      reason = "recovery is disabled (recovery.enabled=False)"
    elif used >= c.max_rollbacks:
      reason = (
        f"the rollback budget is spent ({used} of recovery.max_rollbacks="
        f"{c.max_rollbacks} within {c.budget_reset_steps} steps)"
      )
    elif lr_after < c.min_lr_scale * (1 - 1e-6):
      reason = (
        f"the learning-rate scale would fall to {lr_after:.4g}, under "
        f"recovery.min_lr_scale={c.min_lr_scale:.4g}"
      )
    if reason is not None:
      self._abort(kind, at_step, diagnosis, reason, lr_before)
    position_before = int(self._data.position.numpy())
    while True:
      # The chief picks a target that reads back whole (a damaged one is set
      # aside first); every worker restores it, and one that restores
      # non-finite values is set aside too, and the next one tried.
      target = self._agreed_checkpoint(self._rollback_target() if self._is_chief else None)
      if target is None:
        self._abort(
          kind,
          at_step,
          diagnosis,
          "no checkpoint is left to roll back to (unusable ones were moved to "
          f"{os.path.join(self._checkpoints.directory, checkpointing.CORRUPT_DIR)})",
          lr_before,
        )
      restored_step = self._checkpoints.restore_rollback(
        target,
        self._rollback_objects,
        data=self._replay_objects() if c.data == "replay" else None,
      )
      if bool(self._all_finite_fn()):
        break
      if self._is_chief:
        self._checkpoints.set_aside(target, "it restores non-finite values")
    if c.data == "replay" and not self._iterator_in_checkpoint:
      self._seek_data()
    skipped = 0
    if c.data == "skip":
      skipped = position_before - self._checkpoints.position_of(target, self._data)
      rec.batches_skipped.assign_add(skipped)
    rec.lr_scale.assign(lr_after)
    rec.rollbacks_used.assign_add(1)
    rec.rollbacks_total.assign_add(1)
    rec.last_restored_step.assign(restored_step)
    rec.budget_anchor_step.assign(restored_step)
    if c.rewarm_steps:
      rec.rewarm_start.assign(restored_step)
    self._incident(
      step=at_step,
      kind=kind,
      action="rollback",
      restored_step=restored_step,
      lr_scale_before=lr_before,
      lr_scale_after=lr_after,
      batches_skipped=skipped,
      diagnosis=diagnosis,
      checkpoint=os.path.basename(target),
    )
    # Persist the lowered learning rate, spent budget and data position at
    # once, so a kill right after this rollback resumes with them: a small
    # side state committed atomically, never a rewrite of `target`.
    self._checkpoints.record_rollback(target, generation=int(rec.rollbacks_total.numpy()))

  def _restore_latest(self) -> str | None:
    """Restores the newest healthy checkpoint; returns its path or None.

    With several workers the chief picks it (repairing the directory if need
    be) and the others restore the same one from the chief's directory.
    """
    healthy = lambda: bool(self._all_finite_fn())  # noqa: E731
    if self._num_workers == 1:
      path = self._checkpoints.restore_latest(healthy=healthy)
    else:
      path = self._checkpoints.restore_latest(healthy=healthy) if self._is_chief else None
      path = self._agreed_checkpoint(path)
      if path is not None and not self._is_chief:
        self._checkpoints.restore_path(path)
    if path is not None and self._step() > self.config.train.steps:
      logging.warning(
        "The workdir is at step %d, past train.steps=%d: nothing to train (a lower "
        "train.steps never undoes steps).",
        self._step(),
        self.config.train.steps,
      )
    return path

  def _agreed_checkpoint(self, path: str | None) -> str | None:
    """The chief's choice of checkpoint, on every worker (a collective)."""
    if self._num_workers == 1:
      return path
    step = -1 if path is None else checkpointing.step_of(path)
    step = distribute.broadcast_from_chief(self._strategy, step, self._is_chief)
    if self._is_chief:
      return path
    return None if step < 0 else os.path.join(self._checkpoints.directory, f"ckpt-{step}")

  def _replay_objects(self) -> dict:
    if self._iterator_in_checkpoint:
      return dict(data=self._data, iterator=self._iterator)
    return dict(data=self._data)

  def _rollback_target(self) -> str | None:
    """The newest healthy checkpoint, or one further back when the run has not
    got past the state the previous rollback restored (escalation).

    A target that does not read back whole is set aside (corrupt/) and the
    next one chosen; None when none is left.
    """
    last_restored = int(self._recovery.last_restored_step.numpy())
    while True:
      ckpts = self._checkpoints.checkpoints()  # [(step, path)] oldest first
      if not ckpts:
        return None
      target = ckpts[-1][1]
      if last_restored >= 0 and ckpts[-1][0] <= last_restored:
        older = [p for s, p in ckpts if s < last_restored]
        if older:
          target = older[-1]
      problem = self._checkpoints.check_readable(target)
      if problem is None:
        return target
      self._checkpoints.set_aside(target, problem)

  def _refill_budget(self) -> None:
    rec = self._recovery
    if (
      int(rec.rollbacks_used.numpy()) > 0
      and self._step() - int(rec.budget_anchor_step.numpy())
      >= self.config.recovery.budget_reset_steps
    ):
      logging.info(
        "Rollback budget refilled after %d healthy steps.", self.config.recovery.budget_reset_steps
      )
      rec.rollbacks_used.assign(0)

  def _abort(self, kind: str, at_step: int, diagnosis: str, reason: str, lr: float):
    rec = self._recovery
    kinds = {}
    for inc in self._incidents:
      if inc["action"] != "dropped_rows":
        kinds[inc["kind"]] = kinds.get(inc["kind"], 0) + inc.get("count", 1)
    seen = ", ".join(f"{v}x {k}" for k, v in kinds.items()) or kind
    last = self._checkpoints.latest_path()
    text = (
      f"Training diverged at step {at_step} ({kind}): {diagnosis} Over this run: "
      f"{seen}; {int(rec.rollbacks_total.numpy())} rollbacks, learning-rate scale "
      f"now {lr:.4g}, {int(rec.batches_skipped.numpy())} batches skipped. Stopping "
      f"because {reason}. The last healthy checkpoint is intact: {last}. Try a lower "
      "optimizer.learning_rate, normalized inputs, or a tighter clip.global_norm."
    )
    self._incident(
      step=at_step, kind=kind, action="abort", lr_scale_before=lr, lr_scale_after=lr, diagnosis=text
    )
    raise DivergenceError(
      text, step=self._step(), last_healthy_checkpoint=last, incidents=list(self._incidents)
    )

  def _diagnose(self, kind: str, out) -> str:
    batch = None
    if self._stash is not None and kind != "nonfinite_params":
      flat = [v.value() if v is not None else None for v in self._stash]
      if all(t is not None for t in flat) and int(tf.shape(flat[0])[0]) > 0:
        batch = tf.nest.pack_sequence_as(self._element_spec, flat)
    try:
      return forensics.diagnose(self, kind=kind, batch=batch, step=self._step() + 1)
    except Exception as e:  # Forensics must never hide the incident itself.
      logging.warning("forensics failed: %s", e)
      return kinds.text(kind)

  # ---------------------------------------------------------- checkpoints

  def _save_checkpoint(self, force: bool = False) -> None:
    """Saves the state if it is healthy and not durable yet.

    A state whose step was just saved, resumed from, or rolled back to is
    durable already (a rollback's side state holds what differs), whatever
    `force` says: a committed checkpoint is never written again.
    """
    del force  # the initial save: nothing is durable yet
    if int(self._run.consecutive_bad.numpy()) != 0:
      return  # only healthy states are saved
    if not bool(self._all_finite_fn()):
      return
    step = self._step()
    if self._checkpoints.current_step() == step:
      return
    self._checkpoints.save(step)

  def _run_preflight(self) -> None:
    mode = self.config.guard.preflight
    if mode == "off":
      return
    findings = preflight.run(self, self._first_batch)
    for f in findings:
      logging.warning("preflight: %s", f)
      if not _quiet():
        print(f"safetrain preflight: {f}", file=sys.stderr)
    if findings and mode == "strict":
      raise PreflightError(
        "preflight found problems (guard.preflight=strict): " + "; ".join(str(f) for f in findings)
      )

  def _write_config(self, resumed) -> None:
    if not self._is_chief:
      return
    path = os.path.join(self.workdir, "config.json")
    data = {
      "config": self.config.to_dict(),
      "trainer": type(self).__qualname__,
      "resumed_from": resumed,
      "time": time.time(),
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)

  def _result(self, last_loss: float, eval_metrics: dict, stopped: str) -> FitResult:
    rec = self._recovery
    return FitResult(
      step=self._step(),
      loss=last_loss,
      incidents=read_jsonl(os.path.join(self.workdir, "incidents.jsonl"))
      if self._is_chief
      else list(self._incidents),
      rollbacks=int(rec.rollbacks_total.numpy()),
      lr_scale=float(rec.lr_scale.numpy()),
      attempts=int(rec.attempts.numpy()),
      skipped_steps=int(rec.skipped_total.numpy()),
      batches_skipped=int(rec.batches_skipped.numpy()),
      loss_scale=float(self._loss_scale.scale.numpy()),
      eval_metrics=eval_metrics,
      stopped=stopped,
    )


def _make_loss(name: str):
  if name == "softmax_cross_entropy":
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  if name == "sigmoid_cross_entropy":
    return keras.losses.BinaryCrossentropy(from_logits=True)
  try:
    fn = keras.losses.get(name)
  except ValueError as e:
    raise config_lib.ConfigError(
      "loss", name, "a keras.losses name, softmax_cross_entropy or sigmoid_cross_entropy"
    ) from e
  if isinstance(fn, keras.losses.Loss):
    return fn

  def mean_loss(y, pred, sample_weight=None):
    per_example = tf.cast(fn(y, pred), tf.float32)
    if sample_weight is not None:
      per_example = per_example * tf.cast(sample_weight, tf.float32)
    return tf.reduce_mean(per_example)

  return mean_loss


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


def _finite_or_none(x):
  x = float(x)
  return x if np.isfinite(x) else None


def _quiet() -> bool:
  return not sys.stderr.isatty()


class _Progress:
  """A one-line progress display on a terminal; periodic log lines otherwise."""

  def __init__(self, total: int, log_every: int):
    self.total = total
    self.log_every = log_every
    self.tty = sys.stderr.isatty()
    self.start = time.perf_counter()
    self.next_log = log_every
    self.ema = None

  def update(self, step: int, dt: float, applied: int, record: dict) -> None:
    if applied and dt > 0:
      rate = applied / dt
      self.ema = rate if self.ema is None else 0.7 * self.ema + 0.3 * rate
    rate = self.ema or 0.0
    eta = (self.total - step) / rate if rate else float("nan")
    loss = record.get("loss")
    text = (
      f"step {step}/{self.total}  {rate:.1f} steps/s  loss "
      f"{loss if loss is None else format(loss, '.4g')}  ETA {_fmt_time(eta)}"
    )
    if self.tty:
      sys.stderr.write("\r" + text.ljust(79))
      sys.stderr.flush()
    elif step >= self.next_log or step >= self.total:
      logging.info("%s", text)
      while self.next_log <= step:
        self.next_log += self.log_every

  def close(self) -> None:
    if self.tty:
      sys.stderr.write("\n")


def _fmt_time(s: float) -> str:
  if not np.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _SignalCatcher:
  """On SIGTERM/SIGINT, let the current inner loop finish, checkpoint, stop."""

  def __init__(self, trainer: Trainer):
    self.trainer = trainer
    self.previous = {}

  def _handler(self, signum, frame):
    del frame
    self.trainer._stop_signal = signum
    logging.warning("Received signal %d: finishing this loop, checkpointing, stopping.", signum)

  def __enter__(self):
    self.trainer._stop_signal = None
    try:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self.previous[sig] = signal.signal(sig, self._handler)
    except ValueError:  # not the main thread: leave signals alone
      self.previous = {}
    return self

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)
    return False


py_logging.getLogger("tensorflow").setLevel(py_logging.ERROR)
