"""The compiled loop's packed state, through its own functions, on tensors."""

import numpy as np
import tensorflow as tf

from safetrain.core import kinds
from safetrain.step import bad_batches, guard, loop_state, registry
from safetrain.step import per_example as examples

K = loop_state.NUM_KINDS
LOSS, GRADS, SPIKE, INPUTS = (
  registry.code(k) for k in ("nonfinite_loss", "nonfinite_grads", "loss_spike", "nonfinite_inputs")
)
# The two pieces whose state these tests follow: the input check (one float
# leaf) and the bad-batch buffer.
PIECES = registry.Pieces(
  [guard.InputPiece(policy="drop_rows", leaf_names=("x",)), bad_batches.BadBatchesPiece()]
)


def _variables(step=10, attempts=12, bad=0):
  return loop_state.LoopVariables(
    step=tf.Variable(step, dtype=tf.int64),
    consecutive_bad=tf.Variable(bad, dtype=tf.int64),
    attempts=tf.Variable(attempts, dtype=tf.int64),
    position=tf.Variable(0, dtype=tf.int64),
  )


def _outcome(step_class, kind, *, loss=1.0, norm=2.0, dropped_rows=0, leaf_bad=(0,), cols=(-1,)):
  good = step_class == kinds.GOOD
  sums = {
    "dropped_rows": float(dropped_rows),
    "loss": loss if good else 0.0,
    "norm": norm if good else 0.0,
  }
  return loop_state.Outcome(
    step_class=tf.constant(step_class),
    kind=tf.constant(kind),
    tally=loop_state.tally(
      tf.constant(step_class),
      tf.constant(kind),
      {"nonfinite_inputs": tf.constant(dropped_rows > 0)},
      sums,
    ),
    loss=tf.constant(loss),
    norm_good=tf.constant(norm if good else 0.0),
    metrics={},
    pieces={
      "inputs": guard.InputState(
        finite=tf.constant([leaf_bad, cols], tf.int32),
        labels=tf.constant([0, 0, -1]),
        shapes=tf.zeros([1], tf.int32),
        skipped=tf.one_hot(
          guard.NONFINITE if step_class == kinds.SKIPPED_BATCH else -1, 4, dtype=tf.int32
        ),
        last=tf.constant(guard.NONFINITE if step_class == kinds.SKIPPED_BATCH else -1),
      ),
      "bad_batches": (
        tf.constant(not good),
        bad_batches.entry(
          tf.constant(kind), tf.constant(False), tf.constant(1), tf.fill([examples.MAX_ROWS], -1)
        ),
      ),
    },
  )


def _run(outcomes, *, rollback_after=3, raise_on_bad_inputs=False, bad=0):
  s = loop_state.initial(
    _variables(bad=bad), metric_names=[], pieces={p.name: p.carry() for p in PIECES}
  )
  for o in outcomes:
    s = loop_state.fold(
      s,
      o,
      pieces=PIECES,
      rollback_after=rollback_after,
      raise_on_bad_inputs=raise_on_bad_inputs,
    )
  out = loop_state.output(s, lr=tf.constant(0.1), params_finite=tf.constant(True), pieces=PIECES)
  return s, tf.nest.map_structure(lambda t: t.numpy(), out)


def test_good_steps_move_the_run_and_sum_loss_and_norm():
  s, out = _run([_outcome(kinds.GOOD, kinds.NO_KIND, loss=1.0, norm=2.0)] * 3)
  c = s.counters.numpy()
  assert c[loop_state.RUN_STEP] == 13 and c[loop_state.RUN_ATTEMPT] == 15
  assert out.applied == 3 and out.attempts == 3 and out.last_good == 15
  assert list(out.counts) == [3, 0, 0, 0]
  assert out.sums["loss"] == 3.0 and out.sums["norm"] == 6.0 and out.norm_max == 2.0
  assert list(out.kind_counts) == [0] * K and list(out.kind_first) == [-1] * K
  assert out.stop == loop_state.STOP_NONE and out.pieces["bad_batches"].n == 0


def test_divergences_count_per_kind_and_a_run_of_them_stops_the_loop():
  good = _outcome(kinds.GOOD, kinds.NO_KIND)
  nan = _outcome(kinds.DIVERGENCE, LOSS, loss=float("nan"))
  spike = _outcome(kinds.DIVERGENCE, SPIKE, loss=50.0)
  s, out = _run([good, nan, good, spike, nan, nan], rollback_after=3)
  assert out.applied == 2 and out.attempts == 6
  assert list(out.counts) == [2, 0, 4, 0]
  assert out.kind_counts[LOSS] == 3 and out.kind_counts[SPIKE] == 1
  # Steps are the run's applied steps + 1 at the time (the run started at 10).
  assert out.kind_first[LOSS] == 12 and out.kind_last[LOSS] == 13
  assert out.kind_first[SPIKE] == 13
  assert out.open_kinds[LOSS] == 2 and out.open_kinds[SPIKE] == 1
  assert out.stop == loop_state.STOP_ROLLBACK
  assert s.counters.numpy()[loop_state.BAD_RUN] == 3
  assert np.isnan(out.last_loss) and out.pieces["bad_batches"].n == 4
  assert out.last_good == 12 + 3  # the run's attempt number of the second good step


def test_a_run_of_divergences_goes_on_across_loops():
  nan = _outcome(kinds.DIVERGENCE, GRADS)
  _, out = _run([nan], rollback_after=3, bad=2)
  assert out.stop == loop_state.STOP_ROLLBACK


def test_dropped_rows_are_an_inputs_occurrence_and_a_skipped_batch_can_raise():
  dropped = _outcome(kinds.GOOD, kinds.NO_KIND, dropped_rows=2, leaf_bad=(2,), cols=(5,))
  skipped = _outcome(kinds.SKIPPED_BATCH, INPUTS, leaf_bad=(16,), cols=(1,))
  _, out = _run([dropped, skipped])
  assert out.kind_counts[INPUTS] == 2 and out.sums["dropped_rows"] == 2
  finite = out.pieces["inputs"].finite
  assert list(finite[0]) == [18] and list(finite[1]) == [5]  # the first bad column stays
  assert list(out.pieces["inputs"].skipped) == [0, 1, 0, 0]
  assert out.stop == loop_state.STOP_NONE
  _, out = _run([dropped, skipped], raise_on_bad_inputs=True)
  assert out.stop == loop_state.STOP_RAISE


def test_the_loop_goes_on_until_n_applied_attempts_run_out_or_a_stop():
  s = loop_state.initial(_variables(), metric_names=[], pieces={})
  assert bool(loop_state.running(s, tf.constant(1, tf.int64), tf.constant(5, tf.int64)))
  assert not bool(loop_state.running(s, tf.constant(0, tf.int64), tf.constant(5, tf.int64)))
  stopped = loop_state.with_stop(s, loop_state.STOP_DATA_END)
  assert not bool(loop_state.running(stopped, tf.constant(9, tf.int64), tf.constant(9, tf.int64)))
  assert stopped.counters.numpy()[loop_state.STOP] == loop_state.STOP_DATA_END


def test_a_loop_ends_at_the_next_checkpoint_or_evaluation_and_at_train_steps():
  length = loop_state.loop_length
  assert length(0, train_steps=1000, steps_per_loop=100, every=(500, 0)) == 100
  assert length(450, train_steps=1000, steps_per_loop=100, every=(500, 0)) == 50
  assert length(450, train_steps=1000, steps_per_loop=100, every=(500, 30)) == 30
  assert length(990, train_steps=1000, steps_per_loop=100, every=(500, 0)) == 10
  assert length(1000, train_steps=1000, steps_per_loop=100, every=(500, 0)) == 1


def test_weights_an_action_makes_non_finite_are_never_saved_and_are_rolled_back(tmp_path):
  """The loop reports whether the variables are finite and the controller
  keeps that answer, until something outside the loop may change them: an
  action that writes NaN into a weight right before a checkpoint is due."""
  import os

  from common import TinyTrainer, tiny_config

  class Poisoner(TinyTrainer):
    poisoned = False

    def actions(self):
      def poison(record):
        if record.step == 10 and not self.poisoned:
          self.poisoned = True
          kernel = self.model.trainable_variables[0]
          kernel.assign(kernel * float("nan"))

      return [poison]

  c = tiny_config(**{"train.steps": 20, "train.steps_per_loop": 5, "checkpoint.every_steps": 10})
  t = Poisoner(c, str(tmp_path))
  r = t.fit()
  assert t.poisoned and r.step == 20
  assert [(i["kind"], i["action"]) for i in r.incidents if i["action"] == "rollback"] == [
    ("nonfinite_params", "rollback")
  ]
  assert all(np.isfinite(w).all() for w in t.model.get_weights())
  # Every checkpoint on disk holds finite values only.
  directory = os.path.join(str(tmp_path), "checkpoints")
  saved = [s for s, _ in t.parts.checkpoints.checkpoints()]
  assert saved and 20 in saved
  for step in saved:
    reader = tf.train.load_checkpoint(os.path.join(directory, f"ckpt-{step}"))
    for name, dtype in reader.get_variable_to_dtype_map().items():
      if dtype.is_floating:
        assert np.isfinite(reader.get_tensor(name)).all(), (step, name)
