"""The Trainer: a compiled, guarded inner loop and an eager outer loop.

The split follows Orbit. `_train_loop` is one `tf.function` that runs up to
`train.steps_per_loop` guarded steps in a `tf.while_loop` and returns per-loop
counters; the host reads them once per loop. Between loops, eager Python writes
checkpoints, summaries, metrics and incidents, evaluates, and runs recovery.
"""

from __future__ import annotations

import dataclasses
import functools
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

from safetrain import checkpointing, distribute, forensics, guard, preflight
from safetrain import config as config_lib
from safetrain import optimizers as optimizers_lib
from safetrain import workdir as workdir_lib
from safetrain.drill import Drill
from safetrain.errors import BadInputError, DivergenceError, PreflightError
from safetrain.loss_scale import DynamicLossScale
from safetrain.records import JsonlWriter, read_jsonl

_STOP_NONE, _STOP_ROLLBACK, _STOP_DATA_END, _STOP_RAISE = 0, 1, 2, 3
_NUM_KINDS = len(guard.KINDS)


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

  def __init__(self):
    super().__init__(name="run_state")
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    self.consecutive_bad = tf.Variable(0, dtype=tf.int64, trainable=False, name="consecutive_bad")


class _DataState(tf.Module):
  """Batches consumed. Rolls back only with recovery.data=replay."""

  def __init__(self):
    super().__init__(name="data_state")
    self.position = tf.Variable(0, dtype=tf.int64, trainable=False, name="position")


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
    self.config = config
    self.workdir = os.fspath(workdir)
    self._built = False
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
    default applies `config.loss` to `model(x)` and `y`.
    """
    x, y, sample_weight = unpack_batch(batch)
    pred = model(x, training=training)
    pred = tf.nest.map_structure(lambda p: tf.cast(p, tf.float32), pred)
    return self._loss_fn(y, pred, sample_weight=sample_weight)

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
    self._run = _RunState()
    self._data = _DataState()
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
    self._spike = guard.SpikeDetector(
      enabled=g.spike_detection,
      warmup_steps=g.spike_warmup_steps,
      threshold=g.spike_threshold,
      rel_floor=g.spike_rel_floor,
      decay=g.spike_decay,
    )

    dataset = self._make_train_dataset()
    dist_ds = self._strategy.experimental_distribute_dataset(dataset)
    self._iterator = iter(dist_ds)
    # A distributed iterator cannot be checkpointed: its data position is, and
    # resume and replay re-create it there (`_seek_data`).
    self._iterator_in_checkpoint = distribute.is_checkpointable(self._iterator)
    self._leaf_names = guard.leaf_names(self._element_spec)

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
    self._train_loop_fn = tf.function(self._train_loop)
    self._all_finite_fn = tf.function(self._all_finite)
    self._eval_step_fn = None

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

  def _make_train_dataset(self) -> tf.data.Dataset:
    """Builds, checks and repeats the training dataset; reads the first batch."""
    dataset = self.build_train_dataset()
    if not isinstance(dataset, tf.data.Dataset):
      raise BadInputError(
        f"build_train_dataset() returned {type(dataset).__name__}, not a tf.data.Dataset"
      )
    self._element_spec = dataset.element_spec
    _check_element_spec(self._element_spec)
    if self.config.train.repeat_data:
      dataset = dataset.repeat()
    self._first_batch = next(iter(dataset.take(1)), None)
    if self._first_batch is None:
      raise BadInputError("build_train_dataset() returned an empty dataset")
    return dataset

  def _seek_data(self) -> None:
    """Re-creates a distributed iterator at `data.position`.

    The dataset is built afresh and read exactly as at build time, so a seeded
    shuffle yields the same batches; then the consumed batches are skipped.
    """
    dataset = self._make_train_dataset().skip(int(self._data.position.numpy()))
    self._iterator = iter(self._strategy.experimental_distribute_dataset(dataset))

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

  def _input_guard(self, batch, ctx, n_rep: int):
    """Finds non-finite rows; applies guard.bad_inputs (replica context).

    Returns (batch for the model, loss weight or None, input_skip, dropped
    rows, bad rows per float leaf, first bad column per float leaf). A clean
    batch costs one finiteness reduction per leaf; the rest runs only when
    something is bad.
    """
    c = self.config
    n_leaves = len(self._leaf_names)
    no_bad = tf.zeros([n_leaves], tf.int32)
    no_cols = tf.fill([n_leaves], -1)
    drop = c.guard.bad_inputs == "drop_rows"
    if not c.guard.check_inputs or not n_leaves:
      weight = None
      if n_rep > 1:
        # Unchecked, each replica's mean still counts by its rows.
        rows = tf.shape(tf.nest.flatten(batch)[0])[0]
        total = tf.cast(ctx.all_reduce("sum", rows), tf.float32)
        weight = tf.cast(rows, tf.float32) / tf.maximum(total, 1.0)
      return batch, weight, tf.constant(False), tf.constant(0), no_bad, no_cols
    if n_rep == 1:
      oks = [tf.reduce_all(tf.math.is_finite(t)) for _, t in guard.float_leaves(batch)]
      all_ok = oks[0] if len(oks) == 1 else tf.reduce_all(tf.stack(oks))

      def clean():
        return batch, tf.constant(False), tf.constant(0), no_bad, no_cols

      def dirty():
        row_ok, leaf_bad = guard.finite_rows(batch)
        cols = guard.bad_columns(batch)
        rows = tf.size(row_ok)
        bad = rows - tf.reduce_sum(tf.cast(row_ok, tf.int32))
        if not drop:
          return batch, tf.constant(True), tf.constant(0), leaf_bad, cols
        kept = rows - bad
        kept_batch = _keep_rows(batch, row_ok, kept > 0)
        return kept_batch, kept <= 0, tf.where(kept > 0, bad, 0), leaf_bad, cols

      batch, input_skip, dropped, leaf_bad, cols = tf.cond(all_ok, clean, dirty)
      return batch, None, input_skip, dropped, leaf_bad, cols

    # Several replicas: every decision is taken on counts summed over all of
    # them, so one replica's bad rows are a decision for all.
    rows = tf.shape(tf.nest.flatten(batch)[0])[0]
    row_ok, leaf_bad = guard.finite_rows(batch)
    local_bad = rows - tf.reduce_sum(tf.cast(row_ok, tf.int32))
    local_kept = rows - local_bad if drop else rows
    local_cols = tf.cond(local_bad > 0, lambda: guard.bad_columns(batch), lambda: no_cols)
    # Each replica's bad columns (+1; 0 for none) in its own row, so the sum
    # tells every replica the columns of all: the message names the column
    # whichever shard held the bad row.
    slots = tf.one_hot(ctx.replica_id_in_sync_group, n_rep, dtype=tf.int32)[:, None]
    slots = tf.reshape(slots * (local_cols + 1)[None, :], [-1])
    sums = ctx.all_reduce("sum", tf.concat([[local_bad, local_kept], leaf_bad, slots], 0))
    global_bad, global_kept = sums[0], sums[1]
    leaf_bad = sums[2 : 2 + n_leaves]
    all_cols = tf.reshape(sums[2 + n_leaves :], [n_rep, n_leaves]) - 1
    cols = tf.reduce_min(tf.where(all_cols >= 0, all_cols, tf.int32.max), axis=0)
    cols = tf.where(cols == tf.int32.max, -1, cols)
    if drop:
      input_skip = global_kept <= 0
      # A shard left empty still runs forward on one sanitised row with weight
      # 0, so every replica takes part in the collectives that follow.
      batch = tf.cond(
        local_bad > 0, lambda: _keep_rows(batch, row_ok, local_kept > 0), lambda: batch
      )
    else:
      input_skip = global_bad > 0
    dropped = tf.where(drop & ~input_skip, global_bad, 0)
    weight = tf.cast(local_kept, tf.float32) / tf.maximum(tf.cast(global_kept, tf.float32), 1.0)
    return batch, weight, input_skip, dropped, leaf_bad, cols

  def _replica_step(self, batch, attempt, spike_stats):
    """One guarded step on this replica's shard (replica context).

    Everything that decides (loss, gradients, their norm, input counts) is
    reduced over replicas first, so every replica classifies the step alike.
    """
    ctx = tf.distribute.get_replica_context()
    n_rep = ctx.num_replicas_in_sync
    batch = self._drill.corrupt_inputs(batch, attempt)
    batch, weight, input_skip, dropped, leaf_bad, cols = self._input_guard(batch, ctx, n_rep)

    model = self.model
    variables = model.trainable_variables
    nt_before = [tf.identity(v) for v in model.non_trainable_variables]
    scale = self._loss_scale.scale.value() if self._fp16 else None
    with tf.GradientTape() as tape:
      loss, metrics = self._call_compute_loss(model, batch, training=True)
      loss = self._drill.corrupt_loss(loss, attempt)
      if weight is not None:
        # A replica left without rows (a short last batch) adds nothing: its
        # mean over no rows is NaN.
        loss = tf.where(weight > 0, loss * weight, 0.0)
        metrics = {k: tf.where(weight > 0, v * weight, 0.0) for k, v in metrics.items()}
      scaled = loss * scale if self._fp16 else loss
    grads = tape.gradient(scaled, variables)
    present = [i for i, g in enumerate(grads) if g is not None]
    grads = [_to_dense_float32(grads[i]) for i in present]
    if self._fp16:
      grads = [g / scale for g in grads]
    if n_rep > 1 and grads:
      # A replica without rows contributes nothing, and BatchNorm's backward
      # pass over no rows is NaN (0 * NaN statistics).
      grads = tf.cond(weight > 0, lambda: grads, lambda: [tf.zeros_like(g) for g in grads])
    grads = self._drill.corrupt_grads(grads, attempt) if grads else grads
    if n_rep > 1:
      reduced = ctx.all_reduce("sum", [loss, metrics] + ([grads] if grads else []))
      loss, metrics = reduced[0], reduced[1]
      grads = reduced[2] if grads else []
    # The replicas' BatchNorm statistics, weighed by their rows like the loss.
    state_mean = (
      ctx.all_reduce(
        "sum", [tf.where(weight > 0, v * weight, tf.zeros_like(v)) for v in self._replica_state]
      )
      if self._replica_state
      else []
    )

    loss_finite = tf.math.is_finite(loss)
    grads_finite, norm = _finite_and_norm(grads)
    if self._fp16:
      at_floor = self._loss_scale.at_floor()
      grad_kind = tf.where(at_floor, guard.LOSS_SCALE_FLOOR, guard.NO_KIND)
      grad_cls = tf.where(at_floor, guard.DIVERGENCE, guard.OVERFLOW)
    else:
      grad_kind, grad_cls = guard.NONFINITE_GRADS, guard.DIVERGENCE
    cls = tf.where(~grads_finite, grad_cls, tf.where(loss_finite, guard.GOOD, guard.DIVERGENCE))
    kind = tf.where(
      ~loss_finite, guard.NONFINITE_LOSS, tf.where(grads_finite, guard.NO_KIND, grad_kind)
    )
    cls = tf.where(~loss_finite, guard.DIVERGENCE, cls)
    if self._spike.enabled:
      spike = (cls == guard.GOOD) & self._spike.is_spike(spike_stats, loss)
      cls = tf.where(spike, guard.DIVERGENCE, cls)
      kind = tf.where(spike, guard.LOSS_SPIKE, kind)
    cls = tf.where(input_skip, guard.SKIPPED_BATCH, cls)
    kind = tf.where(input_skip | (dropped > 0), guard.NONFINITE_INPUTS, kind)

    if self._stash is not None:
      tf.cond(cls == guard.DIVERGENCE, lambda: self._stash_batch(batch), tf.no_op)

    ctx.merge_call(
      functools.partial(self._apply_or_skip, present=present),
      args=(cls, loss, grads, norm, nt_before, state_mean),
    )
    good = cls == guard.GOOD
    norm_good = tf.where(good, norm, 0.0)
    return dict(
      cls=cls,
      cls_hot=tf.one_hot(cls, 4),
      # one_hot of NO_KIND (-1) is all zeros.
      kind_hot=tf.one_hot(kind, _NUM_KINDS),
      sums=tf.stack([tf.cast(dropped, tf.float32), tf.where(good, loss, 0.0), norm_good]),
      norm_good=norm_good,
      loss=loss,
      leaf_bad=leaf_bad,
      cols=cols,
      metrics={k: tf.where(good, v, 0.0) for k, v in metrics.items()},
    )

  def _stash_batch(self, batch):
    for var, t in zip(self._stash, tf.nest.flatten(batch)):
      if var is not None:
        var.assign(t)
    return tf.no_op()

  def _apply_or_skip(self, strategy, cls, loss, grads, norm, nt_before, state_mean, *, present):
    """Cross-replica: apply the update on a good step, else leave state as is.

    The branch runs in cross-replica context because `apply_gradients` under
    MirroredStrategy calls merge_call, which a cond in replica context cannot
    contain (the pattern of Keras's LossScaleOptimizer._tf_apply).
    """
    first = lambda x: strategy.experimental_local_results(x)[0]  # noqa: E731
    cls, loss, norm = first(cls), first(loss), first(norm)
    clip = float(self.config.clip.global_norm)
    variables = [self.model.trainable_variables[i] for i in present]
    n_rep = strategy.num_replicas_in_sync

    def apply_on_replica(grads, norm):
      if clip > 0:
        factor = tf.minimum(1.0, clip / tf.maximum(norm, 1e-30))
        grads = [g * factor for g in grads]
      if n_rep > 1 and not self._skip_keras_all_reduce:
        # Keras sums gradients across replicas again; they are already reduced.
        grads = [g / n_rep for g in grads]
      self.optimizer.apply_gradients(zip(grads, variables))

    def good():
      if variables:
        strategy.extended.call_for_each_replica(apply_on_replica, args=(grads, norm))
      for var, value in zip(self._replica_state, state_mean):
        var.assign(first(value))
      if self._fp16:
        self._loss_scale.update(tf.constant(True))
      return tf.constant(0)

    def skip():
      # A skipped step must not leave its mark in BatchNorm statistics or RNG
      # state either: put back what the forward pass changed.
      for var, value in zip(self.model.non_trainable_variables, nt_before):
        var.assign(first(value))
      if self._fp16:
        tf.cond(
          cls == guard.OVERFLOW,
          lambda: self._loss_scale.update(tf.constant(False)) or tf.constant(0),
          lambda: tf.constant(0),
        )
      return tf.constant(0)

    tf.cond(cls == guard.GOOD, good, skip)

  def _train_loop(self, iterator, n):
    """Runs guarded steps until `n` are applied, recovery is needed, or the
    data ends. Compiled once; `n` is a tensor so it never retraces.

    Counters are carried through the loop and written to variables once at
    the end: per-step variable traffic is what makes a guarded loop slow.
    """
    c = self.config
    max_attempts = 2 * n + c.guard.rollback_after
    n_leaves = len(self._leaf_names)
    s = dict(
      run_step=self._run.step.read_value(),
      run_attempt=self._recovery.attempts.read_value(),
      applied=tf.constant(0, tf.int64),
      attempts=tf.constant(0, tf.int64),
      bad_run=self._run.consecutive_bad.read_value(),
      counts=tf.zeros([4]),
      kinds=tf.zeros([_NUM_KINDS]),
      sums=tf.zeros([3]),  # dropped rows, loss of good steps, norm of good steps
      kind_first=tf.fill([_NUM_KINDS], tf.constant(-1, tf.int64)),
      kind_last=tf.fill([_NUM_KINDS], tf.constant(-1, tf.int64)),
      norm_max=tf.constant(0.0),
      last_loss=tf.constant(float("nan")),
      stop=tf.constant(_STOP_NONE),
      leaf_bad=tf.zeros([n_leaves], tf.int32),
      cols=tf.fill([n_leaves], -1),
      metrics={k: tf.constant(0.0) for k in self._metric_names},
      spike=self._spike.read(),
    )
    while s["applied"] < n and s["attempts"] < max_attempts and s["stop"] == _STOP_NONE:
      if c.train.repeat_data:
        s = self._loop_step(s, next(iterator))
      else:
        optional = iterator.get_next_as_optional()
        if optional.has_value():
          s = self._loop_step(s, optional.get_value())
        else:
          s = dict(s, stop=tf.constant(_STOP_DATA_END))
    self._run.step.assign_add(s["applied"])
    self._run.consecutive_bad.assign(s["bad_run"])
    self._recovery.attempts.assign_add(s["attempts"])
    self._data.position.assign_add(s["attempts"])
    self._spike.write(s["spike"])
    # The rate the last update used (the schedule follows optimizer.iterations).
    lr = tf.cast(self.optimizer._learning_rate(self.optimizer.iterations - 1), tf.float32)
    return dict(
      applied=s["applied"],
      attempts=s["attempts"],
      counts=tf.cast(s["counts"], tf.int64),
      kind_counts=tf.cast(s["kinds"], tf.int64),
      kind_first=s["kind_first"],
      kind_last=s["kind_last"],
      loss_sum=s["sums"][1],
      norm_sum=s["sums"][2],
      norm_max=s["norm_max"],
      last_loss=s["last_loss"],
      dropped=tf.cast(s["sums"][0], tf.int64),
      stop=s["stop"],
      lr=lr,
      leaf_bad=s["leaf_bad"],
      cols=s["cols"],
      metric_sums=s["metrics"],
    )

  def _loop_step(self, s: dict, batch) -> dict:
    """One attempt inside the compiled loop: run the guarded step on every
    replica and fold its outcome into the loop state `s`."""
    c = self.config
    strategy = self._strategy
    first = lambda x: strategy.experimental_local_results(x)[0]  # noqa: E731
    attempts = s["attempts"] + 1
    # The run's own counters are carried absolute and moved by one add each:
    # sums like base + count + 1 become an AddN that Grappler's memory
    # optimizer turns into a TemporaryVariable, which leaks across while-loop
    # iterations on large models (AlreadyExistsError on the next call).
    step_now = s["run_step"] + 1
    attempt_now = s["run_attempt"] + 1
    out = strategy.run(self._replica_step, args=(batch, attempt_now, s["spike"]))
    out = tf.nest.map_structure(first, out)
    cls = out["cls"]
    good = cls == guard.GOOD
    hit = out["kind_hot"] > 0
    bad_run = tf.where(good, tf.constant(0, tf.int64), s["bad_run"])
    bad_run += tf.cast(cls == guard.DIVERGENCE, tf.int64)
    stop = tf.where(bad_run >= c.guard.rollback_after, _STOP_ROLLBACK, s["stop"])
    if c.guard.bad_inputs == "raise":
      stop = tf.where(cls == guard.SKIPPED_BATCH, _STOP_RAISE, stop)
    new = dict(
      run_step=s["run_step"] + tf.cast(good, tf.int64),
      run_attempt=attempt_now,
      applied=s["applied"] + tf.cast(good, tf.int64),
      attempts=attempts,
      bad_run=bad_run,
      counts=s["counts"] + out["cls_hot"],
      kinds=s["kinds"] + out["kind_hot"],
      sums=s["sums"] + out["sums"],
      kind_first=tf.where(hit & (s["kind_first"] < 0), step_now, s["kind_first"]),
      kind_last=tf.where(hit, step_now, s["kind_last"]),
      norm_max=tf.maximum(s["norm_max"], out["norm_good"]),
      last_loss=out["loss"],
      stop=stop,
      leaf_bad=s["leaf_bad"],
      cols=s["cols"],
      metrics={k: v + out["metrics"][k] for k, v in s["metrics"].items()},
      spike=self._spike.observe(s["spike"], out["loss"], good),
    )
    if c.guard.check_inputs:
      new["leaf_bad"] = s["leaf_bad"] + out["leaf_bad"]
      new["cols"] = tf.where(s["cols"] < 0, out["cols"], s["cols"])
    return new

  def _all_finite(self):
    variables = self.model.variables + self.optimizer.variables
    flags = [
      tf.reduce_all(tf.math.is_finite(v)) for v in variables if tf.as_dtype(v.dtype).is_floating
    ]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)

  # ----------------------------------------------------------- evaluation

  def evaluate(self) -> dict[str, float]:
    """Evaluates on `build_eval_dataset()` for `eval.steps` batches (0: all).

    Returns {} when there is no eval dataset. Runs a compiled step per batch.
    """
    self._build()
    if not hasattr(self, "_eval_dataset"):
      ds = self.build_eval_dataset()
      self._eval_dataset = (
        None if ds is None else self._strategy.experimental_distribute_dataset(ds)
      )
    if self._eval_dataset is None:
      return {}
    if self._eval_step_fn is None:
      self._eval_step_fn = tf.function(self._eval_step)
    totals: dict[str, float] = {}
    batches = 0
    for batch in self._eval_dataset:
      out = self._eval_step_fn(batch)
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      batches += 1
      if self.config.eval.steps and batches >= self.config.eval.steps:
        break
    return {k: v / max(batches, 1) for k, v in totals.items()}

  def _eval_step(self, batch):
    def replica(batch):
      loss, metrics = self._call_compute_loss(self.model, batch, training=False)
      return dict(metrics, loss=loss)

    if self._strategy.num_replicas_in_sync == 1:
      out = self._strategy.run(replica, args=(batch,))
      return {k: self._strategy.reduce("mean", v, axis=None) for k, v in out.items()}

    def weighted(batch):
      # Shards of a last, short batch differ in size or are empty (whose mean
      # is NaN): weigh each replica's means by its rows.
      rows = tf.shape(tf.nest.flatten(batch)[0])[0]
      out = replica(batch)
      w = tf.cast(rows, tf.float32)
      out = {k: tf.where(rows > 0, v * w, 0.0) for k, v in out.items()}
      return dict(out, _rows=w)

    out = self._strategy.run(weighted, args=(batch,))
    sums = {k: self._strategy.reduce("sum", v, axis=None) for k, v in out.items()}
    rows = tf.maximum(sums.pop("_rows"), 1.0)
    return {k: v / rows for k, v in sums.items()}

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
    if resumed is not None and not self._iterator_in_checkpoint:
      self._seek_data()
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
        out = self._train_loop_fn(self._iterator, tf.constant(n, tf.int64))
        out = tf.nest.map_structure(lambda t: t.numpy(), out)
        dt = time.perf_counter() - t0
        step = self._step()
        applied = int(out["applied"])
        if applied:
          last_loss = float(out["loss_sum"]) / applied
        record = self._loop_record(out, step, dt)
        params_ok = bool(self._all_finite_fn())
        self._record_loop_incidents(out, params_ok)
        stop = int(out["stop"])
        if stop == _STOP_RAISE:
          self._save_checkpoint()
          raise BadInputError(self._bad_input_message(out))
        if stop == _STOP_ROLLBACK or not params_ok:
          kind = "nonfinite_params" if not params_ok else self._last_kind(out)
          self._recover(kind, out)
          record.update(rollback=True, step=self._step())
        self._refill_budget()
        if (
          c.eval.every_steps
          and self._step() % c.eval.every_steps == 0
          and self._step() < c.train.steps
          and stop != _STOP_ROLLBACK
        ):
          eval_metrics = self.evaluate()
          record.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        self._metrics_log.write(record)
        self._write_summaries(writer, record)
        progress.update(self._step(), dt, applied, record)
        if self._step() % c.checkpoint.every_steps == 0 or self._stop_signal:
          self._save_checkpoint()
        if stop == _STOP_DATA_END:
          logging.warning(
            "The training data ended at step %d before train.steps=%d; "
            "stopping cleanly (train.repeat_data is False).",
            self._step(),
            c.train.steps,
          )
          stopped = "data_exhausted"
          break
        if applied == 0 and int(out["counts"][guard.SKIPPED_BATCH]) == int(out["attempts"]):
          self._save_checkpoint()
          raise BadInputError(
            f"no usable batch in {int(out['attempts'])} consecutive batches after step "
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
    return (
      f"step {result.step}: {len(result.incidents)} incidents, "
      f"{result.rollbacks} rollbacks, lr scale {result.lr_scale:.4g}, "
      f"{result.batches_skipped} batches skipped, {result.skipped_steps} steps skipped"
    )

  def _step(self) -> int:
    return int(self._run.step.numpy())

  def _next_loop_length(self, step: int) -> int:
    c = self.config
    bounds = [c.train.steps, _next_multiple(step, c.checkpoint.every_steps)]
    if c.eval.every_steps:
      bounds.append(_next_multiple(step, c.eval.every_steps))
    return max(1, min(min(bounds) - step, c.train.steps_per_loop))

  def _loop_record(self, out, step: int, dt: float) -> dict:
    applied = int(out["applied"])
    counts = out["counts"]
    rec = {
      "step": step,
      "attempts": int(self._recovery.attempts.numpy()),
      "loss": float(out["loss_sum"]) / applied if applied else None,
      "last_loss": _finite_or_none(out["last_loss"]),
      "grad_norm": float(out["norm_sum"]) / applied if applied else None,
      "grad_norm_max": float(out["norm_max"]),
      "lr": float(out["lr"]),
      "lr_scale": float(self._recovery.lr_scale.numpy()),
      "loss_scale": float(self._loss_scale.scale.numpy()),
      "good": int(counts[guard.GOOD]),
      "overflow": int(counts[guard.OVERFLOW]),
      "divergence": int(counts[guard.DIVERGENCE]),
      "skipped_batches": int(counts[guard.SKIPPED_BATCH]),
      "dropped_rows": int(out["dropped"]),
      "spikes": int(out["kind_counts"][guard.LOSS_SPIKE]),
      "steps_per_sec": applied / dt if dt > 0 else None,
    }
    for k, v in out["metric_sums"].items():
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
    kc, first, last = out["kind_counts"], out["kind_first"], out["kind_last"]
    lr = float(self._recovery.lr_scale.numpy())
    for k, name in enumerate(guard.KINDS):
      count = int(kc[k])
      if not count:
        continue
      if k == guard.NONFINITE_INPUTS:
        action = "dropped_rows" if self.config.guard.bad_inputs == "drop_rows" else "skipped_batch"
        if self.config.guard.bad_inputs == "drop_rows" and int(out["counts"][guard.SKIPPED_BATCH]):
          action = "skipped_batch" if not int(out["dropped"]) else action
        diag = (
          f"non-finite values in {self._bad_leaves(out)}; "
          f"{int(out['dropped'])} rows dropped, "
          f"{int(out['counts'][guard.SKIPPED_BATCH])} batches skipped"
        )
      else:
        action = "skipped_step"
        diag = _KIND_TEXT[name]
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
    skipped = int(out["attempts"]) - int(out["applied"])
    self._recovery.skipped_total.assign_add(skipped)

  def _bad_leaves(self, out) -> str:
    parts = []
    for name, bad, col in zip(self._leaf_names, out["leaf_bad"], out["cols"]):
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
    last = out["kind_last"]
    candidates = [(int(last[k]), k) for k in range(1, _NUM_KINDS) if int(out["kind_counts"][k])]
    return guard.KINDS[max(candidates)[1]] if candidates else "nonfinite_loss"

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
      return _KIND_TEXT[kind]

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


_KIND_TEXT = {
  "nonfinite_inputs": "non-finite values in the input batch.",
  "nonfinite_loss": "the loss was not finite.",
  "nonfinite_grads": "the loss was finite but some gradients were not.",
  "loss_spike": "the loss jumped far above its running mean.",
  "loss_scale_floor": ("float16 gradients overflowed with the loss scale at loss_scale.min_scale."),
  "nonfinite_params": "a model or optimizer variable became non-finite after an update.",
}


def unpack_batch(batch):
  """Splits a batch into (x, y, sample_weight)."""
  if isinstance(batch, dict):
    if "x" not in batch or "y" not in batch:
      raise ValueError(
        "dict batches for the default compute_loss need keys 'x' and 'y'; "
        f"got {sorted(batch)}. Override compute_loss for other layouts."
      )
    return batch["x"], batch["y"], batch.get("sample_weight")
  if isinstance(batch, (tuple, list)):
    if len(batch) == 2:
      return batch[0], batch[1], None
    if len(batch) == 3:
      return tuple(batch)
  raise ValueError(
    "batches for the default compute_loss are (x, y), (x, y, sample_weight) "
    f"or dicts with 'x' and 'y'; got {type(batch).__name__}"
  )


def _check_element_spec(spec) -> None:
  for s in tf.nest.flatten(spec):
    if not isinstance(s, tf.TensorSpec):
      raise BadInputError(
        f"the training dataset yields {type(s).__name__}; safetrain "
        "needs dense tensors (x, y) or dicts of them"
      )
    if s.shape.rank == 0:
      raise BadInputError(
        "the training dataset yields scalars; batch it with dataset.batch(config.train.batch_size)"
      )


def _keep_rows(batch, row_ok, any_kept):
  """Drops bad rows; a shard with none left keeps row 0, sanitised, so it can
  still take part (its loss weight is 0)."""

  def sanitise(t):
    t = t[:1]
    return tf.where(tf.math.is_finite(t), t, tf.zeros_like(t)) if t.dtype.is_floating else t

  return tf.cond(
    any_kept, lambda: guard.mask_rows(batch, row_ok), lambda: tf.nest.map_structure(sanitise, batch)
  )


def _to_dense_float32(g):
  if isinstance(g, tf.IndexedSlices):
    g = tf.convert_to_tensor(g)
  return tf.cast(g, tf.float32)


def _finite_and_norm(grads):
  """(all gradients finite, global norm).

  The common case costs one norm: a finite norm proves every gradient finite.
  Only a non-finite norm pays for the element-wise check, and finite gradients
  whose squares overflow get a rescaled norm, never inf.
  """
  if not grads:
    return tf.constant(True), tf.constant(0.0)
  norm = tf.linalg.global_norm(grads)

  def slow():
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in grads]))

    def rescaled():
      m = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(g)) for g in grads]))
      return m * tf.linalg.global_norm([g / m for g in grads])

    return finite, tf.cond(finite, rescaled, lambda: norm)

  return tf.cond(tf.math.is_finite(norm), lambda: (tf.constant(True), norm), slow)


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
