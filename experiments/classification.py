"""Classification: an MLP on three interleaved spirals (made in code).

Run:
  safetrain --config=experiments/classification.py --workdir=runs/spirals

What to expect: a healthy run. Zero incidents, accuracy above 0.9 after the
default 3000 steps (about a minute on 2 CPU cores), loss and accuracy in
`WORKDIR/metrics.jsonl` and TensorBoard (`tensorboard --logdir WORKDIR/events`).
Try `--config.precision.policy=mixed_float16` to see the loss scale in the
metrics, or `--config.drill.loss_steps=500-503` to watch a rollback.

Short variant for tests: `--config=experiments/classification.py:smoke`.
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

# The :ARG words get_config accepts (--config=FILE:WORD).
ARGS = ("smoke",)


def get_config(arg=None):
  config = safetrain.default_config()
  config.trainer = "SpiralTrainer"
  config.loss = "softmax_cross_entropy"
  config.train.steps = 3000
  config.train.batch_size = 128
  config.train.steps_per_loop = 100
  config.train.log_every_steps = 500
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 100
  config.checkpoint.every_steps = 1000
  config.eval.every_steps = 1000
  config.eval.steps = 0
  if arg == "smoke":
    config.train.steps = 60
    config.train.steps_per_loop = 20
    config.optimizer.warmup_steps = 10
    config.checkpoint.every_steps = 30
    config.eval.every_steps = 30
  return config


def make_spirals(n: int, seed: int, classes: int = 3):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, classes, size=n)
  r = rng.uniform(0.05, 1.0, size=n)
  theta = 4.0 * r + 2.0 * np.pi * label / classes + rng.normal(0, 0.15, size=n)
  x = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).astype(np.float32)
  return x, label.astype(np.int32)


class SpiralTrainer(safetrain.Trainer):
  """A 2-64-64-3 MLP; reports accuracy next to the loss."""

  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((2,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(3),
      ]
    )

  def build_train_dataset(self):
    x, y = make_spirals(6000, self.config.seed)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(6000, seed=self.config.seed)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)

  def build_eval_dataset(self):
    x, y = make_spirals(1500, self.config.seed + 1)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(500)

  def compute_loss(self, model, batch, training):
    x, y = batch
    logits = tf.cast(model(x, training=training), tf.float32)
    loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    accuracy = tf.reduce_mean(
      tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.float32)
    )
    return tf.reduce_mean(loss), {"accuracy": accuracy}
