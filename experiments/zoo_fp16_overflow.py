"""Failure zoo 5: mixed_float16 on raw inputs in the thousands.

64 raw features between 5,000 and 35,000 (prices, counts) go into a Dense(64)
projection followed by LayerNormalization, which is meant to take care of the
scale, and in float32 it does. Under `mixed_float16` the projection computes
in float16, whose largest finite value is 65504; a few of its outputs (about
0.3% at initialisation, so nearly every batch) are larger, become inf, and
LayerNormalization turns them into NaN. This is not a gradient overflow that
loss scaling can fix: the forward pass itself is out of range. Plain Keras
(`keras.mixed_precision.set_global_policy("mixed_float16");
model.compile(Adam(0.01), "mse"); model.fit(...)`) reports `loss: nan` from
the first step; its LossScaleOptimizer skips every update and keeps halving
the loss scale, so the model never trains.

What safetrain does: before step 1 it replays the first batch eagerly and
sees `projection`'s float16 output overflow from finite inputs; computing
that layer in float32 makes the replay finite, so it switches `projection`
to float32 (`recovery.float32_fallback`, a `float16_overflow` incident at
step 0 with action `float32_layers`) and trains: MSE 0.037 after 400 steps,
no rollback, no learning-rate cut, the exported model keeps `projection` in
float32. A learning rate cannot fix a range failure, so none is cut.

`:no_fallback` shows the run without that remedy: preflight warns that
`projection` outputs values beyond float16's range, every step has a
non-finite loss (`nonfinite_loss`), rollbacks with a lower rate do not help,
and once the budget is spent it stops with exit code 3 and a diagnosis
naming `projection` and its float16 overflow, with the fixes. The last
healthy checkpoint (the initial state) is intact.

The fixes, as variants that train fine (zero incidents, MSE after 400 steps;
the target's variance is 0.35):
  `:bf16` runs `precision.policy=mixed_bfloat16` (float32's range, fewer
    bits): MSE 0.04;
  `:normalized` standardizes the inputs in the dataset, so float16 suffices:
    MSE 0.003.

Run:
  safetrain --config=experiments/zoo_fp16_overflow.py --workdir=runs/zoo_fp16
  safetrain --config=experiments/zoo_fp16_overflow.py:no_fallback --workdir=runs/zoo_fp16_off
  safetrain --config=experiments/zoo_fp16_overflow.py:bf16 --workdir=runs/zoo_bf16
  safetrain --config=experiments/zoo_fp16_overflow.py:normalized --workdir=runs/zoo_fp16_norm

What to expect: the first trains with one `float16_overflow` incident and
exits 0; `:no_fallback` stops with exit code 3 after a preflight warning and
a few `nonfinite_loss` rollbacks; `:bf16` and `:normalized` exit 0 with no
incident.

Short variants for tests: `:smoke`, `:no_fallback,smoke`, `:bf16,smoke`,
`:normalized,smoke`.
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

FEATURES = 64
LOW, HIGH = 5000.0, 35000.0
# The :ARG words get_config accepts, alone or joined by commas (--config=FILE:a,b).
ARGS = ("smoke", "no_fallback", "bf16", "normalized")


def get_config(arg=None):
  args = set((arg or "").split(","))
  config = safetrain.default_config()
  config.trainer = "Fp16OverflowTrainer"
  config.loss = "mse"
  config.train.steps = 400
  config.train.batch_size = 32
  config.train.steps_per_loop = 50
  config.train.log_every_steps = 100
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.01
  config.precision.policy = "mixed_float16"
  config.checkpoint.every_steps = 100
  config.guard.preflight = "warn"
  if "no_fallback" in args:
    config.recovery.float32_fallback = False
  if "bf16" in args:
    config.precision.policy = "mixed_bfloat16"
  if "normalized" in args:
    config.trainer = "NormalizedTrainer"
  if "smoke" in args:
    config.train.steps = 60
    config.train.steps_per_loop = 20
    config.checkpoint.every_steps = 20
    # One rollback is enough to show that lowering the rate does not help.
    config.recovery.max_rollbacks = 1
  return config


def make_data(n: int, seed: int):
  """Raw features in [LOW, HIGH]; y a smooth function of the standardized x."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(LOW, HIGH, size=(n, FEATURES))
  z = standardize(x)
  w = np.random.default_rng(7).normal(size=(FEATURES, 1)) / np.sqrt(FEATURES)
  y = np.tanh(z @ w) + 0.05 * rng.normal(size=(n, 1))
  return x.astype(np.float32), y.astype(np.float32)


def standardize(x: np.ndarray) -> np.ndarray:
  """Uses the known range of the features, as a fitted scaler would."""
  return ((x - (LOW + HIGH) / 2) / ((HIGH - LOW) / np.sqrt(12.0))).astype(np.float32)


def make_model() -> keras.Model:
  return keras.Sequential(
    [
      keras.Input((FEATURES,)),
      keras.layers.Dense(64, name="projection"),
      keras.layers.LayerNormalization(name="norm"),
      keras.layers.Activation("relu"),
      keras.layers.Dense(32, activation="relu"),
      # The output in float32, as the mixed-precision guide says.
      keras.layers.Dense(1, dtype="float32", name="output"),
    ]
  )


class Fp16OverflowTrainer(safetrain.Trainer):
  """Raw inputs; the precision policy comes from the config."""

  def build_model(self):
    return make_model()

  def train_arrays(self):
    return make_data(2048, self.config.seed)

  def build_train_dataset(self):
    x, y = self.train_arrays()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(2048, seed=self.config.seed)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)


class NormalizedTrainer(Fp16OverflowTrainer):
  """The same data, standardized in the input pipeline."""

  def train_arrays(self):
    x, y = make_data(2048, self.config.seed)
    return standardize(x), y
