"""MirroredStrategy over two logical CPUs: the same run as on one device, and
guard and recovery decisions every replica agrees on.

conftest.py splits the CPU in two before TensorFlow starts, so
`distribute.strategy=mirrored` runs two replicas in this process. Each
replica gets half of the global batch; a drill with `drill.replica=1` poisons
only the second replica's shard.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import TinyTrainer, all_finite, regression_data, tiny_config, weights

import safetrain
from safetrain.core import distribute


def mirrored_config(**overrides):
  return tiny_config(
    **{"distribute.strategy": "mirrored", "distribute.cpu_replicas": 2, **overrides}
  )


def replica_values(trainer, variable):
  """The value of a Keras variable on each replica."""
  return [x.numpy() for x in trainer.strategy.experimental_local_results(variable.value)]


def assert_replicas_agree(trainer):
  """Every model and optimizer variable is bit-identical on every replica."""
  for v in trainer.model.variables + trainer.optimizer.variables:
    values = replica_values(trainer, v)
    assert len(values) == trainer.strategy.num_replicas_in_sync
    for other in values[1:]:
      np.testing.assert_array_equal(values[0], other, err_msg=v.path)


def assert_same_weights(a, b):
  for wa, wb in zip(weights(a), weights(b)):
    np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def run(config, workdir, cls=TinyTrainer):
  trainer = cls(config, workdir)
  return trainer, trainer.fit()


def kinds(result):
  return [(i["step"], i["kind"], i["action"]) for i in result.incidents]


class EvalTrainer(TinyTrainer):
  """With 33 eval rows in batches of 16: the last batch of one row leaves one
  replica's shard empty."""

  def build_eval_dataset(self):
    x, y = regression_data(n=33, seed=3)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


@pytest.fixture(scope="module")
def one_device_adam(tmp_path_factory):
  """The reference: 20 Adam steps on one device, then an evaluation."""
  c = tiny_config(**{"eval.steps": 0})
  return run(c, str(tmp_path_factory.mktemp("one_device") / "run"), EvalTrainer)


@pytest.mark.parametrize("keras_reduces", [False, True], ids=["one_all_reduce", "keras_too"])
def test_mirrored_run_matches_the_one_device_run(keras_reduces, one_device_adam, tmp_path):
  one, r1 = one_device_adam
  if keras_reduces:
    # An optimizer whose own all-reduce safetrain cannot switch off: the
    # reduced gradients are divided by the replica count instead.
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(distribute, "skip_optimizer_all_reduce", lambda optimizer, strategy: False)
      two, r2 = run(mirrored_config(**{"eval.steps": 0}), str(tmp_path / "two"), EvalTrainer)
  else:
    two, r2 = run(mirrored_config(**{"eval.steps": 0}), str(tmp_path / "two"), EvalTrainer)
  assert two._skip_keras_all_reduce is not keras_reduces
  assert two.strategy.num_replicas_in_sync == 2 and one.strategy.num_replicas_in_sync == 1
  assert r1.step == r2.step == 20 and r2.incidents == []
  np.testing.assert_allclose(r2.loss, r1.loss, rtol=1e-5)
  assert_same_weights(one, two)
  # Evaluation weighs each replica's shard by its rows (one shard is empty).
  np.testing.assert_allclose(r2.eval_metrics["loss"], r1.eval_metrics["loss"], rtol=1e-5)
  assert_replicas_agree(two)
  # The optimizer advanced once per update, not once per replica.
  assert int(two.optimizer.iterations.numpy()) == 20


def test_nan_on_one_replica_skips_the_step_on_every_replica(tmp_path):
  # Replica 1's shard only: a NaN loss (half the examples: more than
  # guard.max_dropped_examples, so the step is lost), then Inf gradients, then
  # a NaN input row.
  drills = {
    "drill.loss_steps": "3",
    "drill.grad_steps": "5",
    "drill.input_steps": "7",
    "guard.bad_inputs": "skip_batch",
    "train.steps": 10,
  }
  two, r2 = run(mirrored_config(**drills, **{"drill.replica": 1}), str(tmp_path / "two"))
  # The same drills on one device poison the whole batch: the same decisions.
  one, r1 = run(tiny_config(**drills), str(tmp_path / "one"))
  assert r2.step == 10 and r2.attempts == 13 and r2.skipped_steps == 3 and r2.rollbacks == 0
  assert kinds(r2) == kinds(r1)
  # Attempts 3, 5 and 7 are updates 3, 4 and 5 (skipped steps are not updates).
  # The next batch trained each time: bad batches, quarantined.
  assert kinds(r2) == [
    (5, "nonfinite_inputs", "skipped_batch"),
    (3, "nonfinite_loss", "quarantined_batch"),
    (4, "nonfinite_grads", "quarantined_batch"),
  ]
  assert_replicas_agree(two)
  assert all_finite(two)
  assert_same_weights(one, two)


def test_nan_examples_on_one_replica_are_dropped_on_every_replica_alike(tmp_path):
  # Per-example losses (the default compute_loss): two examples of replica 0's
  # shard (global rows 0 and 1) go NaN at attempts 3-4; both replicas drop
  # them and train on the other 14 rows, as one device dropping rows 0, 1.
  drills = {"drill.loss_steps": "3-4", "drill.loss_rows": 2, "train.steps": 8}
  two, r2 = run(mirrored_config(**drills, **{"drill.replica": 0}), str(tmp_path / "two"))
  one, r1 = run(tiny_config(**drills), str(tmp_path / "one"))
  for r in (r1, r2):
    assert r.step == 8 and r.attempts == 8 and r.skipped_steps == 0 and r.examples_dropped == 4
    assert kinds(r) == [(3, "nonfinite_loss", "dropped_examples")]
  assert_replicas_agree(two)
  assert all_finite(two)
  assert_same_weights(one, two)


def test_divergence_on_one_replica_rolls_back_every_replica(one_device_adam, tmp_path):
  # auto with two logical CPUs is mirrored.
  c = tiny_config(
    **{
      "distribute.strategy": "auto",
      "distribute.cpu_replicas": 2,
      "drill.loss_steps": "5-7",
      "drill.replica": 0,
      "guard.rollback_after": 3,
    }
  )
  two, r = run(c, str(tmp_path / "two"))
  assert two.strategy.num_replicas_in_sync == 2
  assert r.step == 20 and r.rollbacks == 1 and r.lr_scale == 0.5
  rollback = [i for i in r.incidents if i["action"] == "rollback"]
  assert len(rollback) == 1 and rollback[0]["restored_step"] == 0 and rollback[0]["step"] == 5
  assert all_finite(two)
  assert_replicas_agree(two)
  # The restored state and the halved learning rate are in force on both.
  one, _ = run(
    tiny_config(**{"drill.loss_steps": "5-7", "guard.rollback_after": 3}), str(tmp_path / "one")
  )
  assert_same_weights(one, two)
  # Different from the run without the incident: the rollback did happen.
  assert not np.allclose(weights(two)[0], weights(one_device_adam[0])[0])


def test_replay_rollback_under_mirrored_replays_the_same_batches(tmp_path):
  """recovery.data=replay re-creates the distributed iterator at the
  checkpoint's data position (a distributed iterator cannot be saved)."""
  drill = {"drill.loss_steps": "12-14", "recovery.data": "replay"}
  two, r2 = run(mirrored_config(**drill, **{"drill.replica": 1}), str(tmp_path / "two"))
  one, r1 = run(tiny_config(**drill), str(tmp_path / "one"))
  assert r2.rollbacks == r1.rollbacks == 1 and r2.batches_skipped == 0
  assert r2.attempts == r1.attempts
  assert_same_weights(one, two)
  assert_replicas_agree(two)


def test_mirrored_resume_continues_at_the_saved_data_position(one_device_adam, tmp_path):
  workdir = str(tmp_path / "run")
  run(mirrored_config(**{"train.steps": 10}), workdir)
  resumed, r = run(mirrored_config(), workdir)
  assert r.step == 20
  # The uninterrupted run, to float tolerance: same batches, same state.
  assert_same_weights(one_device_adam[0], resumed)
  assert_replicas_agree(resumed)
  # In-process mirrored is one worker, the chief: it writes WORKDIR itself.
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert "ckpt-20.index" in names and not [n for n in names if n.startswith(".scratch")]
  assert safetrain.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]["step"] == 20


class PlainTrainer(TinyTrainer):
  """Unshuffled batches, so a test can compute what the step saw."""

  def build_train_dataset(self):
    x, y = regression_data()
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)


class CleanedTrainer(TinyTrainer):
  """The batches PlainTrainer yields, with rows 8 and 9 of each removed."""

  def build_train_dataset(self):
    x, y = regression_data()
    keep = np.ones(16, bool)
    keep[8:10] = False
    xb = x[: 16 * 3].reshape(3, 16, 4)[:, keep]
    yb = y[: 16 * 3].reshape(3, 16, 1)[:, keep]
    return tf.data.Dataset.from_tensor_slices((xb, yb))


def test_rows_dropped_on_one_shard_give_the_global_mean_loss(tmp_path):
  # Rows 0-1 of replica 1's shard are rows 8-9 of the global batch.
  overrides = {
    "drill.input_steps": "1-3",
    "drill.input_rows": 2,
    "drill.replica": 1,
    "train.steps": 3,
    "train.steps_per_loop": 3,
    "optimizer.name": "sgd",
  }
  two, r2 = run(mirrored_config(**overrides), str(tmp_path / "two"), PlainTrainer)
  one, r1 = run(
    tiny_config(**{"train.steps": 3, "train.steps_per_loop": 3, "optimizer.name": "sgd"}),
    str(tmp_path / "one"),
    CleanedTrainer,
  )
  (inc,) = r2.incidents
  assert (inc["kind"], inc["action"], inc["count"]) == ("nonfinite_inputs", "dropped_rows", 3)
  # Two rows per step, three steps: only replica 1's shard was poisoned.
  assert "x[:, 0] (6 rows)" in inc["diagnosis"] and "6 rows dropped" in inc["diagnosis"]
  assert r2.step == 3 and r2.skipped_steps == 0
  # The mean over the 14 kept rows, not the mean of two shard means (8 and 6 rows).
  np.testing.assert_allclose(r2.loss, r1.loss, rtol=1e-5)
  assert_same_weights(one, two)
  assert_replicas_agree(two)


class ShortBatchTrainer(TinyTrainer):
  """17 rows in batches of 16, repeated: every other batch has one row, so
  replica 1's shard of it is empty."""

  def build_train_dataset(self):
    x, y = regression_data(n=17)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


@pytest.mark.parametrize("check_inputs", [True, False])
def test_short_batches_and_unchecked_inputs_give_the_global_mean(check_inputs, tmp_path):
  overrides = {"guard.check_inputs": check_inputs, "optimizer.name": "sgd", "train.steps": 6}
  c = mirrored_config(**overrides, **{"train.steps_per_loop": 6})
  two, r2 = run(c, str(tmp_path / "two"), ShortBatchTrainer)
  c = tiny_config(**overrides, **{"train.steps_per_loop": 6})
  one, r1 = run(c, str(tmp_path / "one"), ShortBatchTrainer)
  # No NaN from the empty shard, and each replica's mean weighed by its rows
  # (unweighted, the summed loss would be twice the mean).
  assert r2.skipped_steps == 0 and r2.incidents == []
  np.testing.assert_allclose(r2.loss, r1.loss, rtol=1e-5)
  assert_same_weights(one, two)
  assert_replicas_agree(two)


class BatchNormTrainer(ShortBatchTrainer):
  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((4,)),
        keras.layers.Dense(8),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(1),
      ]
    )


def test_batchnorm_statistics_are_averaged_over_replicas(tmp_path):
  c = mirrored_config(**{"train.steps": 3, "train.steps_per_loop": 3})
  t, r = run(c, str(tmp_path / "run"), BatchNormTrainer)
  assert r.step == 3 and r.skipped_steps == 0
  mean = next(v for v in t.model.variables if "moving_mean" in v.path)
  assert np.any(mean.numpy() != 0)
  # Each replica saw a different shard (step 2: one row and none); without
  # averaging their statistics would differ, and the empty one's be NaN.
  assert_replicas_agree(t)
  assert all_finite(t)


def test_fp16_overflow_on_one_replica_lowers_the_scale_on_every_replica(tmp_path):
  drill = {
    "precision.policy": "mixed_float16",
    "drill.grad_steps": "2-3",
    "drill.value": "inf",
    "train.steps": 5,
  }
  two, r2 = run(mirrored_config(**drill, **{"drill.replica": 1}), str(tmp_path / "two"))
  one, r1 = run(tiny_config(**drill), str(tmp_path / "one"))
  # Two overflows (hysteresis 2) halve the scale once: routine, no incident.
  assert r2.skipped_steps == r1.skipped_steps == 2 and r2.incidents == r1.incidents == []
  assert r2.loss_scale == r1.loss_scale == 2.0**14
  scales = [
    float(x) for x in two.strategy.experimental_local_results(two.state["loss_scale"].scale)
  ]
  assert scales == [2.0**14, 2.0**14]
  assert_replicas_agree(two)
  for a, b in zip(weights(one), weights(two)):
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)


def test_xla_under_mirrored_runs_the_run_without_xla(tmp_path):
  """Several replicas build every rare path at once (a shard's rows are not
  the batch's): no lean loop, XLA compiles compute_loss and its gradient on
  each replica, and the run's decisions and weights are those without XLA."""
  drills = {"drill.loss_steps": "3", "drill.grad_steps": "5", "drill.replica": 1}
  plain, r_plain = run(mirrored_config(**drills), str(tmp_path / "plain"))
  xla, r_xla = run(mirrored_config(**drills, **{"train.jit_compile": True}), str(tmp_path / "xla"))
  loop = xla.parts.compiled.loop
  assert not loop.lean and not loop.jit_step and not plain.parts.compiled.loop.lean
  graph = loop.function._list_all_concrete_functions()[0].graph.as_graph_def()
  marked = [n for f in graph.library.function for n in f.node_def if n.attr["_XlaMustCompile"].b]
  assert len(marked) >= 1
  assert kinds(r_xla) == kinds(r_plain) and r_xla.incidents
  assert (r_xla.step, r_xla.skipped_steps) == (r_plain.step, r_plain.skipped_steps)
  assert_replicas_agree(xla)
  assert_same_weights(plain, xla)
