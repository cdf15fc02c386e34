"""Failure zoo 4: NaN in the training data (5% of rows have a missing value).

"How to handle NaN values in a TensorFlow cost function?" and "How can I
prevent NaN values in TensorFlow model predictions?" both start from data with
missing values read as NaN. One NaN feature makes that row's first-layer
activations NaN, and the gradient of the first layer's kernel NaN; after one
update the whole kernel is NaN. With 5% bad rows nearly every batch of 32 has
one. Plain Keras (`model.compile(Adam(0.01), "mse"); model.fit(x, y)`) does
not even say so here: TensorFlow's CPU ReLU maps NaN to 0, so the NaN kernel
gives all-zero hidden units, the model predicts one constant for every input,
and the reported loss stays finite, stuck near the variance of y (2.3 after
10 steps). The run looks alive and has silently died (the first Dense kernel
is all NaN).

What safetrain does: `guard.check_inputs` looks at every floating-point
feature of every batch inside the compiled step, and with
`guard.bad_inputs=drop_rows` (the default) drops the rows that are not finite
and trains on the rest. Nothing is silent: each loop's `metrics.jsonl` record
has `dropped_rows`, and `incidents.jsonl` gets a `nonfinite_inputs` incident
with action `dropped_rows` naming the feature column (`x[:, k]`) and the count.
The run learns: MSE ~0.09 after 500 steps, on targets of variance ~1.6.

The comparison variant `:impute` does what you should do up front: mean
imputation and standardization of each column with statistics of the
training set, in the input pipeline. No rows are lost, no incidents, and it
learns better (MSE ~0.03), since the raw columns are also on mixed scales.

Run:
  safetrain --config=experiments/zoo_nan_data.py --workdir=runs/zoo_nan
  safetrain --config=experiments/zoo_nan_data.py:impute --workdir=runs/zoo_nan_impute

What to expect: exit code 0 for both; the first has one `nonfinite_inputs`
incident per loop (action `dropped_rows`), the second none.

Short variants for tests: `:smoke` and `:impute,smoke`.
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

FEATURES = 6
BAD_FRACTION = 0.05


# The :ARG words get_config accepts, alone or joined by commas (--config=FILE:a,b).
ARGS = ("smoke", "impute")


def get_config(arg=None):
  args = set((arg or "").split(","))
  config = safetrain.default_config()
  config.trainer = "ImputeTrainer" if "impute" in args else "NaNDataTrainer"
  config.loss = "mse"
  config.train.steps = 500
  config.train.batch_size = 32
  config.train.steps_per_loop = 50
  config.train.log_every_steps = 100
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.01
  config.guard.bad_inputs = "drop_rows"
  config.checkpoint.every_steps = 100
  if "smoke" in args:
    config.train.steps = 60
    config.train.steps_per_loop = 20
    config.checkpoint.every_steps = 60
  return config


def make_data(n: int, seed: int, bad_fraction: float = BAD_FRACTION):
  """Features on mixed scales; y a smooth function of them; some x are NaN."""
  rng = np.random.default_rng(seed)
  mean = np.array([40.0, 5.0, -2.0, 0.0, 10.0, 1.0])
  std = np.array([12.0, 2.0, 1.0, 3.0, 4.0, 0.5])
  z = rng.normal(size=(n, FEATURES))
  x = (mean + std * z).astype(np.float32)
  w = np.array([[0.8], [-0.5], [0.3], [0.6], [-0.4], [0.2]])
  y = (z @ w + 0.3 * np.sin(2.0 * z[:, :1]) + 0.1 * rng.normal(size=(n, 1))).astype(np.float32)
  bad = np.flatnonzero(rng.random(n) < bad_fraction)
  x[bad, rng.integers(0, FEATURES, size=bad.size)] = np.nan
  return x, y


def impute_and_standardize(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Mean imputation, then standardization, with `reference`'s statistics."""
  mean = np.nanmean(reference, axis=0)
  std = np.nanstd(reference, axis=0)
  x = np.where(np.isnan(x), mean, x)
  return ((x - mean) / std).astype(np.float32)


def make_model() -> keras.Model:
  return keras.Sequential(
    [
      keras.Input((FEATURES,)),
      keras.layers.Dense(32, activation="relu"),
      keras.layers.Dense(32, activation="relu"),
      keras.layers.Dense(1),
    ]
  )


class NaNDataTrainer(safetrain.Trainer):
  """Trains on the raw data, NaN rows and all; the guard drops them."""

  def build_model(self):
    return make_model()

  def train_arrays(self):
    return make_data(2048, self.config.seed)

  def build_train_dataset(self):
    x, y = self.train_arrays()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(2048, seed=self.config.seed)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)


class ImputeTrainer(NaNDataTrainer):
  """The same data, imputed and standardized before training."""

  def train_arrays(self):
    x, y = make_data(2048, self.config.seed)
    return impute_and_standardize(x, x), y
