"""The compiled guarded loop: up to `train.steps_per_loop` guarded steps in one
`tf.function` call, between two host syncs.

Read downward to follow one batch: `GuardedLoop._loop` (the while loop, traced
once) -> `_attempt` (one attempt, folded into the loop state) ->
`_replica_step` (input guard, forward and backward, classification, on every
replica) -> `_apply_or_skip` (cross-replica: the optimizer update on a good
step; on any other, the state is left exactly as it was).

Counters are carried through the loop as tensors and written to variables once
per loop: per-step variable traffic is what makes a guarded loop slow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import keras
import tensorflow as tf

from safetrain.core import compat, kinds
from safetrain.step import bad_batches, guard, loop_state
from safetrain.step import per_example as examples
from safetrain.step.clipping import GradientClip
from safetrain.step.drill import Drill
from safetrain.step.loss_scale import DynamicLossScale
from safetrain.step.loss_watch import SpikeDetector

# The loop's report and variables, as the trainer and controller name them.
LoopOutput = loop_state.LoopOutput
LoopVariables = loop_state.LoopVariables


class GuardedLoop:
  """Runs guarded steps until `n` are applied, recovery is needed, or the
  data ends (with `repeat_data` False).

  Built once by the trainer; the compiled function is traced once and never
  retraced (`n` is a tensor; the learning-rate scale is a variable).

  Args:
    strategy: the distribution strategy.
    model, optimizer: the live Keras objects.
    compute_loss: (model, batch, training) -> (float32 loss, {name: float32
      metric}): the trainer's hook, traced into the step.
    loss_scale: the dynamic loss scale (disabled outside mixed_float16).
    spike: the loss-spike detector.
    drill: fault injection (`config.drill`).
    input_guard: the input check and its policy.
    clip: the clipping threshold (`clip.mode`, fixed or adaptive).
    drop_examples: `guard.drop_examples`: with per-example losses, the
      non-finite examples are dropped from the mean (see `examples`).
    max_dropped_examples: `guard.max_dropped_examples`.
    rollback_after: `guard.rollback_after` consecutive divergent attempts end
      the loop for recovery.
    raise_on_bad_inputs: `guard.bad_inputs=raise`: a skipped batch ends the loop.
    repeat_data: `train.repeat_data`; False reads the iterator as optional.
    variables: the run's counters (LoopVariables).
    replica_state: float non-trainable variables the forward pass updates
      per replica (BatchNorm statistics), averaged over replicas on a good step.
    stash: variables that keep the last divergent batch for forensics, or None.
    skip_keras_all_reduce: the optimizer was told not to all-reduce again.
    metric_names: the names of compute_loss's metrics.
    jit_compile: `train.jit_compile`: compute_loss (forward, and through the
      tape its backward pass) runs as one XLA-compiled function.
    train_metrics: the stateful Keras metrics (`stateful_metrics.MetricSet`),
      updated on good steps only, or None; compute_loss then returns y_pred
      as a third element.
  """

  def __init__(
    self,
    *,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    compute_loss: Callable,
    loss_scale: DynamicLossScale,
    spike: SpikeDetector,
    drill: Drill,
    input_guard: guard.InputGuard,
    clip: GradientClip,
    drop_examples: bool,
    max_dropped_examples: float,
    rollback_after: int,
    raise_on_bad_inputs: bool,
    repeat_data: bool,
    variables: LoopVariables,
    replica_state: list,
    stash: list | None,
    skip_keras_all_reduce: bool,
    metric_names: list[str],
    train_metrics=None,
    jit_compile: bool = False,
  ):
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    # The gradient of an XLA-compiled function is compiled with it.
    self.compute_loss = tf.function(compute_loss, jit_compile=True) if jit_compile else compute_loss
    self.loss_scale = loss_scale
    self.fp16 = loss_scale.enabled
    self.spike = spike
    self.drill = drill
    self.input_guard = input_guard
    self.clip = clip
    self.drop_examples = drop_examples
    self.max_dropped_examples = float(max_dropped_examples)
    self.rollback_after = rollback_after
    self.raise_on_bad_inputs = raise_on_bad_inputs
    self.repeat_data = repeat_data
    self.variables = variables
    self.replica_state = replica_state
    self.stash = stash
    self.skip_keras_all_reduce = skip_keras_all_reduce
    self.metric_names = list(metric_names)
    self.train_metrics = train_metrics or None
    self.function = tf.function(self._loop)

  def __call__(self, iterator, n: int) -> LoopOutput:
    """Runs one loop of up to `n` updates; returns its output as numpy."""
    out = self.function(iterator, tf.constant(n, tf.int64))
    return tf.nest.map_structure(lambda t: t.numpy(), out)

  # ------------------------------------------------------------ the loop

  def _loop(self, iterator, n) -> LoopOutput:
    max_attempts = 2 * n + self.rollback_after
    s = loop_state.initial(
      self.variables,
      leaves=self.input_guard.leaf_count,
      metric_names=self.metric_names,
      spike=self.spike.read(),
      clip=self.clip.read(),
    )
    while loop_state.running(s, n, max_attempts):
      if self.repeat_data:
        s = self._attempt(s, next(iterator))
      else:
        optional = iterator.get_next_as_optional()
        if optional.has_value():
          s = self._attempt(s, optional.get_value())
        else:
          s = loop_state.with_stop(s, loop_state.STOP_DATA_END)
    v, c = self.variables, tf.unstack(s.counters)
    v.step.assign(c[loop_state.RUN_STEP])
    v.consecutive_bad.assign(c[loop_state.BAD_RUN])
    v.attempts.assign(c[loop_state.RUN_ATTEMPT])
    v.position.assign_add(c[loop_state.ATTEMPTS])
    self.spike.write(s.spike)
    self.clip.write(s.clip)
    # The rate the last update used (the schedule follows optimizer.iterations).
    schedule = compat.learning_rate_schedule(self.optimizer)
    lr = tf.cast(schedule(self.optimizer.iterations - 1), tf.float32)
    # The host's health check, here: one reduction per variable, once a loop.
    return loop_state.output(s, lr=lr, params_finite=self.params_finite())

  def params_finite(self) -> tf.Tensor:
    """Whether every model and optimizer variable is finite: what the loop
    reports once a loop, and what the trainer checks after a restore."""
    return guard.all_finite(self.model.variables + self.optimizer.variables)

  def _attempt(self, s: loop_state.LoopState, batch) -> loop_state.LoopState:
    """One attempt: the guarded step on every replica, folded into `s`."""
    strategy = self.strategy
    first = lambda x: strategy.experimental_local_results(x)[0]  # noqa: E731
    attempt_now = s.counters[loop_state.RUN_ATTEMPT] + 1
    out = strategy.run(self._replica_step, args=(batch, attempt_now, s.spike, s.clip))
    return loop_state.fold(
      s,
      tf.nest.map_structure(first, out),
      rollback_after=self.rollback_after,
      raise_on_bad_inputs=self.raise_on_bad_inputs,
      spike=self.spike,
      clip=self.clip,
      track_inputs=self.input_guard.enabled,
    )

  # ------------------------------------------------------- one replica

  def _replica_step(self, batch, attempt, spike_stats, clip_state):
    """One guarded step on this replica's shard (replica context).

    Everything that decides (loss, gradients, their norm, input counts) is
    reduced over replicas first, so every replica classifies the step alike.
    """
    ctx = tf.distribute.get_replica_context()
    n_rep = ctx.num_replicas_in_sync
    batch = self.drill.corrupt_inputs(batch, attempt)
    checked = self.input_guard(batch, ctx)
    batch, weight = checked.batch, checked.weight

    model = self.model
    variables = model.trainable_variables
    nt_before = guard.snapshot(model.non_trainable_variables)
    scale = self.loss_scale.scale.value() if self.fp16 else None
    masked = None
    with tf.GradientTape() as tape:
      loss, metrics, *pred = self.compute_loss(model, batch, True)
      if examples.is_per_example(loss):
        losses = self.drill.corrupt_examples(examples.per_example(loss), attempt)
        if self.drop_examples:
          masked = examples.masked_mean(
            losses,
            valid=None if weight is None else weight > 0,
            ctx=ctx,
            max_fraction=self.max_dropped_examples,
            name_rows=n_rep == 1,
          )
          # A batch the input guard skips drops no examples either.
          masked = masked._replace(
            dropped=tf.where(checked.skip, 0.0, masked.dropped),
            rerun=masked.rerun & tf.logical_not(checked.skip),
          )
          loss = masked.loss
        else:
          loss = tf.reduce_mean(losses)
      else:
        loss = self.drill.corrupt_loss(loss, attempt)
      if weight is not None:
        # A replica left without rows (a short last batch) adds nothing: its
        # mean over no rows is NaN. (A masked mean is already weighed.)
        if masked is None:
          loss = tf.where(weight > 0, loss * weight, 0.0)
        metrics = {k: tf.where(weight > 0, m * weight, 0.0) for k, m in metrics.items()}
      scaled = loss * scale if self.fp16 else loss
    grads = tape.gradient(scaled, variables)
    present = [i for i, g in enumerate(grads) if g is not None]
    grads = self._dense(grads, present, scale)
    if masked is not None and grads:
      # Dropped examples still poison the gradient through their own ops:
      # recompute it on the rows kept.
      kept = lambda: tf.cond(  # noqa: E731
        masked.any_ok,
        lambda: self._kept_rows_gradients(batch, masked, present, scale, nt_before),
        lambda: [tf.zeros_like(g) for g in grads],
      )
      grads = tf.cond(masked.rerun, kept, lambda: grads)
    if n_rep > 1 and grads:
      # A replica without rows contributes nothing, and BatchNorm's backward
      # pass over no rows is NaN (0 * NaN statistics).
      grads = tf.cond(weight > 0, lambda: grads, lambda: [tf.zeros_like(g) for g in grads])
    grads = self.drill.corrupt_grads(grads, attempt) if grads else grads
    if n_rep > 1:
      reduced = ctx.all_reduce("sum", [loss, metrics] + ([grads] if grads else []))
      loss, metrics = reduced[0], reduced[1]
      grads = reduced[2] if grads else []
    # The replicas' BatchNorm statistics, weighed by their rows like the loss.
    state_mean = (
      ctx.all_reduce(
        "sum", [tf.where(weight > 0, v * weight, tf.zeros_like(v)) for v in self.replica_state]
      )
      if self.replica_state
      else []
    )

    grads_finite, norm = guard.finite_and_norm(grads)
    step_class, kind = guard.classify(
      input_skip=checked.skip,
      loss_finite=tf.math.is_finite(loss),
      grads_finite=grads_finite,
      spike=self.spike.is_spike(spike_stats, loss),
      growth=self.spike.is_growth(spike_stats, loss),
      fp16=self.fp16,
      at_floor=self.loss_scale.at_floor() if self.fp16 else None,
    )
    if self.train_metrics is not None:
      # Every replica decided the same class: each adds its shard on a good step.
      tf.cond(step_class == kinds.GOOD, lambda: self.train_metrics.update(batch, pred[0]), tf.no_op)
    if self.stash is not None:
      tf.cond(step_class == kinds.DIVERGENCE, lambda: self._stash_batch(batch), tf.no_op)
    limit = self.clip.threshold(clip_state, norm)
    ctx.merge_call(
      functools.partial(self._apply_or_skip, present=present),
      args=(step_class, grads, norm, limit, nt_before, state_mean),
    )
    good = step_class == kinds.GOOD
    norm_good = tf.where(good, norm, 0.0)
    # Examples count as dropped when the rest of their batch trained.
    dropped_ex = tf.where(good, masked.dropped, 0.0) if masked is not None else tf.constant(0.0)
    # A bad batch, or examples dropped: a quarantine entry.
    bad_batch = (step_class == kinds.DIVERGENCE) & (
      (kind == kinds.NONFINITE_LOSS) | (kind == kinds.NONFINITE_GRADS)
    )
    rows = masked.rows if masked is not None else tf.fill([examples.MAX_ROWS], -1)
    n_bad = (
      tf.cast(tf.size(masked.ok), tf.float32) - tf.reduce_sum(tf.cast(masked.ok, tf.float32))
      if masked is not None
      else tf.constant(-1.0)
    )
    sums = tf.stack(
      [
        tf.cast(checked.dropped, tf.float32),
        tf.where(good, loss, 0.0),
        norm_good,
        dropped_ex,
        tf.cast(dropped_ex > 0, tf.float32),
      ]
    )
    return loop_state.Outcome(
      step_class=step_class,
      tally=loop_state.tally(step_class, kind, checked.dropped, sums),
      loss=loss,
      norm_good=norm_good,
      limit=limit,
      leaf_bad=checked.leaf_bad,
      cols=checked.cols,
      metrics={k: tf.where(good, m, 0.0) for k, m in metrics.items()},
      q_hit=bad_batch | (dropped_ex > 0),
      q_info=bad_batches.entry(
        tf.where(bad_batch, kind, kinds.NONFINITE_LOSS), bad_batch, tf.cast(n_bad, tf.int32), rows
      ),
    )

  def _dense(self, grads, present, scale):
    grads = [guard.dense_float32(grads[i]) for i in present]
    return [g / scale for g in grads] if self.fp16 else grads

  def _kept_rows_gradients(self, batch, masked, present, scale, nt_before):
    """Forward and backward again on the kept rows only (the drill is not
    applied again: its examples were the dropped ones)."""
    if self.strategy.num_replicas_in_sync == 1:
      # The first forward pass saw the bad rows: BatchNorm statistics back.
      guard.put_back(self.model.non_trainable_variables, nt_before)
    kept = examples.masked_batch(batch, masked.ok)
    with tf.GradientTape() as tape:
      loss, *_ = self.compute_loss(self.model, kept, True)
      loss = tf.reduce_sum(examples.per_example(loss)) / tf.maximum(masked.total_ok, 1.0)
      scaled = loss * scale if self.fp16 else loss
    grads = tape.gradient(scaled, self.model.trainable_variables)
    return self._dense(grads, present, scale)

  def _stash_batch(self, batch):
    for var, t in zip(self.stash, tf.nest.flatten(batch)):
      if var is not None:
        var.assign(t)
    return tf.no_op()

  # ------------------------------------------------- the update itself

  def _apply_or_skip(
    self, strategy, step_class, grads, norm, limit, nt_before, state_mean, *, present
  ):
    """Cross-replica: apply the update on a good step, else leave state as is.

    The branch runs in cross-replica context because `apply_gradients` under
    MirroredStrategy calls merge_call, which a cond in replica context cannot
    contain (the pattern of Keras's LossScaleOptimizer._tf_apply).
    """
    first = lambda x: strategy.experimental_local_results(x)[0]  # noqa: E731
    step_class, norm, limit = first(step_class), first(norm), first(limit)
    variables = [self.model.trainable_variables[i] for i in present]
    n_rep = strategy.num_replicas_in_sync

    def apply_on_replica(grads, norm):
      if self.clip.active:
        grads = guard.clip(grads, norm, limit)
      if n_rep > 1 and not self.skip_keras_all_reduce:
        # Keras sums gradients across replicas again; they are already reduced.
        grads = [g / n_rep for g in grads]
      self.optimizer.apply_gradients(zip(grads, variables))

    def good():
      if variables:
        strategy.extended.call_for_each_replica(apply_on_replica, args=(grads, norm))
      for var, value in zip(self.replica_state, state_mean):
        var.assign(first(value))
      self.loss_scale.update(tf.constant(True))
      return tf.constant(0)

    def skip():
      # A skipped step must not leave its mark in BatchNorm statistics or RNG
      # state either: put back what the forward pass changed.
      guard.put_back(self.model.non_trainable_variables, [first(v) for v in nt_before])
      if self.fp16:
        tf.cond(
          step_class == kinds.OVERFLOW,
          lambda: self.loss_scale.update(tf.constant(False)),
          lambda: None,
        )
      return tf.constant(0)

    tf.cond(step_class == kinds.GOOD, good, skip)
