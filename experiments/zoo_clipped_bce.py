"""Failure zoo 3: a hand-written binary cross-entropy clipped to [1e-7, 1.0].

The "Why is my TensorFlow Keras loss NaN?" answer (example 1) clips the
predicted probability to [epsilon, 1.0] "to avoid log(0)". The upper bound is
the bug: a sigmoid that saturates returns exactly 1.0 in float32 (for logits
above ~17), and then log(1 - p) = log(0) = -inf; with y = 1 the term is
0 * -inf = NaN. Here 2% of the rows have their features in the wrong units
(1000x too large), so their logits are in the hundreds or thousands and the
sigmoid saturates on them: to exactly 0 (harmless, the lower clip catches it)
or to exactly 1 (NaN). Plain Keras
(`model.compile(Adam(0.01), loss=clipped_bce); model.fit(...)`) reports NaN
from step 2 on: the first batch with such a row poisons the gradients, the
weights become NaN, and the run is lost.

What safetrain does: the loss of such a batch is not finite, so the step is
skipped: weights, optimizer slots and the step counter stay as they were,
and the next batch from the same state trains. That makes it a bad batch,
not a diverging state: it is quarantined (`nonfinite_loss`, action
`quarantined_batch`, cause `bad_batch`; one `quarantine.jsonl` record per
batch with its data position), with no rollback, no learning-rate cut and no
recovery budget spent. When `guard.rollback_after=3` bad batches come in a
row, triage replays the last one from the same state and runs its rows one
by one: some rows non-finite and the others finite means bad data, still
quarantined. Once a quarantined batch is shown bound to its rows (the row
probe: those rows alone non-finite), the scalar loss is evaluated per row
whenever it is not finite, and the step trains on the finite rows
(`row_losses`, then `dropped_examples`). The run completes: in 300 steps 10
batches quarantined and 53 rows dropped, lr scale 1, no rollback (before
the row remedy: 74 batches quarantined; before that: 72 skipped steps and 2 rollbacks that halved
the learning rate twice without curing anything; with 3% bad rows the budget
ran out and the run stopped with exit code 3). Only when bad batches become
frequent (`recovery.bad_batch_rate`, 30%) are they treated as a diverging
state.

Run:
  safetrain --config=experiments/zoo_clipped_bce.py --workdir=runs/zoo_bce

What to expect: exit code 0; `WORKDIR/incidents.jsonl` has `nonfinite_loss`
incidents (one `quarantined_batch` record per loop, with the count, one
`row_losses`, then `dropped_examples`) and no rollback;
`WORKDIR/quarantine.jsonl` lists the batches. The real fix
is to clip to [eps, 1 - eps], or better to drop the sigmoid and use
`keras.losses.BinaryCrossentropy(from_logits=True)`:
`--config=experiments/zoo_clipped_bce.py:fixed` does that and never sees a
non-finite loss: no incidents in 300 steps, eval accuracy 0.92 (its training
loss stays higher, ~0.6: the outlier rows have huge but finite losses, and
the spike detector may skip the odd batch with one as a `loss_spike`).

Short variant for tests: `--config=experiments/zoo_clipped_bce.py:smoke`
(100 steps; 2 batches quarantined, 10 rows dropped, no rollback).
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

FEATURES = 8


# The :ARG words get_config accepts, alone or joined by commas (--config=FILE:a,b).
ARGS = ("smoke", "fixed")


def get_config(arg=None):
  args = set((arg or "").split(","))
  config = safetrain.default_config()
  config.trainer = "ClippedBCETrainer"
  config.train.steps = 300
  config.train.batch_size = 32
  config.train.steps_per_loop = 50
  config.train.log_every_steps = 100
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.01
  config.checkpoint.every_steps = 100
  config.eval.steps = 0
  # Not used by ClippedBCETrainer, whose compute_loss is the custom loss.
  config.loss = "binary_crossentropy"
  if "fixed" in args:
    config.trainer = "LogitsBCETrainer"
    config.loss = "sigmoid_cross_entropy"
  if "smoke" in args:
    config.train.steps = 100
    config.train.steps_per_loop = 20
    config.checkpoint.every_steps = 20
  return config


def clipped_bce(y_true, y_pred):
  """The answer's loss, bug included: the upper clip bound should be 1 - eps."""
  p = tf.clip_by_value(y_pred, 1e-7, 1.0)
  y = tf.cast(y_true, p.dtype)
  return -tf.reduce_mean(y * tf.math.log(p) + (1.0 - y) * tf.math.log(1.0 - p))


def make_data(n: int, seed: int, outlier_fraction: float = 0.02):
  """Noisy linearly separable labels; some rows have features 1000x too large."""
  rng = np.random.default_rng(seed)
  w = np.random.default_rng(1234).normal(size=(FEATURES, 1))
  x = rng.normal(size=(n, FEATURES)).astype(np.float32)
  y = ((x @ w + rng.normal(size=(n, 1))) > 0).astype(np.float32)
  x[rng.random(n) < outlier_fraction] *= 1000.0
  return x, y


def make_model(sigmoid: bool = True) -> keras.Model:
  return keras.Sequential(
    [
      keras.Input((FEATURES,)),
      keras.layers.Dense(16, activation="relu"),
      keras.layers.Dense(1, activation="sigmoid" if sigmoid else None),
    ]
  )


class ClippedBCETrainer(safetrain.Trainer):
  """A small MLP with a sigmoid output, trained with `clipped_bce`."""

  def build_model(self):
    return make_model(sigmoid=True)

  def build_train_dataset(self):
    x, y = make_data(4096, self.config.seed)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4096, seed=self.config.seed)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)

  def build_eval_dataset(self):
    x, y = make_data(1024, self.config.seed + 1, outlier_fraction=0.0)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(256)

  def compute_loss(self, model, batch, training):
    x, y = batch
    p = tf.cast(model(x, training=training), tf.float32)
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.cast(p > 0.5, tf.float32), y), tf.float32))
    return clipped_bce(y, p), {"accuracy": accuracy}


class LogitsBCETrainer(ClippedBCETrainer):
  """The fix: logits out, `config.loss = sigmoid_cross_entropy` (stable)."""

  def build_model(self):
    return make_model(sigmoid=False)

  def compute_loss(self, model, batch, training):
    x, y = batch
    logits = tf.cast(model(x, training=training), tf.float32)
    loss = keras.losses.binary_crossentropy(y, logits, from_logits=True)
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.cast(logits > 0, tf.float32), y), tf.float32))
    return tf.reduce_mean(loss), {"accuracy": accuracy}
