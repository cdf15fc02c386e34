"""The precision remedy (issue 21, item 3): under mixed_float16 a layer whose
float16 output overflows computes in float32, once an eager replay of the
failing batch shows that makes the step finite; no rollback, no rate cut. A
switch that would not help is never kept."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import tiny_config

import safetrain


def incidents(workdir):
  path = os.path.join(workdir, "incidents.jsonl")
  return safetrain.read_jsonl(path) if os.path.exists(path) else []


@keras.saving.register_keras_serializable("safetrain_tests")
class LogSumExpPool(keras.layers.Layer):
  """A hand-written log-sum-exp over the features: exp overflows float16
  (above 11.1) long before the log would bring it back."""

  def call(self, x):
    return tf.math.log(tf.reduce_sum(tf.exp(x), axis=-1, keepdims=True))


class LogSumExpTrainer(safetrain.Trainer):
  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((8,)),
        keras.layers.Dense(
          16, name="scores", kernel_initializer=keras.initializers.RandomNormal(4.0, 1.0, seed=1)
        ),
        LogSumExpPool(name="lse"),
        keras.layers.Dense(1, dtype="float32", name="head"),
      ]
    )

  def build_train_dataset(self):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, size=(512, 8)).astype(np.float32)
    y = x.sum(axis=1, keepdims=True).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
    return ds.batch(self.config.train.batch_size, drop_remainder=True)


class ShiftedScaleTrainer(safetrain.Trainer):
  """The first 12 batches are standardized; from then on the features
  arrive raw, around 1e4 (a pipeline change mid-run): float16 holds them,
  but the projection's float16 output (about 8e4) overflows on every row."""

  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((16,)),
        keras.layers.Dense(
          32,
          name="projection",
          kernel_initializer=keras.initializers.RandomUniform(0.4, 0.6, seed=1),
        ),
        keras.layers.LayerNormalization(name="norm"),
        keras.layers.Dense(1, dtype="float32", name="head"),
      ]
    )

  def build_train_dataset(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 16)).astype(np.float32)
    y = np.tanh(x[:, :1]).astype(np.float32)
    raw = np.arange(4096)[:, None] >= 12 * 16
    features = np.where(raw, 1e4 * (1.0 + 0.1 * np.abs(x)), x).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((features, y))
    return ds.batch(self.config.train.batch_size, drop_remainder=True)


class OverflowsEverywhere(ShiftedScaleTrainer):
  """A projection whose weights are 1e38: its output overflows float16 from
  finite inputs, and float32 too, so computing it in float32 does not make
  the step finite and is not kept."""

  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((16,)),
        keras.layers.Dense(
          32, name="projection", kernel_initializer=keras.initializers.Constant(1e38)
        ),
        keras.layers.Dense(1, dtype="float32", name="head"),
      ]
    )


def config(trainer, **overrides):
  return tiny_config(
    **{
      "trainer": trainer,
      "loss": "mse",
      "precision.policy": "mixed_float16",
      "train.steps": 40,
      "train.steps_per_loop": 10,
      **overrides,
    }
  )


def test_a_hand_written_log_sum_exp_is_moved_to_float32_before_step_one(workdir):
  t = LogSumExpTrainer(config("LogSumExpTrainer"), workdir)
  result = t.fit()
  [incident] = result.incidents
  assert (incident["step"], incident["kind"], incident["action"], incident["cause"]) == (
    0,
    "float16_overflow",
    "float32_layers",
    "precision",
  )
  assert incident["layers"] == ["lse"]
  assert t.model.get_layer("lse").compute_dtype == "float32"
  assert t.model.get_layer("scores").compute_dtype == "float16"  # its output was finite
  assert result.step == 40 and result.rollbacks == 0 and result.lr_scale == 1.0
  assert np.isfinite(result.loss)


def test_an_overflow_that_starts_mid_run_is_remedied_without_a_rollback(workdir):
  t = ShiftedScaleTrainer(config("ShiftedScaleTrainer"), workdir)
  result = t.fit()
  decided = [r for r in incidents(workdir) if r["action"] in ("float32_layers", "rollback")]
  # The first 12 batches train in float16 (the first two are the loss
  # scale's routine overflows: 10 updates); the raw ones fail from the same
  # state (guard.rollback_after 3 in a row, every row), the replay of the
  # last one is finite with projection in float32: kept, and no rollback.
  assert [(r["step"], r["action"], r["layers"]) for r in decided] == [
    (11, "float32_layers", ["projection"])
  ]
  assert t.model.get_layer("projection").compute_dtype == "float32"
  assert result.step == 40 and result.rollbacks == 0 and result.lr_scale == 1.0
  # The loss scale had halved for an overflow no scale could fix: reset.
  assert result.loss_scale >= 2.0**14
  assert np.isfinite(result.loss)


def test_a_switch_that_does_not_make_the_step_finite_is_not_kept(workdir):
  c = config("OverflowsEverywhere", **{"recovery.max_rollbacks": 1})
  t = OverflowsEverywhere(c, workdir)
  with pytest.raises(safetrain.DivergenceError):
    t.fit()
  assert not [r for r in incidents(workdir) if r["action"] == "float32_layers"]
  assert t.model.get_layer("projection").compute_dtype == "float16"


def test_the_fallback_can_be_turned_off(workdir):
  c = config(
    "LogSumExpTrainer", **{"recovery.float32_fallback": False, "recovery.max_rollbacks": 1}
  )
  t = LogSumExpTrainer(c, workdir)
  with pytest.raises(safetrain.DivergenceError):
    t.fit()
  assert t.model.get_layer("lse").compute_dtype == "float16"
  assert not [r for r in incidents(workdir) if r["kind"] == "float16_overflow"]
