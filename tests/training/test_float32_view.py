"""A custom compute_loss sees float32 predictions under a mixed policy, as
Keras's loss wrapper gives a loss function float32 inputs (issue 21, item 3):
a loss copied from a Keras script behaves as it did there."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import tiny_config

import safetrain
from safetrain.training import losses

CLASSES = 5


def classification_data(n=256, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (np.argmax(x[:, : CLASSES - 1], axis=1) + (x[:, 0] > 1.5)).astype(np.int64)
  return x, y


class LogSoftmaxTrainer(safetrain.Trainer):
  """The seed article's hand-written cross-entropy: log(softmax(logits)), on
  a head whose logits spread far (a float16 softmax rounds the small
  probabilities to 0, and log(0) is -inf)."""

  seen = []

  def build_model(self):
    init = keras.initializers.RandomNormal(stddev=1.0, seed=3)
    return keras.Sequential(
      [
        keras.Input((4,)),
        keras.layers.Dense(16, activation="relu", kernel_initializer=init),
        keras.layers.Dense(CLASSES, kernel_initializer=init),
      ]
    )

  def build_train_dataset(self):
    ds = tf.data.Dataset.from_tensor_slices(classification_data())
    return ds.repeat().batch(self.config.train.batch_size, drop_remainder=True)

  def compute_loss(self, model, batch, training):
    x, y = batch
    logits = model(x, training=training)
    type(self).seen.append((logits.dtype, model is self.model))
    probs = tf.nn.softmax(logits)
    picked = tf.reduce_sum(tf.one_hot(y, CLASSES, dtype=probs.dtype) * tf.math.log(probs), axis=1)
    return -tf.reduce_mean(picked) + self.regularization_loss(model)


def config(policy):
  return tiny_config(
    **{
      "trainer": "LogSoftmaxTrainer",
      "precision.policy": policy,
      "train.steps": 20,
      "optimizer.learning_rate": 1e-3,
    }
  )


@pytest.fixture(autouse=True)
def _policy_back():
  yield
  keras.mixed_precision.set_global_policy("float32")
  LogSoftmaxTrainer.seen = []


def test_under_mixed_float16_compute_loss_gets_float32_predictions(workdir):
  trainer = LogSoftmaxTrainer(config("mixed_float16"), workdir)
  trainer.build()
  x, _ = classification_data(64)
  # The same head in float16, as the model computes it: some rows' softmax
  # holds a 0 and the hand-written loss is -inf there.
  logits16 = trainer.model(x[:64], training=False)
  assert logits16.dtype == tf.float16
  assert not np.isfinite(np.log(tf.nn.softmax(logits16).numpy())).all()

  result = trainer.fit()
  assert result.step == 20
  assert not result.incidents, result.incidents
  assert LogSoftmaxTrainer.seen and all(
    d == tf.float32 and not same for d, same in LogSoftmaxTrainer.seen
  )
  weights = [w.numpy() for w in trainer.model.trainable_weights]
  assert all(np.isfinite(w).all() for w in weights)


def test_under_float32_compute_loss_gets_the_model_itself(workdir):
  result = LogSoftmaxTrainer(config("float32"), workdir).fit()
  assert result.step == 20
  assert LogSoftmaxTrainer.seen and all(
    d == tf.float32 and same for d, same in LogSoftmaxTrainer.seen
  )


def test_the_float32_view_is_the_model_for_everything_but_its_outputs():
  keras.mixed_precision.set_global_policy("mixed_float16")
  model = keras.Sequential(
    [
      keras.Input((3,)),
      keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.1)),
    ]
  )
  view = losses.float32_view(model)
  assert isinstance(view, losses.Float32Outputs)
  out = view(np.ones((4, 3), np.float32), training=False)
  assert out.dtype == tf.float32 and out.shape == (4, 2)
  assert view.trainable_variables == model.trainable_variables
  assert view.layers == model.layers and len(view.losses) == 1
  keras.mixed_precision.set_global_policy("float32")
  plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  assert losses.float32_view(plain) is plain
