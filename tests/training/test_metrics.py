"""Stateful Keras metrics (`Trainer.build_metrics()`): exact against Keras,
good steps only, reset per inner loop and per evaluation, on one device and
on two replicas."""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import tiny_config

import safetrain


def classification_data(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  logits = x @ np.array([[1.0], [-2.0], [0.5], [0.0]], np.float32)
  y = (logits + rng.normal(size=(n, 1)) > 0).astype(np.float32)
  return x, y


class RowCount(keras.metrics.Metric):
  """How many labelled rows the metric was updated with."""

  def __init__(self, name="rows", **kwargs):
    super().__init__(name=name, **kwargs)
    self.rows = self.add_variable(shape=(), initializer="zeros", name="rows")

  def update_state(self, y_true, y_pred, sample_weight=None):
    self.rows.assign_add(tf.cast(tf.shape(y_true)[0], self.rows.dtype))

  def result(self):
    return self.rows


class AucTrainer(safetrain.Trainer):
  """A binary classifier with AUC and a row counter; 100 eval rows in
  batches of 16 (a short last batch)."""

  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(1, activation="sigmoid"),
      ]
    )

  def build_train_dataset(self):
    x, y = classification_data(256, seed=0)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(256, seed=1)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)

  def build_eval_dataset(self):
    return tf.data.Dataset.from_tensor_slices(classification_data(100, seed=5)).batch(16)

  def build_metrics(self):
    return {"auc": keras.metrics.AUC(), "rows": RowCount()}


def auc_config(**overrides):
  return tiny_config(**{"loss": "binary_crossentropy", "train.steps": 10, **overrides})


def records(workdir):
  with open(f"{workdir}/metrics.jsonl") as f:
    return [json.loads(line) for line in f if "final_eval" not in line]


def keras_reference_auc(model):
  """AUC as Keras computes it on the same eval set and predictions."""
  x, y = classification_data(100, seed=5)
  model.compile(loss="binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
  return model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)["auc"]


def test_eval_auc_equals_keras_evaluate_and_resets_each_evaluation(tmp_path):
  trainer = AucTrainer(auc_config(), str(tmp_path))
  result = trainer.fit()
  first = trainer.evaluate()
  # A second evaluation starts from zero: the same numbers, not accumulated.
  second = trainer.evaluate()
  assert first == second == result.eval_metrics
  assert first["rows"] == 100 and first["examples"] == 100
  assert 0.5 < first["auc"] < 1.0
  assert abs(first["auc"] - keras_reference_auc(trainer.model)) < 1e-4


def test_eval_auc_on_two_replicas_equals_keras_on_the_same_predictions(tmp_path):
  config = auc_config(**{"distribute.strategy": "mirrored", "distribute.cpu_replicas": 2})
  trainer = AucTrainer(config, str(tmp_path))
  result = trainer.fit()
  assert trainer.strategy.num_replicas_in_sync == 2
  # Summed over the replicas: the global batch, a last shard of 2 rows too.
  assert result.eval_metrics["rows"] == 100
  x, y = classification_data(100, seed=5)
  reference = keras.metrics.AUC()
  reference.update_state(y, trainer.model.predict(x, batch_size=16, verbose=0))
  assert abs(result.eval_metrics["auc"] - float(reference.result())) < 1e-4
  # Training metrics count the global batch of every good step, per loop.
  assert [r["rows"] for r in records(tmp_path)] == [80, 80]


def test_a_skipped_step_changes_no_metric_state_and_train_metrics_reset_per_loop(tmp_path):
  # Attempt 3 has a NaN loss: skipped; the loop still applies its 5 updates.
  config = auc_config(**{"drill.loss_steps": "3"})
  trainer = AucTrainer(config, str(tmp_path))
  result = trainer.fit()
  # (The next batch trained: a bad batch, quarantined.)
  assert [(i["step"], i["kind"], i["action"]) for i in result.incidents] == [
    (3, "nonfinite_loss", "quarantined_batch")
  ]
  loops = records(tmp_path)
  assert [(r["step"], r["good"], r["divergence"]) for r in loops] == [(5, 5, 1), (10, 5, 0)]
  # 5 good steps of 16 rows each loop: the skipped one added nothing, and
  # the second loop did not start from the first one's count.
  assert [r["rows"] for r in loops] == [80, 80]
  assert all(0.0 <= r["auc"] <= 1.0 for r in loops)
  metrics = trainer.parts.train_metrics.metrics
  assert float(metrics["rows"].result()) == 80


class OrderedAucTrainer(AucTrainer):
  def build_train_dataset(self):
    ds = tf.data.Dataset.from_tensor_slices(classification_data(256, seed=0))
    return ds.batch(self.config.train.batch_size, drop_remainder=True)


def test_metrics_see_the_rows_the_input_guard_kept_and_start_from_zero_after_a_rollback(
  tmp_path,
):
  # Attempt 2 has one NaN row (dropped, the step still trains on 15 rows);
  # attempts 13-15 have NaN losses: the third rolls back to step 10.
  config = auc_config(**{"train.steps": 20, "drill.input_steps": "2", "drill.loss_steps": "13-15"})
  result = AucTrainer(config, str(tmp_path)).fit()
  assert result.rollbacks == 1 and result.step == 20
  loops = records(tmp_path)
  assert [(r["step"], r["good"], bool(r.get("rollback"))) for r in loops] == [
    (5, 5, False),
    (10, 5, False),
    (10, 2, True),
    (15, 5, False),
    (20, 5, False),
  ]
  # 79 = 4 x 16 + 15; the undone loop counted its 2 good steps; the loops
  # after the rollback start from zero.
  assert [r["rows"] for r in loops] == [79, 80, 32, 80, 80]


def test_train_auc_is_the_auc_of_the_loops_good_steps(tmp_path):
  """With one step per loop and SGD at a negligible rate, the loop's AUC is Keras's AUC
  of the model on exactly that batch."""
  config = auc_config(
    **{
      "train.steps": 3,
      "train.steps_per_loop": 1,
      "optimizer.name": "sgd",
      "optimizer.learning_rate": 1e-9,
    }
  )
  trainer = OrderedAucTrainer(config, str(tmp_path))
  trainer.fit()
  batches = list(trainer.build_train_dataset().take(3))
  for record, (x, y) in zip(records(tmp_path), batches):
    reference = keras.metrics.AUC()
    reference.update_state(y, trainer.model(x, training=False))
    assert abs(record["auc"] - float(reference.result())) < 1e-4


class NoPredTrainer(AucTrainer):
  def compute_loss(self, model, batch, training):
    x, y = batch
    return tf.reduce_mean(keras.losses.binary_crossentropy(y, model(x, training=training)))


class SharedMetricTrainer(AucTrainer):
  auc = None

  def build_metrics(self):
    SharedMetricTrainer.auc = SharedMetricTrainer.auc or keras.metrics.AUC()
    return {"auc": SharedMetricTrainer.auc}


class VectorMetric(RowCount):
  def result(self):
    return tf.zeros([2])


class VectorMetricTrainer(AucTrainer):
  def build_metrics(self):
    return {"pair": VectorMetric()}


class ClashingNameTrainer(AucTrainer):
  def build_metrics(self):
    return {"grad_norm": keras.metrics.AUC()}


class NotAMetricTrainer(AucTrainer):
  def build_metrics(self):
    return {"auc": lambda y, p: 0.0}


@pytest.mark.parametrize(
  "cls, message",
  [
    (NoPredTrainer, "compute_loss must return (loss, metrics, y_pred)"),
    (SharedMetricTrainer, "must return new metrics"),
    (VectorMetricTrainer, "'pair' (VectorMetric) has a non-scalar result"),
    (ClashingNameTrainer, "name 'grad_norm' is already a record field"),
    (NotAMetricTrainer, "must return a dict {name: keras.metrics.Metric}"),
  ],
)
def test_build_metrics_mistakes_are_config_errors_at_build(cls, message, tmp_path):
  with pytest.raises(safetrain.ConfigError, match=re.escape(message)):
    cls(auc_config(), str(tmp_path)).build()
