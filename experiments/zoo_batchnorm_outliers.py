"""Failure zoo 11: a batch of outliers poisons BatchNorm's statistics.

"Why is my model NaN at evaluation when training looked fine?" A regressor
with a BatchNormalization layer; a few rows of one batch carry huge but
finite features (1e25: a sensor's error code, a unit mix-up), so they pass
any NaN check on the data. Their forward pass drives the layer's moving
variance to inf: the training loss of that step may even be finite, but
from then on inference divides by an infinite variance, and the model
predicts one constant (or NaN) for every input. Plain Keras
(`model.compile(Adam(1e-2), "mse"); model.fit(...)`) ends with a moving
variance of inf and one constant prediction for all clean data.

What safetrain does, at its defaults: after each forward pass the guard
checks the variables the optimizer does not update (BatchNorm statistics,
any float non-trainable) for values that are non-finite or beyond
`guard.state_max_abs` (1e30). That batch is a bad batch (`nonfinite_state`):
skipped with the statistics put back, quarantined with its data position,
no rollback, no rate cut. The run trains on and evaluates finite.

Run:
  safetrain --config=experiments/zoo_batchnorm_outliers.py --workdir=runs/zoo_bn

What to expect: exit code 0; `incidents.jsonl` has `nonfinite_state`
(`quarantined_batch`) for the poisoned batches, 0 rollbacks, lr scale 1, a
finite eval loss (0.096 after 400 steps, 14 batches quarantined).
`:no_check` (`guard.check_state=False`) shows what the guard prevents: the
moving variance goes to inf, and a rollback with the rate halved meets the
same batch again: 5 rollbacks (lr scale 1/32), then exit 3.

Short variant for tests: `--config=experiments/zoo_batchnorm_outliers.py:smoke`
(60 steps: 2 batches quarantined, eval loss 0.076).
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

FEATURES = 4
BATCH = 32
POISONED = (7, 23)  # the batches (0-based, first epoch) holding outlier rows

# The :ARG words get_config accepts, alone or joined by commas.
ARGS = ("smoke", "no_check")


def get_config(arg=None):
  args = set((arg or "").split(","))
  config = safetrain.default_config()
  config.trainer = "BatchNormTrainer"
  config.loss = "mse"
  config.train.steps = 400
  config.train.batch_size = BATCH
  config.train.steps_per_loop = 20
  config.train.log_every_steps = 100
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-2
  config.checkpoint.every_steps = 100
  config.eval.steps = 0
  if "no_check" in args:
    config.guard.check_state = False
  if "smoke" in args:
    config.train.steps = 60
  return config


def make_data(n: int, seed: int, poisoned=POISONED):
  """A linear target; four rows of each poisoned batch are 1e25x too large."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, FEATURES)).astype(np.float32)
  y = x.sum(axis=1, keepdims=True).astype(np.float32)
  for b in poisoned:
    x[BATCH * b : BATCH * b + 4] *= 1e25
  return x, y


def make_model() -> keras.Model:
  return keras.Sequential(
    [
      keras.Input((FEATURES,)),
      keras.layers.Dense(16),
      keras.layers.BatchNormalization(momentum=0.5),
      keras.layers.Dense(1),
    ]
  )


class BatchNormTrainer(safetrain.Trainer):
  """Dense -> BatchNorm -> Dense; the data is read in order."""

  def build_model(self):
    return make_model()

  def build_train_dataset(self):
    ds = tf.data.Dataset.from_tensor_slices(make_data(2048, self.config.seed))
    return ds.batch(BATCH, drop_remainder=True).repeat()

  def build_eval_dataset(self):
    x, y = make_data(512, self.config.seed + 1, poisoned=())
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(256)
