"""The compiled guarded loop: up to `train.steps_per_loop` guarded steps in one
`tf.function` call, between two host syncs.

Read downward to follow one batch: `GuardedLoop._loop` (the while loop, traced
once) -> `_attempt` (one attempt, folded into the loop state) ->
`_replica_step` (a Keras-like train step with the registered guard pieces'
hooks, on every replica) -> `_apply_or_skip` (cross-replica: the optimizer
update on a good step; on any other, the state is left exactly as it was,
by a `tf.cond` or, under `skip_update="select"`, by the update run always
and the old values selected back).

The rare paths (a dirty batch's rows dropped, the forward and backward pass
again on the examples kept) are built only when a batch first needs one
(`lazy`, one replica): until then the loop is traced lean, a batch that
needs one ends the call before its update (nothing of that attempt is
applied or counted), and the loop is traced again with every rare path and
goes on from that batch, in the same call (`GuardedLoop.__call__`).

Counters are carried through the loop as tensors and written to variables once
per loop: per-step variable traffic is what makes a guarded loop slow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import keras
import tensorflow as tf
from absl import logging

from safetrain.core import compat, kinds
from safetrain.step import guard, loop_state
from safetrain.step import per_example as examples
from safetrain.step import piece as piece_lib
from safetrain.step.drill import Drill
from safetrain.step.registry import Pieces

# How a step that is not good leaves the state (`train.skip_update` resolved).
SKIP_UPDATES = ("cond", "select")


class GuardedLoop:
  """Runs guarded steps until `n` are applied, recovery is needed, or the
  data ends (with `repeat_data` False).

  Built once by the trainer; the compiled function is traced once (`n` is a
  tensor; the learning-rate scale is a variable), and once more, with the
  rare paths, when a lean loop meets a batch that needs one.

  Args:
    strategy: the distribution strategy.
    model, optimizer: the live Keras objects.
    compute_loss: (model, batch, training) -> (float32 loss, {name: float32
      metric}): the trainer's hook, traced into the step.
    pieces: the run's guard pieces (`registry.build`).
    drill: fault injection (`config.drill`).
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
    jit_compile: `train.jit_compile` resolved: the lean loop's replica step
      (the guard, classification, clipping, loss scaling and the update) is
      one XLA program; with the rare paths built, compute_loss (forward, and
      through the tape its backward pass) is.
    train_metrics: the stateful Keras metrics (`metrics.MetricSet`),
      updated on good steps only, or None; compute_loss then returns y_pred
      as a third element.
    skip_update: `train.skip_update` resolved: "cond" runs the update in a
      `tf.cond` on a good step only; "select" runs it on every step and keeps
      the old value of every variable it (or the forward pass) wrote where
      the step is not good, with `tf.where`: no branch whose predicate a GPU
      must copy to the host, for a copy of the optimizer's state a step.
    element_spec: the spec of one batch; with it (one replica, and no drill
      of bad rows, which makes a rare path certain) the loop is first traced
      lean: the rare paths are built when a batch first needs one (see the
      module docstring). None builds them at once.
  """

  def __init__(
    self,
    *,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    compute_loss: Callable,
    pieces: Pieces,
    drill: Drill,
    rollback_after: int,
    raise_on_bad_inputs: bool,
    repeat_data: bool,
    variables: loop_state.LoopVariables,
    replica_state: list,
    stash: list | None,
    skip_keras_all_reduce: bool,
    metric_names: list[str],
    train_metrics=None,
    jit_compile: bool = False,
    skip_update: Literal["cond", "select"] = "cond",
    element_spec=None,
  ):
    if skip_update not in SKIP_UPDATES:
      raise ValueError(f"skip_update is one of {', '.join(SKIP_UPDATES)}, not {skip_update!r}")
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self._compute_loss, self._jit_compile = compute_loss, jit_compile
    self.pieces = pieces
    self.drill = drill
    self.rollback_after = rollback_after
    self.raise_on_bad_inputs = raise_on_bad_inputs
    self.repeat_data = repeat_data
    self.variables = variables
    self.replica_state = replica_state
    self.stash = stash
    self.skip_keras_all_reduce = skip_keras_all_reduce
    self.metric_names = list(metric_names)
    self.train_metrics = train_metrics or None
    self.skip_update = skip_update
    # Whether compute_loss returns a scalar (known once traced).
    self.scalar_loss: bool | None = None
    self.element_spec = element_spec
    # Lean: the rare paths are not in the graph yet (see the module docstring).
    self.lean = (
      element_spec is not None and strategy.num_replicas_in_sync == 1 and not drill.poisons_rows
    )
    self._resume: _Resume | None = None
    self.retrace()

  def retrace(self) -> None:
    """Makes the compiled functions (at build, and again when a layer's
    dtype changed: the next call traces anew)."""
    # The gradient of an XLA-compiled function is compiled with it.
    # Under XLA the lean loop's replica step is one compiled program (the
    # guard, the classification, clipping, loss scaling and the update); the
    # rare paths' dynamic shapes are not for XLA: with them built, only
    # compute_loss and its gradient are.
    self.jit_step = (
      self._jit_compile and self.lean and all(p.compiles_with_xla() for p in self.pieces)
    )
    c = self._compute_loss
    alone = self._jit_compile and not self.jit_step
    self.compute_loss = tf.function(c, jit_compile=True) if alone else c
    step = self._replica_step
    self._step_fn = tf.function(step, jit_compile=True, autograph=False) if self.jit_step else step
    self.function = tf.function(self._loop, autograph=False)

  def __call__(self, iterator, n: int) -> loop_state.LoopOutput:
    """Runs one loop of up to `n` updates; returns its output as numpy."""
    n = tf.constant(n, tf.int64)
    if not self.lean:
      out = self.function(iterator, n)
    else:
      out, state, batch = self.function(iterator, n)
      if int(out.stop) == loop_state.STOP_PENDING:
        self._go_on_from(state, batch)
        out = self.function(iterator, n)
    return tf.nest.map_structure(lambda t: t.numpy(), out)

  def build_rare_paths(self) -> bool:
    """Traces the loop with every rare path from its next call on; True if
    it was lean (the caller's next call traces anew)."""
    was, self.lean = self.lean, False
    if was:
      self.retrace()
    return was

  def _go_on_from(self, state: loop_state.LoopState, batch) -> None:
    """After a lean call ended at a batch that needs a rare path: the loop
    with every rare path, its next call starting from that call's state and
    that batch."""
    step = int(state.counters[loop_state.RUN_STEP]) + 1
    logging.info(
      "Step %d: a batch needs one of the guard's rare paths (non-finite inputs or examples); "
      "the loop is traced again with them (once).",
      step,
    )
    state = loop_state.with_stop(state, loop_state.STOP_NONE)
    # Once per loop: it is lean no more.
    with self.strategy.scope():
      self._resume = _Resume(
        state=tf.nest.map_structure(lambda t: tf.Variable(t, trainable=False), state),
        batch=[
          tf.Variable(t, trainable=False, shape=tf.TensorShape(None))
          for t in tf.nest.flatten(batch)
        ],
        active=tf.Variable(True, trainable=False),
      )
    self.build_rare_paths()

  # ------------------------------------------------------------ the loop

  def _loop(self, iterator, n):
    max_attempts = 2 * n + self.rollback_after
    carried = {p.name: p.carry() for p in self.pieces}
    s = loop_state.initial(
      self.variables,
      metric_names=self.metric_names,
      pieces={k: v for k, v in carried.items() if v is not None},
    )
    lean, resume = self.lean, None if self.lean else self._resume
    begin = tf.constant(0, tf.int64)
    if resume is not None:
      # The call after a lean one stopped: from its state, at its batch.
      active = resume.active.read_value()
      start = tf.nest.map_structure(lambda v: v.read_value(), resume.state)
      s = tf.nest.map_structure(lambda a, b: tf.where(active, a, b), start, s)
      begin = tf.where(active, start.counters[loop_state.ATTEMPTS], begin)
      resume = (active, begin, resume.read_batch(self.element_spec))
    running = lambda s, *_: loop_state.running(s, n, max_attempts)  # noqa: E731
    if lean:
      # The batch of the last attempt goes out with the state: the one a
      # rare path needs when the loop stopped for it. Under select, with
      # static shapes, the last divergent batch is carried too (a select,
      # not a branch) and stashed once, after the loop.
      last = tf.nest.map_structure(_empty, self.element_spec)
      held = [tf.zeros(spec.shape, spec.dtype) for spec in self._held_specs()]
      s, last, held = tf.while_loop(
        running,
        lambda s, last, held: self._next_lean(iterator, s, last, held),
        (s, last, held),
        shape_invariants=(
          tf.nest.map_structure(lambda t: t.shape, s),
          tf.nest.map_structure(lambda t: _any_rows(t.shape), last),
          [t.shape for t in held],
        ),
      )
      if held:
        diverged = s.tallies[kinds.DIVERGENCE] > 0
        tf.cond(diverged, lambda: self._stash_flat(held), tf.no_op)
    else:
      (s,) = tf.while_loop(running, lambda s: (self._next(iterator, s, resume=resume),), (s,))
    v, c = self.variables, tf.unstack(s.counters)
    v.step.assign(c[loop_state.RUN_STEP])
    v.consecutive_bad.assign(c[loop_state.BAD_RUN])
    v.attempts.assign(c[loop_state.RUN_ATTEMPT])
    v.position.assign_add(c[loop_state.ATTEMPTS] - begin)
    if resume is not None:
      self._resume.active.assign(False)
    for p in self.pieces:
      if p.name in s.pieces:
        p.write(s.pieces[p.name])
    # The rate the last update used (the schedule follows optimizer.iterations).
    schedule = compat.learning_rate_schedule(self.optimizer)
    lr = tf.cast(schedule(self.optimizer.iterations - 1), tf.float32)
    # The host's health check, here: one reduction per variable, once a loop.
    out = loop_state.output(s, lr=lr, params_finite=self.params_finite(), pieces=self.pieces)
    return (out, s, last) if lean else out

  @property
  def branchless(self) -> bool:
    """Hooks select rather than branch: under `skip_update="select"`, and
    under XLA, which wants static shapes."""
    return self.skip_update == "select" or self.jit_step

  def _held_specs(self) -> list:
    """The specs of the stash's leaves when a lean loop carries the last
    divergent batch by select (static shapes, `branchless`), else []."""
    if self.stash is None or not self.branchless:
      return []
    specs = tf.nest.flatten(self.element_spec)
    if not all(spec.shape.is_fully_defined() for spec in specs):
      return []
    return [spec for var, spec in zip(self.stash, specs) if var is not None]

  def _stashed_leaves(self, batch) -> list:
    """The leaves of `batch` the stash keeps (not strings), in order."""
    return [t for var, t in zip(self.stash, tf.nest.flatten(batch)) if var is not None]

  def _hold(self, s, new, batch, held: list) -> list:
    """The last divergent batch, carried: this attempt's where it diverged
    (a lean loop has no input drill: the model saw the batch itself)."""
    diverged = new.tallies[kinds.DIVERGENCE] > s.tallies[kinds.DIVERGENCE]
    return [tf.where(diverged, t, h) for t, h in zip(self._stashed_leaves(batch), held)]

  def _next(self, iterator, s: loop_state.LoopState, resume=None):
    """One attempt on the next batch, or the data's end. `resume`: (active,
    begin, batch): the first attempt of the call after a lean one stopped
    takes that call's batch, not the iterator's next."""
    take = None
    if resume is not None:
      active, begin, pending = resume
      take = active & tf.equal(s.counters[loop_state.ATTEMPTS], begin)
    if self.repeat_data:
      if take is None:
        batch = next(iterator)
      else:
        batch = tf.cond(take, lambda: pending, lambda: next(iterator))
      return self._attempt(s, batch)
    if take is None:
      optional = iterator.get_next_as_optional()
    else:
      optional = tf.cond(
        take,
        lambda: tf.experimental.Optional.from_value(pending),
        iterator.get_next_as_optional,
      )
    end = lambda: loop_state.with_stop(s, loop_state.STOP_DATA_END)  # noqa: E731
    return tf.cond(optional.has_value(), lambda: self._attempt(s, optional.get_value()), end)

  def _next_lean(self, iterator, s, last, held):
    """`_next` for a lean loop: it also returns the attempt's batch (`last`
    at the data's end) and the held divergent batch (see `_hold`)."""

    def attempt(batch):
      new = self._attempt(s, batch)
      return new, batch, self._hold(s, new, batch, held) if held else held

    if self.repeat_data:
      return attempt(next(iterator))
    optional = iterator.get_next_as_optional()
    end = loop_state.with_stop(s, loop_state.STOP_DATA_END)
    return tf.cond(
      optional.has_value(), lambda: attempt(optional.get_value()), lambda: (end, last, held)
    )

  def params_finite(self) -> tf.Tensor:
    """Whether every model and optimizer variable is finite: what the loop
    reports once a loop, and what the trainer checks after a restore."""
    return guard.all_finite(self.model.variables + self.optimizer.variables)

  def _attempt(self, s: loop_state.LoopState, batch) -> loop_state.LoopState:
    """One attempt: the guarded step on every replica, folded into `s`."""
    strategy = self.strategy
    first = lambda x: strategy.experimental_local_results(x)[0]  # noqa: E731
    attempt_now = s.counters[loop_state.RUN_ATTEMPT] + 1
    out = tf.nest.map_structure(
      first, strategy.run(self._step_fn, args=(batch, attempt_now, s.pieces))
    )
    if self.lean and self.stash is not None and not self._held_specs():
      # Out of the step (a variable of the batch's shape is not XLA's). A
      # lean loop has no input drill and changes no batch it does not redo:
      # the model saw this one.
      tf.cond(out.step_class == kinds.DIVERGENCE, lambda: self._stash_batch(batch), tf.no_op)
    folded = loop_state.fold(
      s,
      out,
      pieces=self.pieces,
      rollback_after=self.rollback_after,
      raise_on_bad_inputs=self.raise_on_bad_inputs,
    )
    if not self.lean:
      return folded
    # A batch that needs a rare path: the attempt is not folded (its step
    # left every variable as it was); the loop stops for the retrace.
    stopped = loop_state.with_stop(s, loop_state.STOP_PENDING)
    return tf.nest.map_structure(lambda a, b: tf.where(out.pending, a, b), stopped, folded)

  # ------------------------------------------------------- one replica

  def _replica_step(self, batch, attempt, carried) -> loop_state.Outcome:
    """One guarded step on this replica's shard (replica context).

    Everything that decides (loss, gradients, their norm, input counts) is
    reduced over replicas first, so every replica classifies the step alike.
    """
    ctx = tf.distribute.get_replica_context()
    step = piece_lib.Step(
      batch=self.drill.corrupt_inputs(batch, attempt),
      ctx=ctx,
      attempt=attempt,
      carried=carried,
      branchless=self.branchless,
      lean=self.lean,
    )
    step.skip = tf.constant(False)
    step.pending = tf.constant(False)
    for p in self.pieces:
      p.inputs(step)
    if step.weight is None and step.replicas > 1:
      step.weight = self._row_weight(step)
    step.non_trainable_before = guard.snapshot(self.model.non_trainable_variables)
    step.regrad = functools.partial(self._kept_rows_gradients, step)
    step.row_losses = self._row_losses

    with tf.GradientTape() as tape:
      loss, step.metrics, *pred = self.compute_loss(self.model, step.batch, True)
      self.scalar_loss = not examples.is_per_example(loss)
      step.loss = self._reduce(step, loss)
      scaled = step.loss * step.scale if step.scale is not None else step.loss
    grads = tape.gradient(scaled, self.model.trainable_variables)
    self.present = [i for i, g in enumerate(grads) if g is not None]
    step.grads = self._dense(grads, step.scale)
    for p in self.pieces:
      p.gradients(step)
    self._all_reduce(step)
    step.grads_finite, step.norm = guard.finite_and_norm(step.grads, branchless=step.branchless)

    step.step_class, step.kind = self.pieces.classify(step)
    if self.lean:
      # Not good, no incident, no overflow: the update is skipped and no
      # piece counts the attempt (its outcome is not folded either).
      step.step_class = tf.where(step.pending, kinds.SKIPPED_BATCH, step.step_class)
      step.kind = tf.where(step.pending, kinds.NO_KIND, step.kind)
    good = step.step_class == kinds.GOOD
    if self.train_metrics is not None:
      # Every replica decided the same class: each adds its shard on a good step.
      tf.cond(good, lambda: self.train_metrics.update(step.batch, pred[0]), tf.no_op)
    if self.stash is not None and not self.lean:
      tf.cond(step.step_class == kinds.DIVERGENCE, lambda: self._stash_batch(step.batch), tf.no_op)
    apply_args = {p.name: p.apply_args(step) for p in self.pieces}
    apply_args = {k: v for k, v in apply_args.items() if v is not None}
    ctx.merge_call(
      self._apply_or_skip,
      args=(step.step_class, step.grads, step.norm, step.non_trainable_before),
      kwargs=dict(state_mean=step.replica_mean, apply_args=apply_args),
    )
    return self._outcome(step, good)

  def _reduce(self, step: piece_lib.Step, loss: tf.Tensor) -> tf.Tensor:
    """compute_loss's loss as this replica's share of the step's mean (inside
    the tape): per-example losses reduced by a piece or plainly."""
    weighed = False
    if examples.is_per_example(loss):
      losses = self.drill.corrupt_examples(examples.per_example(loss), step.attempt)
      reduced = [p.reduce_loss(step, losses) for p in self.pieces]
      reduced = [r for r in reduced if r is not None]
      # A piece's masked mean is already weighed by the replica's rows.
      loss, weighed = (reduced[0], True) if reduced else (tf.reduce_mean(losses), False)
    else:
      loss = self.drill.corrupt_loss(loss, step.attempt)
    if step.weight is not None:
      # A replica left without rows (a short last batch) adds nothing: its
      # mean over no rows is NaN.
      w = step.weight
      if not weighed:
        loss = tf.where(w > 0, loss * w, 0.0)
      step.metrics = {k: tf.where(w > 0, m * w, 0.0) for k, m in step.metrics.items()}
    return loss

  def _all_reduce(self, step: piece_lib.Step) -> None:
    """The loss, metrics, gradients and BatchNorm statistics summed over
    replicas (each weighed by its rows); the drill's gradient fault."""
    grads = step.grads
    if step.replicas > 1 and grads:
      # A replica without rows contributes nothing, and BatchNorm's backward
      # pass over no rows is NaN (0 * NaN statistics).
      grads = tf.cond(step.weight > 0, lambda: grads, lambda: [tf.zeros_like(g) for g in grads])
    grads = self.drill.corrupt_grads(grads, step.attempt) if grads else grads
    if step.replicas > 1:
      reduced = step.ctx.all_reduce("sum", [step.loss, step.metrics] + ([grads] if grads else []))
      step.loss, step.metrics = reduced[0], reduced[1]
      grads = reduced[2] if grads else []
    step.grads = grads
    step.replica_state = self.replica_state
    if self.replica_state:
      w = step.weight
      step.replica_mean = step.ctx.all_reduce(
        "sum", [tf.where(w > 0, v * w, tf.zeros_like(v)) for v in self.replica_state]
      )

  def _outcome(self, step: piece_lib.Step, good: tf.Tensor) -> loop_state.Outcome:
    norm_good = tf.where(good, step.norm, 0.0)
    sums = {"loss": tf.where(good, step.loss, 0.0), "norm": norm_good}
    occurred = {}
    for p in self.pieces:
      sums.update(p.step_sums(step))
      occurred.update(p.occurred(step))
    outcomes = {p.name: p.outcome(step) for p in self.pieces}
    return loop_state.Outcome(
      step_class=step.step_class,
      kind=step.kind,
      tally=loop_state.tally(step.step_class, step.kind, occurred, sums),
      loss=step.loss,
      norm_good=norm_good,
      metrics={k: tf.where(good, m, 0.0) for k, m in step.metrics.items()},
      pieces={k: v for k, v in outcomes.items() if v is not None},
      pending=step.pending,
    )

  def _row_weight(self, step: piece_lib.Step) -> tf.Tensor:
    """Unchecked inputs: each replica's mean still counts by its rows."""
    rows = tf.shape(tf.nest.flatten(step.batch)[0])[0]
    total = tf.cast(step.ctx.all_reduce("sum", rows), tf.float32)
    return tf.cast(rows, tf.float32) / tf.maximum(total, 1.0)

  def _dense(self, grads, scale):
    grads = [guard.dense_float32(grads[i]) for i in self.present]
    return [g / scale for g in grads] if scale is not None else grads

  def _kept_rows_gradients(self, step: piece_lib.Step, kept, total_ok):
    """Forward and backward again on the kept rows only (the drill is not
    applied again: its examples were the dropped ones); returns (their
    loss, the gradients). A scalar loss is the kept rows' mean already."""
    if self.strategy.num_replicas_in_sync == 1:
      # The first forward pass saw the bad rows: BatchNorm statistics back.
      guard.put_back(self.model.non_trainable_variables, step.non_trainable_before)
    with tf.GradientTape() as tape:
      loss, *_ = self.compute_loss(self.model, kept, True)
      if examples.is_per_example(loss):
        loss = tf.reduce_sum(examples.per_example(loss)) / tf.maximum(total_ok, 1.0)
      loss = tf.cast(loss, tf.float32)
      scaled = loss * step.scale if step.scale is not None else loss
    grads = tape.gradient(scaled, self.model.trainable_variables)
    return loss, self._dense(grads, step.scale)

  def _row_losses(self, batch) -> tf.Tensor:
    """float32[B]: compute_loss on each row alone, in inference mode (a
    batch of one has no BatchNorm statistics), as triage's row probe."""

    def one(row):
      loss, *_ = self.compute_loss(self.model, tf.nest.map_structure(lambda t: t[None], row), False)
      return tf.cast(examples.plain_mean(loss), tf.float32)

    return tf.map_fn(one, batch, fn_output_signature=tf.float32)

  def _stash_batch(self, batch):
    return self._stash_flat(self._stashed_leaves(batch))

  def _stash_flat(self, leaves: list):
    for var, t in zip([v for v in self.stash if v is not None], leaves):
      var.assign(t)
    return tf.no_op()

  # ------------------------------------------------- the update itself

  def _apply_or_skip(self, strategy, step_class, grads, norm, nt_before, *, state_mean, apply_args):
    """Cross-replica: apply the update on a good step, else leave state as is.

    It runs in cross-replica context because `apply_gradients` under
    MirroredStrategy calls merge_call, which a cond in replica context cannot
    contain (the pattern of Keras's LossScaleOptimizer._tf_apply).
    """
    first = lambda x: strategy.experimental_local_results(x)[0]  # noqa: E731
    step_class, norm = first(step_class), first(norm)
    args = tf.nest.map_structure(first, apply_args)
    nt_before = [first(v) for v in nt_before]
    update = functools.partial(self._update, strategy, grads, norm, state_mean, args)
    if self.skip_update == "select":
      self._select(step_class, update, nt_before)
      return

    def good():
      update()
      for p in self.pieces:
        p.on_update(tf.constant(True), step_class)
      return tf.constant(0)

    def skip():
      # A skipped step must not leave its mark in BatchNorm statistics or RNG
      # state either: put back what the forward pass changed.
      guard.put_back(self.model.non_trainable_variables, nt_before)
      for p in self.pieces:
        p.on_update(tf.constant(False), step_class)
      return tf.constant(0)

    tf.cond(step_class == kinds.GOOD, good, skip)

  def _update(self, strategy, grads, norm, state_mean, args) -> None:
    """The update of a good step: the optimizer's, on every replica (each
    piece's `clip` first), and the replicas' mean BatchNorm statistics."""
    variables = self._updated()
    n_rep = strategy.num_replicas_in_sync

    def apply_on_replica(grads, norm):
      for p in self.pieces:
        grads = p.clip(grads, norm, args.get(p.name))
      if n_rep > 1 and not self.skip_keras_all_reduce:
        # Keras sums gradients across replicas again; they are already reduced.
        grads = [g / n_rep for g in grads]
      self.optimizer.apply_gradients(zip(grads, variables))

    if variables:
      strategy.extended.call_for_each_replica(apply_on_replica, args=(grads, norm))
    for var, value in zip(self.replica_state, state_mean):
      var.assign(strategy.experimental_local_results(value)[0])

  def _updated(self) -> list:
    """The trainable variables the optimizer updates (those with a gradient)."""
    return [self.model.trainable_variables[i] for i in self.present]

  def _select(self, step_class, update, nt_before) -> None:
    """The update on every step, then the old values kept where the step is
    not good: every variable it writes (the updated weights, every optimizer
    variable: slots, `iterations`) and every non-trainable one the forward
    pass wrote (BatchNorm statistics, RNG state), with `tf.where`.

    The old values are read values, which TensorFlow never changes in place
    (an update copies a buffer still read), so they cost the optimizer's
    update one copy of what it writes. A skipped step's update may compute
    NaN (its gradients are not finite); the select never lets it through.
    """
    good = step_class == kinds.GOOD
    written = self._updated() + list(self.optimizer.variables)
    before = guard.snapshot(written)
    update()
    guard.select(written, good, before)
    guard.select(self.model.non_trainable_variables, good, nt_before)
    for p in self.pieces:
      p.on_update(good, step_class)


class _Resume:
  """What the call after a lean one stopped starts from: that call's state
  and batch, and whether it is still to be taken (variables, so the traced
  loop reads them)."""

  def __init__(self, *, state, batch: list, active: tf.Variable):
    self.state, self.batch, self.active = state, batch, active

  def read_batch(self, element_spec):
    flat = [
      tf.ensure_shape(v.read_value(), spec.shape)
      for v, spec in zip(self.batch, tf.nest.flatten(element_spec))
    ]
    return tf.nest.pack_sequence_as(element_spec, flat)


def _empty(spec: tf.TensorSpec) -> tf.Tensor:
  """A batch of no rows of `spec` (the lean loop's last batch, at first)."""
  return tf.zeros([0] + [d or 0 for d in spec.shape[1:]], spec.dtype)


def _any_rows(shape: tf.TensorShape) -> tf.TensorShape:
  return tf.TensorShape([None] + [None] * (shape.rank - 1)) if shape.rank else shape
