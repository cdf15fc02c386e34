"""Evaluation is guarded like training: NaN rows of the eval set are left
out under guard.bad_inputs and counted (the summary says how many), and a
non-finite eval metric is a warning naming it."""

import os

import numpy as np
import pytest
import tensorflow as tf
from common import TinyTrainer, regression_data, tiny_config

import safetrain


class NanEvalTrainer(TinyTrainer):
  """64 eval rows, 3 with a NaN feature."""

  def build_eval_dataset(self):
    x, y = regression_data(64, seed=3)
    x[[5, 17, 40], 1] = np.nan
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


def _clean_eval():
  x, y = regression_data(64, seed=3)
  keep = np.ones(64, bool)
  keep[[5, 17, 40]] = False
  return x[keep], y[keep]


def test_nan_eval_rows_are_dropped_and_counted(tmp_path):
  trainer = NanEvalTrainer(tiny_config(**{"train.steps": 10}), str(tmp_path))
  r = trainer.fit()
  ev = r.eval_metrics
  assert ev["examples"] == 61 and ev["dropped_rows"] == 3 and np.isfinite(ev["loss"])
  x, y = _clean_eval()
  expected = float(np.mean(np.square(trainer.model(x).numpy() - y)))
  assert ev["loss"] == pytest.approx(expected, rel=1e-5)
  assert "eval on 61 examples (3 rows with NaN or Inf left out): loss" in trainer.summary_line(r)


def test_nan_eval_rows_under_skip_batch_leave_out_their_batches(tmp_path):
  c = tiny_config(**{"train.steps": 10, "guard.bad_inputs": "skip_batch"})
  ev = NanEvalTrainer(c, str(tmp_path)).fit().eval_metrics
  assert ev["examples"] == 16 and ev["dropped_rows"] == 48  # batches 0, 1 and 2 hold one each


def test_nan_eval_rows_under_raise_are_a_bad_input_error(tmp_path):
  c = tiny_config(**{"train.steps": 10, "guard.bad_inputs": "raise"})
  with pytest.raises(safetrain.BadInputError, match="the eval dataset has 3 rows with NaN"):
    NanEvalTrainer(c, str(tmp_path)).fit()


class LogEvalTrainer(TinyTrainer):
  """A metric that is -inf on the eval set: log of a zero."""

  def compute_loss(self, model, batch, training):
    x, y = batch
    loss = tf.reduce_mean(tf.square(model(x, training=training) - y))
    # Finite in training, -inf in evaluation.
    return loss, {"log_zero": tf.constant(0.0) if training else tf.math.log(0.0)}

  def build_eval_dataset(self):
    x, y = regression_data(32, seed=4)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


def test_a_non_finite_eval_metric_is_a_warning_naming_it(tmp_path, caplog):
  r = LogEvalTrainer(tiny_config(**{"train.steps": 10}), str(tmp_path)).fit()
  assert r.eval_metrics["log_zero"] == -np.inf
  warned = [m for m in caplog.messages if m.startswith("evaluation: log_zero is -inf")]
  assert warned, caplog.messages
  assert os.path.exists(os.path.join(tmp_path, "export", "model.keras"))
