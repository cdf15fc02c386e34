"""The classic NaN: linear regression on unscaled inputs with SGD at 0.1.

Inputs range over 1000..4000 and the target is x / 200 (5..20), exactly the
"Why is my TensorFlow Keras loss NaN?" script. Plain TensorFlow returns NaN
within ten steps: the gradient is ~x^2 = 1e7 times the error, so every SGD step
at learning rate 0.1 multiplies the error by about a million.

Run:
  safetrain --config=experiments/linear_regression.py --workdir=runs/linreg

What to expect: a handful of incidents (`nonfinite_loss`), each followed by a
rollback to the last healthy checkpoint with the learning rate cut 10x
(`recovery.lr_backoff=0.1`), until the rate is small enough to be stable (about
1e-7 for these inputs); then the loss falls to ~0 and the run finishes with
exit code 0. `WORKDIR/incidents.jsonl` lists every decision. Clipping is off
here, as in the original script: with `--config.clip.global_norm=1.0` the run
never goes non-finite, and with `--config.recovery.enabled=False` it dies.
The real fix is to standardize the inputs.

Short variant for tests: `--config=experiments/linear_regression.py:smoke`.
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

# The :ARG words get_config accepts (--config=FILE:WORD).
ARGS = ("smoke",)


def get_config(arg=None):
  config = safetrain.default_config()
  config.trainer = "LinearRegressionTrainer"
  config.loss = "mse"
  config.train.steps = 1500
  config.train.batch_size = 32
  config.train.steps_per_loop = 50
  config.train.log_every_steps = 250
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.clip.global_norm = 0.0
  config.guard.rollback_after = 2
  config.recovery.lr_backoff = 0.1
  config.recovery.max_rollbacks = 8
  config.recovery.min_lr_scale = 1e-8
  config.checkpoint.every_steps = 250
  config.eval.steps = 4
  if arg == "smoke":
    config.train.steps = 200
    config.checkpoint.every_steps = 100
  return config


def make_data(n: int, seed: int):
  rng = np.random.default_rng(seed)
  x = rng.uniform(1000.0, 4000.0, size=(n, 1)).astype(np.float32)
  y = (x / 200.0 + rng.normal(0.0, 0.05, size=(n, 1))).astype(np.float32)
  return x, y


class LinearRegressionTrainer(safetrain.Trainer):
  """One Dense unit, as in the original question."""

  def build_model(self):
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])

  def build_train_dataset(self):
    x, y = make_data(1024, self.config.seed)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(1024, seed=self.config.seed)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)

  def build_eval_dataset(self):
    x, y = make_data(256, self.config.seed + 1)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
