"""Recovery by cause: bad examples are dropped, bad batches quarantined (no
rollback, no learning-rate cut, no budget spent), diverging states rolled back."""

import os

import keras
import numpy as np
import tensorflow as tf
from common import TinyTrainer, all_finite, regression_data, tiny_config

import safetrain


def read(workdir, name):
  path = os.path.join(workdir, name)
  return safetrain.read_jsonl(path) if os.path.exists(path) else []


def test_nan_examples_are_dropped_from_the_mean_and_the_rest_trains(tmp_path):
  # Attempts 3 and 4: the loss of rows 0 and 1 of the batch is NaN.
  c = tiny_config(**{"train.steps": 10, "drill.loss_steps": "3-4", "drill.loss_rows": 2})
  t = TinyTrainer(c, str(tmp_path))
  r = t.fit()
  assert r.step == 10 and r.attempts == 10 and r.skipped_steps == 0
  assert r.examples_dropped == 4 and r.rollbacks == 0 and r.lr_scale == 1.0
  assert r.quarantined == 0
  [inc] = r.incidents
  assert (inc["kind"], inc["action"], inc["step"], inc["last_step"]) == (
    "nonfinite_loss",
    "dropped_examples",
    3,
    4,
  )
  assert inc["examples"] == 4 and inc["cause"] == "bad_batch"
  q = read(tmp_path, "quarantine.jsonl")
  assert [(e["step"], e["position"], e["action"], e["rows"], e["bad_examples"]) for e in q] == [
    (3, 2, "dropped_examples", [0, 1], 2),
    (4, 3, "dropped_examples", [0, 1], 2),
  ]
  assert all_finite(t)


def test_nan_examples_beyond_the_limit_lose_the_whole_step(tmp_path):
  # 8 of 16 rows is more than guard.max_dropped_examples (0.25): not a few
  # bad examples, the step is skipped (and, the next batch training, quarantined).
  c = tiny_config(**{"train.steps": 10, "drill.loss_steps": "3", "drill.loss_rows": 8})
  r = TinyTrainer(c, str(tmp_path)).fit()
  assert r.examples_dropped == 0 and r.skipped_steps == 1 and r.quarantined == 1
  assert [(i["action"], i["step"]) for i in r.incidents] == [("quarantined_batch", 3)]


def test_nan_batches_are_quarantined_with_no_lr_cut_and_no_budget_spent(tmp_path):
  c = tiny_config(**{"train.steps": 12, "drill.loss_steps": "4,9"})
  t = TinyTrainer(c, str(tmp_path))
  r = t.fit()
  assert r.step == 12 and r.attempts == 14 and r.skipped_steps == 2
  assert r.quarantined == 2 and r.rollbacks == 0 and r.lr_scale == 1.0
  assert int(t.state["recovery"].rollbacks_used.numpy()) == 0
  # One record per inner loop; attempt 9 is update 8 (one step was skipped).
  assert [(i["kind"], i["action"], i["step"], i["cause"]) for i in r.incidents] == [
    ("nonfinite_loss", "quarantined_batch", 4, "bad_batch"),
    ("nonfinite_loss", "quarantined_batch", 8, "bad_batch"),
  ]
  q = read(tmp_path, "quarantine.jsonl")
  # Attempt 4 is the 4th batch (position 3); attempt 9 the 9th (position 8).
  assert [(e["attempt"], e["position"], e["action"]) for e in q] == [
    (4, 3, "quarantined_batch"),
    (9, 8, "quarantined_batch"),
  ]


class MarkedRowsTrainer(TinyTrainer):
  """Rows whose first feature is 100 make a scalar loss NaN (their own term
  is log(0)): a loss bound to the data, not to the state."""

  BAD_BATCHES = (4, 5, 6)  # three in a row: guard.rollback_after

  def build_train_dataset(self):
    x, y = regression_data()
    for b in self.BAD_BATCHES:
      x[16 * b + 3, 0] = 100.0
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)

  def compute_loss(self, model, batch, training):
    x, y = batch
    pred = model(x, training=training)
    marked = tf.cast(x[:, :1] > 50.0, tf.float32)
    # A scalar loss: no per-example masking is possible.
    return tf.reduce_mean(tf.square(pred - y) + tf.math.log(1.0 - marked)), {}


def test_a_run_of_data_bound_bad_batches_is_triaged_as_bad_batches(tmp_path):
  # The quarantine itself (test_scalar_rows.py has the remedy that follows it).
  c = tiny_config(**{"train.steps": 12, "recovery.scalar_rows": False})
  t = MarkedRowsTrainer(c, str(tmp_path))
  r = t.fit()
  # Three bad batches in a row stop the loop; the row probe finds row 3 bad
  # and the others fine: bad data, quarantined; no rollback, no lr cut.
  assert r.step == 12 and r.rollbacks == 0 and r.lr_scale == 1.0
  assert r.quarantined == 3 and r.skipped_steps == 3
  actions = [(i["action"], i["cause"]) for i in r.incidents]
  assert set(actions) == {("quarantined_batch", "bad_batch")}
  q = read(tmp_path, "quarantine.jsonl")
  assert sorted(e["position"] for e in q) == [4, 5, 6]
  assert [3] in [e["rows"] for e in q]  # the probed batch names its row
  assert all_finite(t)


def test_frequent_bad_batches_become_a_diverging_state(tmp_path):
  c = tiny_config(
    **{
      "train.steps": 20,
      "drill.loss_steps": "2,4,6,8",
      "recovery.bad_batch_rate": 0.2,
      "recovery.bad_batch_window": 10,
    }
  )
  r = TinyTrainer(c, str(tmp_path)).fit()
  [rollback] = [i for i in r.incidents if i["action"] == "rollback"]
  assert rollback["cause"] == "diverging_state" and "frequent" in rollback["why"]
  assert r.rollbacks == 1 and r.lr_scale == 0.5 and r.step == 20


def test_a_diverging_state_still_rolls_back_and_backs_off(tmp_path):
  # Three NaN attempts in a row whose replay is finite (the drill): not bound
  # to the batch, so a diverging state.
  c = tiny_config(**{"train.steps": 20, "drill.loss_steps": "12-14"})
  r = TinyTrainer(c, str(tmp_path)).fit()
  [rollback] = [i for i in r.incidents if i["action"] == "rollback"]
  assert rollback["cause"] == "diverging_state"
  assert r.rollbacks == 1 and r.lr_scale == 0.5 and r.quarantined == 0 and r.step == 20


def sequence_sums(n=512, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 1.0, size=(n, 10, 1)).astype(np.float32)
  return x, x.sum(axis=1)


class LstmTrainer(safetrain.Trainer):
  """An LSTM reading 10 values in [0, 1] and predicting their total."""

  def build_model(self):
    return keras.Sequential([keras.Input((10, 1)), keras.layers.LSTM(16), keras.layers.Dense(1)])

  def build_train_dataset(self):
    ds = tf.data.Dataset.from_tensor_slices(sequence_sums()).shuffle(512, seed=1)
    return ds.batch(16, drop_remainder=True)


def lstm_config(**overrides):
  # SGD at 1.0, no clipping, frequent checkpoints and a short retention: the
  # run that saved blown-up states as healthy and lost its good checkpoint.
  return tiny_config(
    **{
      "train.steps": 40,
      "checkpoint.every_steps": 10,
      "checkpoint.max_to_keep": 2,
      "optimizer.name": "sgd",
      "optimizer.learning_rate": 1.0,
      "clip.global_norm": 0.0,
      **overrides,
    }
  )


def test_a_finite_blow_up_is_loss_growth_and_rolls_back_to_the_good_state(tmp_path):
  t = LstmTrainer(lstm_config(), str(tmp_path))
  r = t.fit()
  # The loss grows ~100x a step from step 2 on: caught before any save, long
  # before it turns non-finite, and rolled back to the initial state.
  assert r.step == 40 and r.rollbacks == 1 and r.lr_scale == 0.5
  [rollback] = [i for i in r.incidents if i["action"] == "rollback"]
  assert rollback["kind"] == "loss_growth" and rollback["restored_step"] == 0
  assert rollback["step"] <= 5
  # The diagnosis says what the replay shows: a finite loss orders of
  # magnitude above the best, not a fault that "did not reproduce".
  assert "finite but" in rollback["diagnosis"] and "blowing up" in rollback["diagnosis"]
  assert "did not reproduce" not in rollback["diagnosis"]
  metrics = safetrain.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  first = metrics[0]["loss"]
  # No blown-up state was ever applied or saved: every loop's loss stays
  # within the growth factor of the first one, and the run ends trained.
  assert all(np.isfinite(m["loss"]) and m["loss"] < 1000 * first for m in metrics)
  assert r.loss < 2.0  # predicting the mean total scores 10/12
  assert all_finite(t)


def test_without_the_growth_check_the_same_run_climbs_unseen(tmp_path):
  # The control: the hole the check closes (only finite values, so the guard
  # alone saw nothing while the loss climbed by orders of magnitude).
  r = LstmTrainer(lstm_config(**{"guard.growth_factor": 0.0}), str(tmp_path)).fit()
  metrics = safetrain.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert max(m["loss"] for m in metrics) > 1e6 * metrics[0]["loss"]
  assert not any(i["kind"] == "loss_growth" for i in r.incidents)


class PerExampleTrainer(MarkedRowsTrainer):
  """The same marked rows, but compute_loss returns per-example losses: it
  opts in to masking, so only the marked rows are dropped."""

  def compute_loss(self, model, batch, training):
    x, y = batch
    pred = model(x, training=training)
    marked = tf.cast(x[:, :1] > 50.0, tf.float32)
    return tf.reduce_mean(tf.square(pred - y) + tf.math.log(1.0 - marked), axis=-1), {}


def test_a_custom_compute_loss_returning_per_example_losses_drops_only_those_rows(tmp_path):
  r = PerExampleTrainer(tiny_config(**{"train.steps": 12}), str(tmp_path)).fit()
  assert r.step == 12 and r.attempts == 12 and r.skipped_steps == 0
  assert r.examples_dropped == 3 and r.quarantined == 0 and r.rollbacks == 0
  q = read(tmp_path, "quarantine.jsonl")
  assert [(e["position"], e["rows"]) for e in q] == [(4, [3]), (5, [3]), (6, [3])]


def test_snapshots_over_their_memory_cap_are_off_and_rollbacks_go_to_disk(tmp_path):
  c = tiny_config(
    **{"train.steps": 20, "drill.loss_steps": "12-14", "recovery.snapshots_max_mb": 1e-4}
  )
  t = TinyTrainer(c, str(tmp_path))
  r = t.fit()
  ring = t.parts.keeper.snapshots
  assert not ring.enabled and ring.bytes_per_slot > 1e-4 * 2**20
  [rollback] = [i for i in r.incidents if i["action"] == "rollback"]
  assert rollback["restored_step"] == 10 and rollback["checkpoint"].endswith("ckpt-10")


def test_snapshots_make_the_rollback_go_back_one_loop(tmp_path):
  c = tiny_config(**{"train.steps": 20, "drill.loss_steps": "12-14"})
  r = TinyTrainer(c, str(tmp_path)).fit()
  [rollback] = [i for i in r.incidents if i["action"] == "rollback"]
  # The state of step 10 comes from memory (a snapshot is preferred to the
  # checkpoint of the same step: no read).
  assert rollback["restored_step"] == 10
  assert rollback["checkpoint"] == "memory snapshot of step 10"


def test_a_state_whose_loss_is_far_above_its_best_is_not_saved_as_healthy(tmp_path):
  t = TinyTrainer(tiny_config(**{"train.steps": 10}), str(tmp_path))
  t.fit()
  ckpt = os.path.join(tmp_path, "checkpoints", "ckpt-11.index")
  best = float(t.state["spike"].best.numpy())
  t.state["run"].step.assign(11)
  t.state["spike"].mean.assign(100 * best)  # finite, but 100x its best (guard.stall_factor 3)
  t.parts.keeper.save()
  assert not os.path.exists(ckpt)
  t.state["spike"].mean.assign(best)
  t.parts.keeper.save()
  assert os.path.exists(ckpt)
