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
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from safetrain import compat, examples, guard, kinds, quarantine
from safetrain.clipping import GradientClip
from safetrain.drill import Drill
from safetrain.loss_scale import DynamicLossScale
from safetrain.spike import SpikeDetector

# Why a loop ended before its `n` updates.
STOP_NONE, STOP_ROLLBACK, STOP_DATA_END, STOP_RAISE = range(4)
NUM_KINDS = kinds.IN_GRAPH
# _State.sums: dropped input rows, loss and pre-clip norm of good steps,
# dropped examples, attempts that dropped examples.
NUM_SUMS = 5


class LoopOutput(NamedTuple):
  """What one call of the compiled loop reports (tensors; `.numpy()` once).

  Attributes:
    applied: good steps, i.e. updates applied.
    attempts: steps attempted, skipped ones included.
    counts: int64[4], attempts per step class (`kinds.CLASSES`).
    kind_counts: int64[K], attempts per incident kind (`kinds.KINDS`).
    kind_first, kind_last: int64[K], the step number (applied + 1 at the
      time) of each kind's first and last occurrence, or -1.
    loss_sum, norm_sum: sums over good steps of the loss and pre-clip norm.
    norm_max: the largest pre-clip norm of a good step.
    last_loss: the loss of the last attempt (NaN if it was not finite).
    dropped: input rows dropped by the input guard.
    dropped_examples: examples dropped from per-example losses, and
      dropped_example_steps: the attempts that dropped some.
    last_good: the run's attempt number of the loop's last good step, or -1.
    open_kinds: int64[K], per kind, the divergent attempts since the last
      good one (the open run that may end the loop for recovery).
    quarantine: the last bad-batch and dropped-example attempts
      (`quarantine.Buffer` as numpy).
    stop: STOP_NONE, or why the loop ended early.
    lr: the learning rate of the last update.
    leaf_bad, cols: int32[L], bad rows and first bad column per float leaf.
    metric_sums: {name: sum over good steps} of compute_loss's metrics.
  """

  applied: Any
  attempts: Any
  counts: Any
  kind_counts: Any
  kind_first: Any
  kind_last: Any
  loss_sum: Any
  norm_sum: Any
  norm_max: Any
  last_loss: Any
  dropped: Any
  stop: Any
  lr: Any
  leaf_bad: Any
  cols: Any
  metric_sums: Any
  dropped_examples: Any = 0
  dropped_example_steps: Any = 0
  last_good: Any = -1
  open_kinds: Any = None
  quarantine: Any = None


class _State(NamedTuple):
  """The loop-carried state of one call."""

  run_step: tf.Tensor  # the run's applied steps (absolute)
  run_attempt: tf.Tensor  # the run's attempts (absolute)
  applied: tf.Tensor
  attempts: tf.Tensor
  bad_run: tf.Tensor  # consecutive divergent attempts
  counts: tf.Tensor
  kind_counts: tf.Tensor
  kind_first: tf.Tensor
  kind_last: tf.Tensor
  sums: tf.Tensor  # float32[NUM_SUMS]
  norm_max: tf.Tensor
  last_loss: tf.Tensor
  stop: tf.Tensor
  leaf_bad: tf.Tensor
  cols: tf.Tensor
  metrics: dict
  spike: tuple
  clip: tuple
  last_good: tf.Tensor
  open_kinds: tf.Tensor
  quarantine: quarantine.Buffer


class LoopVariables(NamedTuple):
  """The variables the loop reads at its start and writes at its end."""

  step: tf.Variable  # applied updates of the run
  consecutive_bad: tf.Variable  # divergent attempts in a row, across loops
  attempts: tf.Variable  # attempts of the run (never rolled back)
  position: tf.Variable  # batches consumed


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
  ):
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self.compute_loss = compute_loss
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
    v = self.variables
    n_leaves = self.input_guard.leaf_count
    max_attempts = 2 * n + self.rollback_after
    s = _State(
      run_step=v.step.read_value(),
      run_attempt=v.attempts.read_value(),
      applied=tf.constant(0, tf.int64),
      attempts=tf.constant(0, tf.int64),
      bad_run=v.consecutive_bad.read_value(),
      counts=tf.zeros([len(kinds.CLASSES)]),
      kind_counts=tf.zeros([NUM_KINDS]),
      kind_first=tf.fill([NUM_KINDS], tf.constant(-1, tf.int64)),
      kind_last=tf.fill([NUM_KINDS], tf.constant(-1, tf.int64)),
      sums=tf.zeros([NUM_SUMS]),
      norm_max=tf.constant(0.0),
      last_loss=tf.constant(float("nan")),
      stop=tf.constant(STOP_NONE),
      leaf_bad=tf.zeros([n_leaves], tf.int32),
      cols=tf.fill([n_leaves], -1),
      metrics={k: tf.constant(0.0) for k in self.metric_names},
      spike=self.spike.read(),
      clip=self.clip.read(),
      last_good=tf.constant(-1, tf.int64),
      open_kinds=tf.zeros([NUM_KINDS]),
      quarantine=quarantine.empty(),
    )
    while s.applied < n and s.attempts < max_attempts and s.stop == STOP_NONE:
      if self.repeat_data:
        s = self._attempt(s, next(iterator))
      else:
        optional = iterator.get_next_as_optional()
        if optional.has_value():
          s = self._attempt(s, optional.get_value())
        else:
          s = s._replace(stop=tf.constant(STOP_DATA_END))
    v.step.assign(s.run_step)
    v.consecutive_bad.assign(s.bad_run)
    v.attempts.assign(s.run_attempt)
    v.position.assign_add(s.attempts)
    self.spike.write(s.spike)
    self.clip.write(s.clip)
    # The rate the last update used (the schedule follows optimizer.iterations).
    schedule = compat.learning_rate_schedule(self.optimizer)
    lr = tf.cast(schedule(self.optimizer.iterations - 1), tf.float32)
    return LoopOutput(
      applied=s.applied,
      attempts=s.attempts,
      counts=tf.cast(s.counts, tf.int64),
      kind_counts=tf.cast(s.kind_counts, tf.int64),
      kind_first=s.kind_first,
      kind_last=s.kind_last,
      loss_sum=s.sums[1],
      norm_sum=s.sums[2],
      norm_max=s.norm_max,
      last_loss=s.last_loss,
      dropped=tf.cast(s.sums[0], tf.int64),
      stop=s.stop,
      lr=lr,
      leaf_bad=s.leaf_bad,
      cols=s.cols,
      metric_sums=s.metrics,
      dropped_examples=tf.cast(s.sums[3], tf.int64),
      dropped_example_steps=tf.cast(s.sums[4], tf.int64),
      last_good=s.last_good,
      open_kinds=tf.cast(s.open_kinds, tf.int64),
      quarantine=s.quarantine,
    )

  def _attempt(self, s: _State, batch) -> _State:
    """One attempt: the guarded step on every replica, folded into `s`.

    The run's counters are carried absolute and moved by one add each: sums
    like base + count + 1 become an AddN that Grappler's memory optimizer
    turns into a TemporaryVariable, which leaks across while-loop iterations
    on large models (AlreadyExistsError on the next call).
    """
    strategy = self.strategy
    first = lambda x: strategy.experimental_local_results(x)[0]  # noqa: E731
    step_now = s.run_step + 1
    attempt_now = s.run_attempt + 1
    out = strategy.run(self._replica_step, args=(batch, attempt_now, s.spike, s.clip))
    out = tf.nest.map_structure(first, out)
    step_class = out["step_class"]
    good = step_class == kinds.GOOD
    hit = out["kind_hot"] > 0
    bad_run = tf.where(good, tf.constant(0, tf.int64), s.bad_run)
    bad_run += tf.cast(step_class == kinds.DIVERGENCE, tf.int64)
    stop = tf.where(bad_run >= self.rollback_after, STOP_ROLLBACK, s.stop)
    if self.raise_on_bad_inputs:
      stop = tf.where(step_class == kinds.SKIPPED_BATCH, STOP_RAISE, stop)
    new = _State(
      run_step=s.run_step + tf.cast(good, tf.int64),
      run_attempt=attempt_now,
      applied=s.applied + tf.cast(good, tf.int64),
      attempts=s.attempts + 1,
      bad_run=bad_run,
      counts=s.counts + out["class_hot"],
      kind_counts=s.kind_counts + out["kind_hot"],
      kind_first=tf.where(hit & (s.kind_first < 0), step_now, s.kind_first),
      kind_last=tf.where(hit, step_now, s.kind_last),
      sums=s.sums + out["sums"],
      norm_max=tf.maximum(s.norm_max, out["norm_good"]),
      last_loss=out["loss"],
      stop=stop,
      leaf_bad=s.leaf_bad,
      cols=s.cols,
      metrics={k: v + out["metrics"][k] for k, v in s.metrics.items()},
      spike=self.spike.observe(s.spike, out["loss"], good),
      clip=self.clip.observe(s.clip, out["norm_good"], out["limit"], good),
      last_good=tf.where(good, attempt_now, s.last_good),
      open_kinds=tf.where(good, tf.zeros_like(s.open_kinds), s.open_kinds + out["kind_hot"]),
      quarantine=quarantine.record(
        s.quarantine, out["q_hit"], attempt_now, step_now, out["q_info"]
      ),
    )
    if self.input_guard.enabled:
      new = new._replace(
        leaf_bad=s.leaf_bad + out["leaf_bad"], cols=tf.where(s.cols < 0, out["cols"], s.cols)
      )
    return new

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
    # Rows dropped are a nonfinite_inputs occurrence whatever the step became.
    dropped_hit = tf.one_hot(kinds.NONFINITE_INPUTS, NUM_KINDS) * tf.cast(
      (checked.dropped > 0) & (kind != kinds.NONFINITE_INPUTS), tf.float32
    )
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
    return dict(
      step_class=step_class,
      class_hot=tf.one_hot(step_class, len(kinds.CLASSES)),
      # one_hot of NO_KIND (-1) is all zeros.
      kind_hot=tf.one_hot(kind, NUM_KINDS) + dropped_hit,
      sums=tf.stack(
        [
          tf.cast(checked.dropped, tf.float32),
          tf.where(good, loss, 0.0),
          norm_good,
          dropped_ex,
          tf.cast(dropped_ex > 0, tf.float32),
        ]
      ),
      norm_good=norm_good,
      limit=limit,
      loss=loss,
      leaf_bad=checked.leaf_bad,
      cols=checked.cols,
      metrics={k: tf.where(good, m, 0.0) for k, m in metrics.items()},
      q_hit=bad_batch | (dropped_ex > 0),
      q_info=quarantine.entry(
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
