"""Failure zoo 7 (the control): a wide network that is healthy.

The "nan nan output" answer blames a Dense(1000) layer ("this will often
return nans if you have very large weights") in a 10 -> 32 -> 1000 -> 2 MLP
trained with Adam at 0.001 on uniform random data. It does not NaN: plain
Keras (`model.compile(Adam(0.001), "mse"); model.fit(...)`) trains it to a
finite, falling loss, because Glorot initialisation already scales the wide
layer's weights by 1/sqrt(fan_in + fan_out). Not every NaN story is true.

What safetrain does here: nothing visible, which is the point of this entry.
The guards (input check, loss/gradient classification, spike detector) must
not change a healthy run: zero incidents, and under op determinism the final
weights are bit-for-bit the same as with the guards and recovery switched off
(`guard.check_inputs=False guard.spike_detection=False recovery.enabled=False`).
Clipping is off (`clip.global_norm=0`), as in the original script.

Run:
  safetrain --config=experiments/zoo_wide_healthy.py --workdir=runs/zoo_wide
  safetrain --config=experiments/zoo_wide_healthy.py:unguarded --workdir=runs/zoo_wide_off

What to expect: exit code 0 and no incidents for both, the same loss in both
`metrics.jsonl` files, falling from ~0.15 to ~0.002 in 500 steps (the targets
are uniform noise: the model memorises the 100 rows, as the original does).

Short variants for tests: `:smoke` and `:unguarded,smoke`.
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

# The :ARG words get_config accepts, alone or joined by commas (--config=FILE:a,b).
ARGS = ("smoke", "unguarded")


def get_config(arg=None):
  args = set((arg or "").split(","))
  config = safetrain.default_config()
  config.trainer = "WideTrainer"
  config.loss = "mse"
  config.train.steps = 500
  config.train.batch_size = 32
  config.train.steps_per_loop = 50
  config.train.log_every_steps = 100
  config.train.deterministic = True
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.clip.global_norm = 0.0
  config.checkpoint.every_steps = 100
  if "unguarded" in args:
    config.guard.check_inputs = False
    config.guard.spike_detection = False
    config.recovery.enabled = False
  if "smoke" in args:
    config.train.steps = 30
    config.train.steps_per_loop = 15
    config.checkpoint.every_steps = 15
  return config


def make_data(seed: int):
  """The answer's data: 100 rows of 10 uniform features, 2 uniform targets."""
  rng = np.random.default_rng(seed)
  x = rng.random((100, 10)).astype(np.float32)
  y = rng.random((100, 2)).astype(np.float32)
  return x, y


def make_model() -> keras.Model:
  return keras.Sequential(
    [
      keras.Input((10,)),
      keras.layers.Dense(32, activation="relu"),
      keras.layers.Dense(1000, activation="relu"),
      keras.layers.Dense(2),
    ]
  )


class WideTrainer(safetrain.Trainer):
  """10 -> 32 -> 1000 -> 2, as in the answer."""

  def build_model(self):
    return make_model()

  def build_train_dataset(self):
    x, y = make_data(self.config.seed)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(100, seed=self.config.seed)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)
