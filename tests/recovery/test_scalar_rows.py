"""Bad rows in a scalar loss (issue 21 item 5): a compute_loss returning one
number that is non-finite because of a few rows. Once a batch's failure is
shown bound to its rows, the step evaluates a non-finite scalar loss per row
and trains on the finite rows, as it does for per-example losses, instead
of quarantining every such batch until the run is judged diverging."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import tiny_config

import safetrain


def records(workdir, name="incidents.jsonl"):
  return safetrain.read_jsonl(os.path.join(workdir, name))


def data(n=512, every=16, seed=0):
  """Regression rows; every `every`-th row is an outlier the loss cannot take."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (x @ np.array([[1.0], [-2.0], [0.5], [1.5]], np.float32)).astype(np.float32)
  return x, y, np.arange(n) % every == 3


class LogTargets(safetrain.Trainer):
  """Fits log-targets inside its loss (a log-normal regression); a few
  targets are 0 (a missing value written as 0), so log(0) = -inf makes the
  batch's scalar loss inf. The input guard sees only finite numbers."""

  every = 16  # every batch of 32 holds two such rows

  def build_model(self):
    return keras.Sequential(
      [keras.Input((4,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(1)]
    )

  def build_train_dataset(self):
    x, y, odd = data(every=self.every)
    y = np.exp(y / 4).astype(np.float32)
    y[odd] = 0.0
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
    return ds.batch(self.config.train.batch_size, drop_remainder=True)

  def compute_loss(self, model, batch, training):
    x, y = batch
    return tf.reduce_mean(tf.square(model(x, training=training) - tf.math.log(y) * 4))


class SparseLogTargets(LogTargets):
  """One such row in every other batch: each bad batch is isolated (the
  next one trains), so no run of failures reaches triage; the remedy's own
  row probe of the quarantined batch finds the row."""

  every = 64


class SaturatedBCE(safetrain.Trainer):
  """The seed article's hand-written binary cross-entropy, unclipped: rows
  with a huge (finite) feature saturate the sigmoid to exactly 0 or 1, and
  log(0) (or 0 * log(0)) makes the batch's scalar loss NaN or inf."""

  def build_model(self):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])

  def build_train_dataset(self):
    x, y, odd = data(every=32)
    x[odd, 0] = 1e4
    labels = (y > 0).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, labels)).repeat()
    return ds.batch(self.config.train.batch_size, drop_remainder=True)

  def compute_loss(self, model, batch, training):
    x, y = batch
    p = model(x, training=training)
    return -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))


def config(trainer, **overrides):
  return tiny_config(
    **{
      "trainer": trainer,
      "train.steps": 60,
      "train.steps_per_loop": 10,
      "train.batch_size": 32,
      "checkpoint.every_steps": 20,
      "optimizer.learning_rate": 0.05,
      **overrides,
    }
  )


@pytest.mark.parametrize("trainer", [LogTargets, SparseLogTargets, SaturatedBCE])
def test_a_scalar_loss_bad_on_a_few_rows_trains_on_the_rest(workdir, trainer):
  t = trainer(config(trainer.__name__), workdir)
  result = t.fit()
  assert result.step == 60
  incidents = records(workdir)
  (turned_on,) = [r for r in incidents if r["action"] == "row_losses"]
  assert turned_on["cause"] == "bad_batch" and turned_on["rows"]
  assert not [r for r in incidents if r["action"] in ("rollback", "abort")]
  dropped = [r for r in incidents if r["action"] == "dropped_examples"]
  # The batches after the remedy hold 1 or 2 bad rows: dropped, the rest trained.
  assert sum(r["examples"] for r in dropped) >= 20
  assert result.loss is not None and np.isfinite(result.loss)
  assert all(np.isfinite(w.numpy()).all() for w in t.model.weights)
  # Few batches were lost before the remedy (the first loop's at most).
  quarantined = [r for r in incidents if r["action"] == "quarantined_batch"]
  assert sum(r.get("count", 1) for r in quarantined) <= 10
  assert max(r["step"] for r in quarantined) <= turned_on["step"]


def test_without_the_remedy_every_batch_is_lost(workdir):
  """What the remedy changes: with guard.drop_examples off every batch
  holding a bad row fails, and no batch of this data trains."""
  c = config("LogTargets", **{"guard.drop_examples": False})
  with pytest.raises(safetrain.DivergenceError):
    LogTargets(c, workdir).fit()
  assert not [r for r in records(workdir) if r["action"] == "row_losses"]


def test_too_many_bad_rows_are_not_dropped(workdir):
  """A batch with more than guard.max_dropped_examples bad rows is not a few
  bad examples: the step fails as before, after the remedy is on."""
  c = config("LogTargets", **{"guard.max_dropped_examples": 0.01})
  with pytest.raises(safetrain.DivergenceError):
    LogTargets(c, workdir).fit()
  assert not [r for r in records(workdir) if r["action"] == "dropped_examples"]


def test_the_remedy_is_kept_on_resume(workdir):
  LogTargets(config("LogTargets", **{"train.steps": 30}), workdir).fit()
  first = records(workdir)
  assert [r["action"] for r in first].count("row_losses") == 1
  resumed = LogTargets(config("LogTargets"), workdir)
  result = resumed.fit()
  assert result.step == 60
  later = [r for r in records(workdir) if r["step"] > 30]
  # Turned on from the records at the start: no batch of the resumed
  # process is quarantined for its rows, and the remedy is not recorded again.
  assert [r["action"] for r in later] and {r["action"] for r in later} == {"dropped_examples"}
