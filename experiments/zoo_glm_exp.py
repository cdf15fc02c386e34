"""Failure zoo 10: a log-link GLM on raw features, broken from the first step.

"Why is my Poisson regression NaN at once?" A count model (claims per
policy, visits per day): a Dense(1, activation="exponential") on features
in their raw units (sums insured, ages, distances in the thousands), with a
Poisson loss. The linear predictor is in the thousands on the first batch,
exp overflows float32 (past ~88.7), the prediction is inf and the loss NaN
before any update. Plain Keras (`model.compile(Adam(1e-3), "poisson");
model.fit(...)`) reports NaN from the first step. No learning rate can fix
it: the initial weights already fail.

What safetrain does, at its defaults: the first step fails before any
update (`nonfinite_loss` at step 1), and the eager replay of that batch from
the initial weights fails again, naming the first op that went non-finite
(`Exp`) and the unscaled columns. A rollback would restore the same weights,
so none is spent: the run stops at once (`cause: present_from_start`, exit
code 3) with a diagnosis that names the data, not the rate.
`:scaled` standardizes the features (the fix): no incident.

Run:
  safetrain --config=experiments/zoo_glm_exp.py --workdir=runs/zoo_glm_exp

What to expect: exit code 3 within the first loop; `incidents.jsonl` has an
`abort` with `cause: present_from_start`, 0 rollbacks, lr scale 1.

Short variant for tests: `--config=experiments/zoo_glm_exp.py:smoke`.
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

FEATURES = 5
RAW_SCALE = 1e3  # the features' raw units

# The :ARG words get_config accepts, alone or joined by commas.
ARGS = ("smoke", "scaled")


def get_config(arg=None):
  args = set((arg or "").split(","))
  config = safetrain.default_config()
  config.trainer = "ScaledGLMTrainer" if "scaled" in args else "GLMTrainer"
  config.loss = "poisson"
  config.train.steps = 500
  config.train.batch_size = 64
  config.train.steps_per_loop = 50
  config.train.log_every_steps = 100
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-2
  config.checkpoint.every_steps = 100
  config.eval.steps = 0
  if "smoke" in args:
    config.train.steps = 100
    config.train.steps_per_loop = 20
  return config


def make_data(n: int, seed: int, scale: float = RAW_SCALE):
  """Counts whose log-mean is linear in the features; the features come in
  raw units (`scale` times standardized ones)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, FEATURES)).astype(np.float32)
  y = rng.poisson(np.exp(0.3 * x[:, :1] - 0.2 * x[:, 1:2])).astype(np.float32)
  return x * scale, y


def make_model() -> keras.Model:
  return keras.Sequential(
    [
      keras.Input((FEATURES,)),
      keras.layers.Dense(
        1,
        activation="exponential",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=1),
      ),
    ]
  )


class GLMTrainer(safetrain.Trainer):
  """A log-link Poisson GLM on raw features."""

  scale = RAW_SCALE

  def build_model(self):
    return make_model()

  def build_train_dataset(self):
    x, y = make_data(4096, self.config.seed, self.scale)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4096, seed=self.config.seed)
    return ds.repeat().batch(self.config.train.batch_size, drop_remainder=True)


class ScaledGLMTrainer(GLMTrainer):
  """The fix: standardized features."""

  scale = 1.0
