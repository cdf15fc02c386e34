"""Failure zoo 9: a rate so high the run learns nothing, and says nothing.

"Why doesn't my loss go down?" A small regressor (8-32-1, tanh) driven with
Adam at 3.0, a learning rate some 1000x too high. Nothing goes NaN: tanh
units saturate, Adam's steps of about the rate
throw the output layer around the targets' mean, and the loss sits at the
level of predicting the mean (the targets' variance, ~6.6) or above for the whole
run. Plain Keras (`model.compile(Adam(3.0), "mse"); model.fit(...)`)
finishes "successfully" with a loss no better than the mean's.

What safetrain does, at its defaults: at step 301 the running loss has
stayed far above its best for 300 steps (`stalled`; with the stall check
off, or on a run that never got better than the mean, `not_learning` after
`guard.learn_steps` good steps: the loss not below 0.95x the mean
predictor's and no longer falling). The run rolls back (from disk) and the
rate probe tries the scales 0.5, 0.1 and 0.02 for 100 guarded steps each
from the restored state, keeps the one whose loss fell lowest (the log says
so in one line: `rate probe from step 0 (100 steps per scale, mean loss of
the later half): 0.5 -> 7.812, 0.1 -> 1.172, 0.02 -> 0.187; kept scale
0.02`), undoes the trials, and goes on with it: final loss 0.034 after 2000
steps. `:no_probe` (`recovery.probe_steps=0`) halves the rate instead: a
second rollback at step 1501 (`not_learning`), final loss 3.9.

Run:
  safetrain --config=experiments/zoo_not_learning.py --workdir=runs/zoo_not_learning

What to expect: exit code 0; `incidents.jsonl` has one rollback (`stalled`)
whose `probe` lists the three trials and `lr_scale_after` the scale kept;
the final loss far under the mean predictor's. `:healthy` trains at Adam
1e-3: no incidents (the control).

Short variant for tests: `--config=experiments/zoo_not_learning.py:smoke`
(learn_steps 80, 200 steps: a `not_learning` rollback at step 141, the
probe keeps 0.02, final loss 0.093).
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

FEATURES = 8

# The :ARG words get_config accepts, alone or joined by commas.
ARGS = ("smoke", "no_probe", "healthy")


def get_config(arg=None):
  args = set((arg or "").split(","))
  config = safetrain.default_config()
  config.trainer = "NotLearningTrainer"
  config.loss = "mse"
  config.train.steps = 2000
  config.train.batch_size = 32
  config.train.steps_per_loop = 50
  config.train.log_every_steps = 250
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 3.0
  config.checkpoint.every_steps = 250
  config.eval.steps = 0
  if "no_probe" in args:
    config.recovery.probe_steps = 0
  if "healthy" in args:
    config.optimizer.learning_rate = 1e-3
  if "smoke" in args:
    config.train.steps = 200
    config.train.steps_per_loop = 10
    config.checkpoint.every_steps = 50
    config.guard.learn_steps = 80
  return config


def make_data(n: int, seed: int):
  """A linear target of variance ~6.6 plus a little noise."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, FEATURES)).astype(np.float32)
  w = np.random.default_rng(3).normal(size=(FEATURES, 1)) * 0.65
  y = (x @ w + 0.1 * rng.normal(size=(n, 1))).astype(np.float32)
  return x, y


def make_model() -> keras.Model:
  return keras.Sequential(
    [keras.Input((FEATURES,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(1)]
  )


class NotLearningTrainer(safetrain.Trainer):
  """A small tanh MLP on a linear regression problem."""

  def build_model(self):
    return make_model()

  def build_train_dataset(self):
    x, y = make_data(4096, self.config.seed)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4096, seed=self.config.seed)
    return ds.repeat().batch(self.config.train.batch_size, drop_remainder=True)
