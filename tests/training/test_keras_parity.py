"""Where safetrain promises Keras's own semantics, it is compared with Keras.

Regularization losses join the loss exactly as in `model.fit`, and evaluation
is the mean over examples, as `model.evaluate` reports it.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import tiny_config

import safetrain

STEPS, BATCH = 12, 16


class AddLoss(keras.layers.Layer):
  """An `add_loss` term: a penalty on the mean activation."""

  def call(self, x):
    self.add_loss(0.1 * tf.reduce_mean(tf.square(x)))
    return x


def _model(regularized: bool):
  reg = dict(
    kernel_regularizer=keras.regularizers.L2(0.05),
    bias_regularizer=keras.regularizers.L1(0.01),
    activity_regularizer=keras.regularizers.L2(0.01),
  )
  layers = [
    keras.Input((4,)),
    keras.layers.Dense(8, activation="tanh", **(reg if regularized else {})),
  ]
  if regularized:
    layers.append(AddLoss())
  layers.append(
    keras.layers.Dense(
      1, **({"kernel_regularizer": reg["kernel_regularizer"]} if regularized else {})
    )
  )
  model = keras.Sequential(layers)
  rng = np.random.default_rng(3)  # the same initial weights for every copy
  model.set_weights([rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in model.weights])
  return model


def _data(n=STEPS * BATCH, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (x @ rng.normal(size=(4, 1)) + 0.5).astype(np.float32)
  return x, y


class RegTrainer(safetrain.Trainer):
  regularized = True

  def build_model(self):
    return _model(self.regularized)

  def build_train_dataset(self):
    return tf.data.Dataset.from_tensor_slices(_data()).batch(BATCH)


def _config(**overrides):
  return tiny_config(
    **{
      "train.steps": STEPS,
      "train.steps_per_loop": 4,
      "train.batch_size": BATCH,
      "optimizer.name": "sgd",
      "optimizer.learning_rate": 0.1,
      "clip.global_norm": 0.0,
      **overrides,
    }
  )


def _keras_fit(regularized: bool):
  model = _model(regularized)
  model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
  x, y = _data()
  model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
  return model


@pytest.mark.parametrize("regularized", [True, False])
def test_regularization_losses_train_the_same_weights_as_keras_fit(regularized, tmp_path):
  trainer = type("T", (RegTrainer,), {"regularized": regularized})(_config(), str(tmp_path))
  result = trainer.fit()
  assert result.step == STEPS and not result.incidents
  reference = _keras_fit(regularized)
  for ours, theirs in zip(trainer.model.get_weights(), reference.get_weights()):
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6)
  if regularized:  # the regularizers shrink the first kernel: they were not ignored
    plain = _keras_fit(False).get_weights()[0]
    assert np.sum(trainer.model.get_weights()[0] ** 2) < 0.9 * np.sum(plain**2)


class PoisonedRegularizer(keras.regularizers.Regularizer):
  """A regularization term that is NaN while `poison` is set."""

  def __init__(self, poison):
    self.poison = poison

  def __call__(self, w):
    return 0.01 * tf.reduce_sum(tf.square(w)) + self.poison


def test_a_non_finite_regularization_term_is_a_non_finite_loss(tmp_path):
  poison = tf.Variable(float("nan"), trainable=False)

  class T(RegTrainer):
    def build_model(self):
      return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(1, kernel_regularizer=PoisonedRegularizer(poison))]
      )

  config = _config(**{"train.steps": 4, "recovery.enabled": False, "guard.rollback_after": 2})
  trainer = T(config, str(tmp_path))
  with pytest.raises(safetrain.DivergenceError):
    trainer.fit()
  kinds = {
    (i["kind"], i["action"]) for i in safetrain.read_jsonl(str(tmp_path / "incidents.jsonl"))
  }
  assert ("nonfinite_loss", "skipped_step") in kinds and ("nonfinite_loss", "abort") in kinds
  assert all(np.all(np.isfinite(w)) for w in trainer.model.get_weights())


# ------------------------------------------------------------- evaluation


class EvalTrainer(RegTrainer):
  regularized = False

  def build_eval_dataset(self):
    # 70 rows in batches of 32, 32 and 6: the short last batch must count by
    # its 6 rows, not as much as a full one.
    return tf.data.Dataset.from_tensor_slices(_data(70, seed=1)).batch(32)

  def compute_loss(self, model, batch, training):
    loss = super().compute_loss(model, batch, training)
    x, y = batch
    mae = tf.reduce_mean(tf.abs(model(x, training=training) - y))
    return loss, {"mae": mae}


def test_evaluate_is_the_mean_over_examples_like_keras_evaluate(tmp_path):
  trainer = EvalTrainer(_config(), str(tmp_path))
  result = trainer.fit()
  model = _model(False)
  model.set_weights(trainer.model.get_weights())
  model.compile(loss="mse", metrics=["mae"])
  loss, mae = model.evaluate(*_data(70, seed=1), batch_size=32, verbose=0)
  ev = trainer.evaluate()
  assert ev["examples"] == 70 and result.eval_metrics["examples"] == 70
  np.testing.assert_allclose([ev["loss"], ev["mae"]], [loss, mae], rtol=1e-5)
  # The per-batch average the old code reported is measurably different here.
  x, y = _data(70, seed=1)
  per_batch = np.mean(
    [model.evaluate(x[i : i + 32], y[i : i + 32], verbose=0)[0] for i in (0, 32, 64)]
  )
  assert abs(per_batch - loss) > 1e-3
  assert "eval on 70 examples: loss" in trainer.summary_line(result)


def test_eval_steps_limits_the_batches(tmp_path):
  trainer = EvalTrainer(_config(**{"eval.steps": 1}), str(tmp_path))
  trainer.fit()
  assert trainer.evaluate()["examples"] == 32


def test_evaluate_without_fit_restores_the_trained_model(tmp_path):
  workdir = str(tmp_path / "run")
  trained = EvalTrainer(_config(), workdir)
  trained.fit()
  expected = trained.evaluate()
  fresh = EvalTrainer(_config(), workdir)
  assert fresh.evaluate() == expected
  for a, b in zip(fresh.model.get_weights(), trained.model.get_weights()):
    np.testing.assert_array_equal(a, b)


def test_evaluate_without_a_checkpoint_fails_clearly(tmp_path):
  workdir = str(tmp_path / "empty")
  with pytest.raises(safetrain.WorkdirError, match="no healthy checkpoint"):
    EvalTrainer(_config(), workdir).evaluate()
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
