"""Tiny trainers shared by the tests."""

import errno
import os

import keras
import numpy as np
import tensorflow as tf

import safetrain


def tiny_config(**overrides):
  """A small, fast, deterministic config; `overrides` use dotted keys."""
  c = safetrain.default_config()
  c.trainer = "TinyTrainer"
  c.train.steps = 20
  c.train.batch_size = 16
  c.train.steps_per_loop = 5
  c.checkpoint.every_steps = 10
  c.guard.preflight = "off"
  c.optimizer.learning_rate = 0.01
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


# The run the checkpoint-damage tests start from (conftest.py's `trained`):
# 25 steps, a checkpoint every 5, three kept.
# The repository's root: tests live in wing folders below tests/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"train.steps": 25, "checkpoint.every_steps": 5, "checkpoint.max_to_keep": 3}


def regression_data(n=256, features=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, features)).astype(np.float32)
  w = rng.normal(size=(features, 1)).astype(np.float32)
  y = (x @ w + 0.1 * rng.normal(size=(n, 1))).astype(np.float32)
  return x, y


class TinyTrainer(safetrain.Trainer):
  """A 4-8-1 MLP on a fixed regression problem; shuffled deterministically."""

  def build_model(self):
    return keras.Sequential(
      [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )

  def build_train_dataset(self):
    x, y = regression_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(256, seed=1, reshuffle_each_iteration=True)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)


def norm_model(dropout: float = 0.25) -> keras.Model:
  """TinyTrainer's MLP with state a forward pass writes: BatchNorm
  statistics, and dropout's seed when `dropout` > 0."""
  layers = [keras.Input((4,)), keras.layers.Dense(8, activation="tanh")]
  layers.append(keras.layers.BatchNormalization())
  if dropout:
    layers.append(keras.layers.Dropout(dropout))
  return keras.Sequential(layers + [keras.layers.Dense(1)])


class DirtyTrainer(TinyTrainer):
  """TinyTrainer's data in order (batch k is rows 16k..16k+15 at the
  default batch size), with faults in the data itself: a NaN feature in
  `NAN_ROWS`, and in `HUGE_ROWS` a finite target so large (3e19) that its
  squared error overflows float32: a non-finite example of finite inputs."""

  NAN_ROWS: tuple = ()
  HUGE_ROWS: tuple = ()

  def build_train_dataset(self):
    x, y = regression_data()
    x[list(self.NAN_ROWS), 1] = np.nan
    y[list(self.HUGE_ROWS), 0] = 3e19
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return ds.batch(self.config.train.batch_size, drop_remainder=True)


class IndexTrainer(safetrain.Trainer):
  """Batches carry their own index, so a test can see which batches trained.

  Batch k (0-based) is 4 rows of x = k; the model is one weight, so each
  applied update is visible. `seen` is filled by a tf.py_function-free
  recorder: the loss adds 0 * x, and the test reads data positions instead.
  """

  def build_model(self):
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])

  def build_train_dataset(self):
    idx = tf.data.Dataset.range(100000).map(lambda i: tf.fill([4, 1], tf.cast(i, tf.float32)))
    return idx.map(lambda x: (x, tf.zeros_like(x)))

  def compute_loss(self, model, batch, training):
    x, y = batch
    pred = model(x * 0.0 + 1.0, training=training)
    loss = tf.reduce_mean(tf.square(pred - y))
    # The batch index rides along as a metric: the mean of x is the index.
    return loss, {"batch_index": tf.reduce_mean(x)}


def weights(trainer):
  return [v.numpy() for v in trainer.model.weights]


def all_finite(trainer):
  return all(np.all(np.isfinite(v.numpy())) for v in trainer.model.weights) and all(
    np.all(np.isfinite(v.numpy()))
    for v in trainer.optimizer.variables
    if np.issubdtype(v.numpy().dtype, np.floating)
  )


def fill_the_disk_for(monkeypatch, suffix: str) -> None:
  """Every write to a file whose path ends with `suffix` fails with ENOSPC,
  as a full device (/dev/full) answers; other files are written as usual."""
  from safetrain.storage import files as storage_files

  real = storage_files._write_all

  def full(fd, data, path):
    if path.endswith(suffix):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real(fd, data, path)

  monkeypatch.setattr(storage_files, "_write_all", full)
