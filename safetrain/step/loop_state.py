"""What the compiled loop carries from one attempt to the next, and reports.

The loop's own bookkeeping (counters, tallies per step class and incident
kind, the named sums of `registry.SUMS`, the steps where each kind was first
and last seen) is carried as a few packed vectors and moved by one fused
update per attempt (`fold`): every loop-carried tensor costs executor nodes
on every iteration, and twenty scalars cost more than the step's own
arithmetic on a small model. Each guard piece carries its own state by name
(`LoopState.pieces`), moved by its own `fold`. `output` unpacks them once per
loop into `LoopOutput`, the named tuple the host reads.

Everything here is a pure function of tensors, testable without a model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf

from safetrain.core import kinds
from safetrain.step import piece as piece_lib
from safetrain.step import registry

# Why a loop ended before its `n` updates. STOP_PENDING (a lean loop's batch
# needs a rare path) never leaves `GuardedLoop.__call__`.
STOP_NONE, STOP_ROLLBACK, STOP_DATA_END, STOP_RAISE, STOP_PENDING = range(5)
NUM_CLASSES = len(kinds.CLASSES)
NUM_KINDS = len(registry.KINDS)
NUM_SUMS = len(registry.SUMS)
# `LoopState.counters`, in order.
RUN_STEP, RUN_ATTEMPT, APPLIED, ATTEMPTS, BAD_RUN, LAST_GOOD, STOP = range(7)
# `LoopState.tallies`: class counts, then kind counts, then the sums.
_KINDS_AT = NUM_CLASSES
_SUMS_AT = NUM_CLASSES + NUM_KINDS


class LoopOutput(NamedTuple):
  """What one call of the compiled loop reports (tensors; `.numpy()` once).

  Attributes:
    applied: good steps, i.e. updates applied.
    attempts: steps attempted, skipped ones included.
    counts: int64[4], attempts per step class (`kinds.CLASSES`).
    kind_counts: int64[K], attempts per incident kind (`registry.KINDS`).
    kind_first, kind_last: int64[K], the step number (applied + 1 at the
      time) of each kind's first and last occurrence, or -1.
    sums: {name: float32} over the loop, by `registry.SUMS`: "loss" and
      "norm" (of good steps, the norm before clipping) and each piece's.
    norm_max: the largest pre-clip norm of a good step.
    last_loss: the loss of the last attempt (NaN if it was not finite).
    stop: STOP_NONE, or why the loop ended early.
    lr: the learning rate of the last update.
    metric_sums: {name: sum over good steps} of compute_loss's metrics.
    last_good: the run's attempt number of the loop's last good step, or -1.
    open_kinds: int64[K], per kind, the divergent attempts since the last
      good one (the open run that may end the loop for recovery).
    pieces: {piece name: what its `report` gives} (the input check's bad
      rows and columns, the bad-batch buffer, ...).
    params_finite: whether every model and optimizer variable was finite
      when the loop ended (the host's health check, computed in the graph).
  """

  applied: Any
  attempts: Any
  counts: Any
  kind_counts: Any
  kind_first: Any
  kind_last: Any
  sums: Any
  norm_max: Any
  last_loss: Any
  stop: Any
  lr: Any
  metric_sums: Any
  last_good: Any = -1
  open_kinds: Any = None
  pieces: Any = None
  params_finite: Any = True

  def count(self, kind: str) -> int:
    """Attempts of `kind` in the loop."""
    return int(self.kind_counts[registry.code(kind)])


class LoopVariables(NamedTuple):
  """The variables the loop reads at its start and writes at its end."""

  step: tf.Variable  # applied updates of the run
  consecutive_bad: tf.Variable  # divergent attempts in a row, across loops
  attempts: tf.Variable  # attempts of the run (never rolled back)
  position: tf.Variable  # batches consumed


class Outcome(NamedTuple):
  """What one attempt decided, from the replica step (replica 0's copy).

  Attributes:
    step_class: int32, `kinds.CLASSES` index; kind: int32 code or NO_KIND.
    tally: float32[4 + K + NUM_SUMS], the attempt's class one-hot, kind
      one-hot (with the kinds pieces say occurred) and sums, added to
      `LoopState.tallies` in one op.
    loss: the attempt's loss; norm_good: the pre-clip norm of a good step.
    metrics: {name: metric of a good step, else 0}.
    pieces: {piece name: its `outcome`}.
    pending: bool: a lean loop's attempt needs a rare path (not folded).
  """

  step_class: tf.Tensor
  kind: tf.Tensor
  tally: tf.Tensor
  loss: tf.Tensor
  norm_good: tf.Tensor
  metrics: dict
  pieces: dict
  pending: Any = False


class LoopState(NamedTuple):
  """The loop-carried state of one call, packed."""

  counters: tf.Tensor  # int64[7]: RUN_STEP .. STOP
  tallies: tf.Tensor  # float32[4 + K + NUM_SUMS]: class counts, kind counts, sums
  open_kinds: tf.Tensor  # float32[K]: divergent attempts per kind since the last good
  kind_steps: tf.Tensor  # int64[2, K]: first and last step of each kind, or -1
  extremes: tf.Tensor  # float32[2]: largest good norm, last loss
  metrics: dict
  pieces: dict  # {piece name: its carried state}


def initial(variables: LoopVariables, *, metric_names, pieces: dict) -> LoopState:
  """The state at the start of a loop, from the run's variables and each
  piece's `carry()` (`pieces`: {name: carried})."""
  zero = tf.constant(0, tf.int64)
  return LoopState(
    counters=tf.stack(
      [
        variables.step.read_value(),
        variables.attempts.read_value(),
        zero,
        zero,
        variables.consecutive_bad.read_value(),
        tf.constant(-1, tf.int64),
        tf.constant(STOP_NONE, tf.int64),
      ]
    ),
    tallies=tf.zeros([_SUMS_AT + NUM_SUMS]),
    open_kinds=tf.zeros([NUM_KINDS]),
    kind_steps=tf.fill([2, NUM_KINDS], tf.constant(-1, tf.int64)),
    extremes=tf.constant([0.0, float("nan")]),
    metrics={k: tf.constant(0.0) for k in metric_names},
    pieces=dict(pieces),
  )


def tally(step_class, kind, occurred: dict, sums: dict) -> tf.Tensor:
  """An attempt's `Outcome.tally`: class and kind one-hots, and its sums.

  `occurred` ({kind name: bool}) are kinds counted whatever the step became
  (rows dropped are a nonfinite_inputs occurrence); `sums` ({name: float32})
  are placed by `registry.SUMS`, missing ones 0. (one_hot of NO_KIND, -1, is
  all zeros.)
  """
  kind_hot = tf.one_hot(kind, NUM_KINDS)
  for name, hit in occurred.items():
    c = registry.code(name)
    kind_hot += tf.one_hot(tf.where(hit & (kind != c), c, -1), NUM_KINDS)
  zero = tf.constant(0.0)
  vec = tf.stack([tf.cast(sums.get(name, zero), tf.float32) for name in registry.SUMS])
  return tf.concat([tf.one_hot(step_class, NUM_CLASSES), kind_hot, vec], 0)


def fold(
  s: LoopState,
  o: Outcome,
  *,
  pieces,
  rollback_after: int,
  raise_on_bad_inputs: bool,
) -> LoopState:
  """The state after one attempt.

  The run's counters are carried absolute and moved by one add each: sums
  like base + count + 1 become an AddN that Grappler's memory optimizer
  turns into a TemporaryVariable, which leaks across while-loop iterations
  on large models (AlreadyExistsError on the next call).
  """
  run_step, run_attempt, applied, attempts, bad_run, last_good, stop = tf.unstack(s.counters)
  good = o.step_class == kinds.GOOD
  g = tf.cast(good, tf.int64)
  attempt_now = run_attempt + 1
  step_now = run_step + 1
  bad_run = tf.where(good, tf.constant(0, tf.int64), bad_run) + tf.cast(
    o.step_class == kinds.DIVERGENCE, tf.int64
  )
  stop = tf.where(bad_run >= rollback_after, tf.constant(STOP_ROLLBACK, tf.int64), stop)
  if raise_on_bad_inputs:
    stop = tf.where(o.step_class == kinds.SKIPPED_BATCH, tf.constant(STOP_RAISE, tf.int64), stop)
  kind_hot = o.tally[_KINDS_AT:_SUMS_AT]
  hit = kind_hot > 0
  first_seen = hit & (s.kind_steps[0] < 0)
  core = piece_lib.Core(
    good=good,
    step_class=o.step_class,
    kind=o.kind,
    loss=o.loss,
    norm_good=o.norm_good,
    attempt=attempt_now,
    step=step_now,
  )
  return LoopState(
    counters=tf.stack(
      [
        run_step + g,
        attempt_now,
        applied + g,
        attempts + 1,
        bad_run,
        tf.where(good, attempt_now, last_good),
        stop,
      ]
    ),
    tallies=s.tallies + o.tally,
    open_kinds=tf.where(good, tf.zeros_like(s.open_kinds), s.open_kinds + kind_hot),
    kind_steps=tf.where(tf.stack([first_seen, hit]), step_now, s.kind_steps),
    extremes=tf.stack([tf.maximum(s.extremes[0], o.norm_good), o.loss]),
    metrics={k: v + o.metrics[k] for k, v in s.metrics.items()},
    pieces={
      name: pieces.get(name).fold(carried, o.pieces.get(name), core)
      for name, carried in s.pieces.items()
    },
  )


def loop_length(step: int, *, train_steps: int, steps_per_loop: int, every: tuple) -> int:
  """The updates of the next loop: up to `steps_per_loop`, ending at
  `train_steps` or at the next multiple of each of `every` (checkpoints,
  evaluations; 0 is none)."""
  bounds = [train_steps] + [(step // e + 1) * e for e in every if e]
  return max(1, min(min(bounds) - step, steps_per_loop))


def running(s: LoopState, n: tf.Tensor, max_attempts: tf.Tensor) -> tf.Tensor:
  """Whether the loop goes on: fewer than `n` applied, attempts left, no stop."""
  c = s.counters
  return (c[APPLIED] < n) & (c[ATTEMPTS] < max_attempts) & (c[STOP] == STOP_NONE)


def with_stop(s: LoopState, why: int) -> LoopState:
  return s._replace(counters=tf.tensor_scatter_nd_update(s.counters, [[STOP]], [why]))


def output(s: LoopState, *, lr: tf.Tensor, params_finite: tf.Tensor, pieces) -> LoopOutput:
  """The loop's report, unpacked from its final state."""
  c, t = s.counters, s.tallies
  sums = tf.unstack(t[_SUMS_AT:], num=NUM_SUMS)
  reports = {p.name: p.report(s.pieces[p.name]) for p in pieces if p.name in s.pieces}
  return LoopOutput(
    applied=c[APPLIED],
    attempts=c[ATTEMPTS],
    counts=tf.cast(t[:_KINDS_AT], tf.int64),
    kind_counts=tf.cast(t[_KINDS_AT:_SUMS_AT], tf.int64),
    kind_first=s.kind_steps[0],
    kind_last=s.kind_steps[1],
    sums=dict(zip(registry.SUMS, sums)),
    norm_max=s.extremes[0],
    last_loss=s.extremes[1],
    stop=tf.cast(c[STOP], tf.int32),
    lr=lr,
    metric_sums=s.metrics,
    last_good=c[LAST_GOOD],
    open_kinds=tf.cast(s.open_kinds, tf.int64),
    pieces={k: v for k, v in reports.items() if v is not None},
    params_finite=params_finite,
  )
