"""A run that never learns is an incident (`not_learning`, issue 21 item 6):
its running loss, after `guard.learn_steps` good steps, is no better than
the trivial predictor's (or, for a custom loss, the initial weights'). It is
rolled back with a lower rate like a stalled run; one that still learns
nothing when the budget is spent ends with DivergenceError, never exit 0."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import TinyTrainer, regression_data, tiny_config

import safetrain
from safetrain.training import losses, reference


def incidents(workdir):
  return safetrain.read_jsonl(os.path.join(workdir, "incidents.jsonl"))


def learn_config(**overrides):
  return tiny_config(
    **{
      "train.steps": 300,
      "train.steps_per_loop": 10,
      "checkpoint.every_steps": 50,
      "guard.learn_steps": 100,
      **overrides,
    }
  )


class NoSignalClassifier(safetrain.Trainer):
  """Labels drawn independently of the inputs: nothing to learn, so the
  best a model can do is the label frequencies."""

  def build_model(self):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])

  def build_train_dataset(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4)).astype(np.float32)
    y = rng.choice(3, size=512, p=[0.6, 0.3, 0.1]).astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
    return ds.batch(self.config.train.batch_size, drop_remainder=True)


class FrozenCustomLoss(TinyTrainer):
  """A custom compute_loss (reference: the loss at the initial weights) on
  a model whose updates are too small to move it."""

  def compute_loss(self, model, batch, training):
    x, y = batch
    return tf.reduce_mean(tf.square(model(x, training=training) - y))


def test_a_rate_too_high_to_learn_is_rolled_back_with_a_lower_rate_and_then_learns(workdir):
  x, y = regression_data()
  # The plain cut (the rate probe off; test_rate_probe.py has it on).
  c = learn_config(**{"optimizer.learning_rate": 3.0, "recovery.probe_steps": 0})
  result = TinyTrainer(c, workdir).fit()
  assert result.step == 300
  (rollback,) = [r for r in incidents(workdir) if r["action"] == "rollback"]
  assert rollback["kind"] == "not_learning" and rollback["cause"] == "not_learning"
  # Its loss fell for the first steps (from a blow-up), then stopped: the
  # check waits for learn_steps good steps and a window whose fall is within
  # the loops' noise (which window is chaotic at this rate: steps 1..100 or
  # 41..140 on two CPUs).
  assert 101 <= rollback["step"] <= 201 and rollback["step"] % 10 == 1
  assert rollback["lr_scale_after"] == 0.5
  assert "predicting the targets' mean" in rollback["diagnosis"]
  # After the rollback the run does better than the mean predictor.
  assert result.loss < 0.95 * float(y.var())


def test_a_run_with_nothing_to_learn_ends_in_divergence_error_not_success(workdir):
  c = learn_config(
    **{"trainer": "NoSignalClassifier", "loss": "softmax_cross_entropy", "train.steps": 1000}
  )
  with pytest.raises(safetrain.DivergenceError, match="not_learning") as err:
    NoSignalClassifier(c, workdir).fit()
  decided = [r for r in incidents(workdir) if r["action"] in ("rollback", "abort")]
  # One rollback, whose rate probe finds no scale that learns (the loss of
  # each is the label frequencies'); the run learns no better after it, so
  # it is not tried again: it stops with budget left (recovery.max_rollbacks 5).
  assert [(r["kind"], r["action"], r["cause"]) for r in decided] == [
    ("not_learning", "rollback", "not_learning"),
    ("not_learning", "abort", "not_learning"),
  ]
  # The loss falls to the label frequencies' and then wanders: the first
  # window of 100 steps whose later half is not under its earlier half by
  # 3% and by more than the loops' noise ends at step 120; the next is
  # counted from the state the rollback restored (step 100), so it is at
  # least 100 steps later.
  assert [(r["step"], r["restored_step"]) for r in decided] == [(121, 100), (201, None)]
  losses = [t["loss"] for t in decided[0]["probe"]]
  assert len(losses) == 3 and max(losses) < 1.02 * min(losses)
  assert decided[1]["lr_scale_before"] == decided[0]["lr_scale_after"]
  assert "label frequencies" in err.value.diagnosis
  assert "did not help" in err.value.diagnosis


def test_a_custom_loss_is_held_to_the_initial_weights_loss(workdir):
  c = learn_config(
    **{
      "trainer": "FrozenCustomLoss",
      "optimizer.learning_rate": 1e-9,
      "recovery.max_rollbacks": 1,
      # The reference is the first batch's loss: a batch of the whole data
      # makes it the data's (a batch of 128 here is 18% above the mean).
      "train.batch_size": 256,
    }
  )
  with pytest.raises(safetrain.DivergenceError, match="not_learning") as err:
    FrozenCustomLoss(c, workdir).fit()
  assert "the initial weights" in err.value.diagnosis


class FarTargets(TinyTrainer):
  """Targets 20 away from where the model starts: at a modest rate the loss
  takes many hundreds of steps to come down, but it keeps falling."""

  def build_train_dataset(self):
    return super().build_train_dataset().map(lambda x, y: (x, y + 20.0))


def test_a_slow_run_whose_loss_still_falls_is_left_alone(workdir):
  c = learn_config(**{"trainer": "FarTargets", "optimizer.learning_rate": 3e-3})
  result = FarTargets(c, workdir).fit()
  losses = [r["loss"] for r in safetrain.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  losses = [x for x in losses if x is not None]
  # Far above the mean predictor's loss (the targets' variance, 2.8) all
  # along, but falling: no rate cut, which would only slow it down.
  assert min(losses[-5:]) > 10 * 2.8 and losses[-1] < 0.7 * losses[0]
  assert result.step == 300 and not result.incidents


def test_a_healthy_run_has_no_not_learning_incident(workdir):
  result = TinyTrainer(learn_config(), workdir).fit()
  assert result.step == 300 and not result.incidents


def test_learn_steps_zero_disables_the_check(workdir):
  c = learn_config(**{"optimizer.learning_rate": 3.0, "guard.learn_steps": 0})
  result = TinyTrainer(c, workdir).fit()
  assert result.step == 300
  assert not [r for r in incidents(workdir) if r["kind"] == "not_learning"]


@pytest.mark.parametrize(
  "loss, y, width, expected",
  [
    ("mse", np.array([[1.0], [3.0]]), 1, 1.0),  # the mean, 2: squared error 1
    ("mae", np.array([[0.0], [1.0], [5.0]]), 1, 5.0 / 3.0),  # the median, 1: |.| 1, 0, 4
    # Label frequencies [0.5, 0.5]: cross-entropy log 2, as probabilities or logits.
    ("sparse_categorical_crossentropy", np.array([0, 1]), 2, np.log(2.0)),
    ("softmax_cross_entropy", np.array([0, 1, 0, 1]), 2, np.log(2.0)),
    ("binary_crossentropy", np.array([[0.0], [1.0]]), 1, np.log(2.0)),
    ("sigmoid_cross_entropy", np.array([[0.0], [1.0]]), 1, np.log(2.0)),
  ],
)
def test_the_trivial_predictors_loss_in_closed_form(loss, y, width, expected):
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(width)])
  x = np.zeros((len(y), 2), np.float32)
  found = reference.trivial(loss, losses.make_loss(loss), model, (x, y))
  assert found is not None and found.loss == pytest.approx(expected, rel=1e-4)


def test_a_loss_without_a_closed_form_has_no_trivial_reference():
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  batch = (np.zeros((4, 2), np.float32), np.zeros((4, 1), np.float32))
  assert (
    reference.trivial("cosine_similarity", losses.make_loss("cosine_similarity"), model, batch)
    is None
  )
