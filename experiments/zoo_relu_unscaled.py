"""Failure zoo 2: a ReLU network on unscaled inputs (+-1000..10000).

The "Why is my TensorFlow Keras loss NaN?" answer (example 2) fits x -> x with
Dense(10, relu) -> Dense(1) on inputs of magnitude 1000..10000 and says Adam at
0.01 returns NaN. On TensorFlow 2.21 it does not: Adam's step is bounded by the
learning rate per weight, so it learns (MSE 6.7e6 -> 7.6e4 in three epochs).
This zoo entry therefore uses SGD at the same 0.01, the optimizer such scripts
usually have. Plain Keras (`model.compile(SGD(0.01), "mse"); model.fit(...)`)
then returns a loss of 4e28 at step 2 and NaN from step 3 on: the gradient
scales with x^2 = 1e8, so one step throws the weights far past the minimum and
the next overflows float32. (`experiments/linear_regression.py`, zoo item 1, is
the same failure with a single Dense unit and clipping off; it shows rollback.)

What safetrain does: clips the global gradient norm to `clip.global_norm=1.0`
(the default), so one SGD step moves the weights by at most 0.01 whatever the
input scale. The run has zero incidents and the loss falls steadily instead of
exploding (about 1e3 after 300 steps from ~4e7, RMSE ~33 on targets of
magnitude 1000..10000). With `--config.clip.global_norm=0` the loss is
non-finite from step 3; five rollbacks halving the rate each time get nowhere
near the ~1e-6x it would need, so the run stops with exit code 3 and a
diagnosis pointing at the weights and the unnormalized inputs. The real fix
is still to standardize the inputs.

Run:
  safetrain --config=experiments/zoo_relu_unscaled.py --workdir=runs/zoo_relu

What to expect: exit code 0, no incidents, `WORKDIR/metrics.jsonl` shows
`grad_norm` falling from ~5e7 to ~4e5 (every update clipped to norm 1.0) and
the loss falling with it.

Short variant for tests: `--config=experiments/zoo_relu_unscaled.py:smoke`.
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

# The :ARG words get_config accepts (--config=FILE:WORD).
ARGS = ("smoke",)


def get_config(arg=None):
  config = safetrain.default_config()
  config.trainer = "ReluUnscaledTrainer"
  config.loss = "mse"
  config.train.steps = 300
  config.train.batch_size = 32
  config.train.steps_per_loop = 50
  config.train.log_every_steps = 50
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.01
  config.clip.global_norm = 1.0
  config.checkpoint.every_steps = 100
  if arg == "smoke":
    config.train.steps = 200
    config.checkpoint.every_steps = 100
  return config


def make_data(n: int, seed: int):
  """x = +-U(1000, 10000), y = x: the answer's data, with more rows."""
  rng = np.random.default_rng(seed)
  sign = rng.choice([-1.0, 1.0], size=(n, 1))
  x = (sign * rng.uniform(1000.0, 10000.0, size=(n, 1))).astype(np.float32)
  return x, x.copy()


def make_model() -> keras.Model:
  return keras.Sequential(
    [keras.Input((1,)), keras.layers.Dense(10, activation="relu"), keras.layers.Dense(1)]
  )


class ReluUnscaledTrainer(safetrain.Trainer):
  """Dense(10, relu) -> Dense(1) on raw inputs, as in the original answer."""

  def build_model(self):
    return make_model()

  def build_train_dataset(self):
    x, y = make_data(1024, self.config.seed)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(1024, seed=self.config.seed)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)
