"""Failure zoo 8: a deep ReLU network whose units die, silently.

"Why does my loss stop going down?" A deep ReLU regressor (four Dense(64,
relu) layers) driven with Adam at a learning rate far too high, 1.0. Nothing
ever goes NaN: in the first steps Adam moves every weight by about the
learning rate, the ReLU units of the last hidden layer are pushed below zero
for every input, and from then on no gradient reaches them or anything before
them. The gradient norm collapses, the model predicts one value for every
input, and the loss sits at or above the predict-the-mean level for the rest of
the run. Plain Keras (`model.compile(Adam(1.0), "mse"); model.fit(...)`)
finishes "successfully" with a loss of ~24 (the target's variance is 1.0) and
constant predictions. Gradient clipping does not help: Adam's step does not
depend on the gradient's scale.

What safetrain does, at its defaults: the first Adam steps blow the loss up
by three orders of magnitude over its first value, a finite blow-up, and the
guard stops there (`loss_growth`, step 2), before any unit has died: rollback
to the initial state with the learning rate halved, four times, until at
0.0625 the run trains (eval MSE ~0.09 on the 200-step smoke run).

With the growth check off (`:no_growth`), the units die, and the dead-unit
check catches it: once per inner loop it runs the first training batch
through the model and counts the units of each ReLU layer that output zero
on every row. A layer whose units are all dead is a `dead_units` incident,
recovered like a run that stopped learning: rollback (from disk: the newest
in-memory snapshots may already be half dead) with a lower learning rate
chosen by the rate probe (see zoo_not_learning), and a
diagnosis naming the layer, the fraction of dead units and the learning rate
("layer hidden3 (Dense, relu): 64 of 64 units (100%) output zero on every row
of the first training batch ...; learning rate 1 ...").

Run:
  safetrain --config=experiments/zoo_dead_relu.py --workdir=runs/zoo_dead_relu

What to expect: exit code 0; `incidents.jsonl` has 4 `loss_growth`
rollbacks, lr scale 0.0625 (`:no_growth`: `dead_units` rollbacks instead).
`:healthy` trains the same network at Adam's usual 1e-3: no incidents (the
control).

Short variant for tests: `--config=experiments/zoo_dead_relu.py:smoke`.
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

FEATURES, WIDTH, DEPTH = 8, 64, 4

# The :ARG words get_config accepts, alone or joined by commas.
ARGS = ("smoke", "healthy", "no_growth")


def get_config(arg=None):
  args = set((arg or "").split(","))
  config = safetrain.default_config()
  config.trainer = "DeadReluTrainer"
  config.loss = "mse"
  config.train.steps = 600
  config.train.batch_size = 32
  config.train.steps_per_loop = 25
  config.train.log_every_steps = 100
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1.0
  config.checkpoint.every_steps = 100
  if "no_growth" in args:
    config.guard.growth_factor = 0.0
  if "healthy" in args:
    config.optimizer.learning_rate = 1e-3
  if "smoke" in args:
    config.train.steps = 200
  return config


def make_data(n: int, seed: int):
  """A smooth non-linear target of variance ~1."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, FEATURES)).astype(np.float32)
  w = np.random.default_rng(7).normal(size=(FEATURES, 1))
  y = (np.sin(x @ w) + 0.5 * x[:, :1] ** 2).astype(np.float32)
  return x, y


def make_model() -> keras.Model:
  layers = [keras.Input((FEATURES,))]
  layers += [keras.layers.Dense(WIDTH, activation="relu", name=f"hidden{i}") for i in range(DEPTH)]
  layers.append(keras.layers.Dense(1, name="output"))
  return keras.Sequential(layers)


class DeadReluTrainer(safetrain.Trainer):
  """A deep ReLU MLP on a smooth regression problem."""

  def build_model(self):
    return make_model()

  def build_train_dataset(self):
    x, y = make_data(4096, self.config.seed)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4096, seed=self.config.seed)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)

  def build_eval_dataset(self):
    return tf.data.Dataset.from_tensor_slices(make_data(1024, self.config.seed + 1)).batch(256)
