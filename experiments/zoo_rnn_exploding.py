"""Failure zoo 6: exploding gradients in a recurrent network.

The "nan nan output" answer's LSTM whose "gradients were literally blowing
up", made reproducible: a ReLU SimpleRNN with identity recurrent
initialisation (the IRNN of Le, Jaitly & Hinton, 2015) reads 50 daily values
in [0, 1] and predicts their total, trained with plain SGD and no clipping.
The identity recurrence carries the state through all 50 steps without decay,
so the first gradients have a norm of ~1e4 and one step pushes the recurrent
weights past spectral radius 1; from then on the state and the gradients grow
like radius^50. Plain Keras (`model.compile(SGD(0.001), "mse");
model.fit(...)`) reports a loss of ~430 at step 1 and NaN from step 2 on, at
0.01 as at 0.001.

What safetrain does: clips the global gradient norm to `clip.global_norm=1.0`
(the default), so every update is at most 0.001 long, and the guard and
recovery stand behind it (a non-finite step is skipped; `guard.rollback_after`
in a row roll back with a lower learning rate). Here clipping alone keeps the
run finite: zero incidents, and the MSE falls from ~430 to ~1.1 in 100 steps
and ~1.0 in 300 (predicting the mean total scores 4.0). With
`--config.clip.global_norm=0` safetrain meets the plain-Keras failure:
`nonfinite_loss`, `nonfinite_grads` and `loss_spike` incidents, 5 rollbacks,
and a stop with exit code 3 once the recovery budget is spent.

Run:
  safetrain --config=experiments/zoo_rnn_exploding.py --workdir=runs/zoo_rnn

What to expect: exit code 0, no incidents, `grad_norm` in metrics.jsonl in
the thousands (each update clipped to norm 1.0), the loss falling.

Short variant for tests: `--config=experiments/zoo_rnn_exploding.py:smoke`.
"""

import keras
import numpy as np
import tensorflow as tf

import safetrain

SEQ_LEN = 50


# The :ARG words get_config accepts (--config=FILE:WORD).
ARGS = ("smoke",)


def get_config(arg=None):
  config = safetrain.default_config()
  config.trainer = "SequenceSumTrainer"
  config.loss = "mse"
  config.train.steps = 300
  config.train.batch_size = 32
  config.train.steps_per_loop = 50
  config.train.log_every_steps = 50
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.001
  config.clip.global_norm = 1.0
  config.checkpoint.every_steps = 100
  if arg == "smoke":
    config.train.steps = 100
    config.checkpoint.every_steps = 50
  return config


def make_data(n: int, seed: int, seq_len: int = SEQ_LEN):
  """Sequences of daily values in [0, 1]; the target is their total."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 1.0, size=(n, seq_len, 1)).astype(np.float32)
  return x, x.sum(axis=1)


def make_model(seq_len: int = SEQ_LEN) -> keras.Model:
  return keras.Sequential(
    [
      keras.Input((seq_len, 1)),
      keras.layers.SimpleRNN(
        32, activation="relu", recurrent_initializer=keras.initializers.Identity(), name="irnn"
      ),
      keras.layers.Dense(1),
    ]
  )


class SequenceSumTrainer(safetrain.Trainer):
  """An IRNN summing a sequence."""

  def build_model(self):
    return make_model()

  def build_train_dataset(self):
    x, y = make_data(2048, self.config.seed)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(2048, seed=self.config.seed)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)
