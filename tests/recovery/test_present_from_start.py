"""A failure present from the initial weights stops at once (issue 21, item
4): the run's first step fails before any update, so a rollback would
restore the same weights and no learning rate can avoid it. No budget is
spent, the learning rate is left alone, the diagnosis is kept, and the advice
does not blame the rate. A failure that comes later still rolls back."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import tiny_config

import safetrain


def incidents(workdir):
  return safetrain.read_jsonl(os.path.join(workdir, "incidents.jsonl"))


def counts_data(scale, n=256, seed=0):
  """A Poisson regression: counts whose log-mean is linear in the features;
  `scale` multiplies the features (unscaled raw measurements)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = rng.poisson(np.exp(0.3 * x[:, :1])).astype(np.float32)
  return x * scale, y


class LogLinkGLM(safetrain.Trainer):
  """A log-link GLM (Poisson loss on exp of a linear predictor), the classic
  count model: on features in the thousands, exp overflows on the first step."""

  scale = 1.0

  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((5,)),
        keras.layers.Dense(
          1,
          activation="exponential",
          kernel_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=1),
        ),
      ]
    )

  def build_train_dataset(self):
    ds = tf.data.Dataset.from_tensor_slices(counts_data(self.scale))
    return ds.repeat().batch(self.config.train.batch_size, drop_remainder=True)


class UnscaledGLM(LogLinkGLM):
  scale = 1e3


class CountNormalisedLoss(safetrain.Trainer):
  """A loss normalised by a count that is zero on this data (the positives
  of a detection loss when no batch holds one): 0/0 on every batch, whatever
  the weights."""

  def build_model(self):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])

  def build_train_dataset(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = np.zeros((256, 1), np.float32)  # no positives
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return ds.repeat().batch(self.config.train.batch_size, drop_remainder=True)

  def compute_loss(self, model, batch, training):
    x, y = batch
    per_row = tf.square(model(x, training=training) - y) * y  # positives only
    return tf.reduce_sum(per_row) / tf.reduce_sum(y)


def config(trainer, **overrides):
  return tiny_config(**{"trainer": trainer, "loss": "poisson", "train.steps": 30, **overrides})


@pytest.mark.parametrize(
  "trainer_cls, op",
  [(UnscaledGLM, "Exp"), (CountNormalisedLoss, None)],
)
def test_a_failure_from_the_initial_weights_stops_at_once(workdir, trainer_cls, op):
  trainer = trainer_cls(config(trainer_cls.__name__), workdir)
  with pytest.raises(safetrain.DivergenceError) as err:
    trainer.fit()
  records = incidents(workdir)
  actions = [r["action"] for r in records]
  # Batches with some finite rows may be quarantined first; never a rollback.
  assert actions[-1] == "abort" and "rollback" not in actions
  abort = records[-1]
  assert abort["cause"] == "present_from_start" and abort["step"] == 1
  assert abort["lr_scale_before"] == abort["lr_scale_after"] == 1.0
  text = err.value.diagnosis
  assert "present from the start" in text and "0 rollbacks" in text
  assert "learning_rate" not in text.split("Stopping because")[1]
  if op is not None:
    assert op in text  # forensics' first bad op is kept
  # Nothing was updated: the model holds the initial weights, finite.
  assert err.value.step == 0
  assert all(np.isfinite(w.numpy()).all() for w in trainer.model.weights)


def test_the_same_model_on_scaled_features_trains_without_incident(workdir):
  result = LogLinkGLM(config("LogLinkGLM"), workdir).fit()
  assert result.step == 30 and not result.incidents


def test_a_divergence_after_the_first_step_still_rolls_back_with_a_lower_rate(workdir):
  c = config("LogLinkGLM", **{"train.steps": 30})
  c.drill.loss_steps = "12-14"
  result = LogLinkGLM(c, workdir).fit()
  assert result.step == 30
  rollbacks = [r for r in incidents(workdir) if r["action"] == "rollback"]
  assert len(rollbacks) == 1 and rollbacks[0]["cause"] == "diverging_state"
  assert rollbacks[0]["lr_scale_after"] == 0.5


def test_a_fault_at_the_first_step_that_the_replay_does_not_reproduce_is_rolled_back(workdir):
  """An injected non-finite loss on the first three attempts of a healthy
  GLM: the replay from the initial weights is finite, so there is no
  evidence the weights are at fault; it is rolled back to them as before,
  and the run trains."""
  c = config("LogLinkGLM")
  c.drill.loss_steps = "1-3"
  result = LogLinkGLM(c, workdir).fit()
  decided = [r for r in incidents(workdir) if r["action"] in ("rollback", "abort")]
  assert [(r["action"], r["cause"], r["restored_step"]) for r in decided] == [
    ("rollback", "diverging_state", 0)
  ]
  assert "did not reproduce" in decided[0]["diagnosis"]
  assert result.step == c.train.steps
