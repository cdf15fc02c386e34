"""Rows whose gradient alone is non-finite (issue 21, item 1): the loss is
finite, the gradient is NaN on a few rows (sqrt or a norm at 0). The row
probe takes the gradient of each row's loss, so such batches are bad
batches, quarantined with their rows: no rollback, no learning-rate cut."""

import os

import keras
import numpy as np
import tensorflow as tf
from common import tiny_config

import safetrain

# Batches (0-based positions) that hold a degenerate row, three in a row:
# enough to stop a loop with guard.rollback_after 3.
BAD_POSITIONS = (3, 4, 5)
BATCH = 16


def incidents(workdir):
  return safetrain.read_jsonl(os.path.join(workdir, "incidents.jsonl"))


def quarantine(workdir):
  return safetrain.read_jsonl(os.path.join(workdir, "quarantine.jsonl"))


class SiameseTrainer(safetrain.Trainer):
  """A soft-margin triplet loss on Euclidean distances: where an anchor
  equals its positive, the distance is sqrt(0) and its gradient NaN."""

  def build_model(self):
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="embed")])

  def build_train_dataset(self):
    rng = np.random.default_rng(0)
    n = 64 * BATCH
    anchor = rng.normal(size=(n, 6)).astype(np.float32)
    positive = (anchor + 0.1 * rng.normal(size=(n, 6))).astype(np.float32)
    negative = rng.normal(size=(n, 6)).astype(np.float32)
    for p in BAD_POSITIONS:
      positive[p * BATCH + 2] = anchor[p * BATCH + 2]  # a duplicate pair
    ds = tf.data.Dataset.from_tensor_slices(((anchor, positive, negative), np.zeros(n, np.float32)))
    return ds.batch(BATCH, drop_remainder=True)

  def compute_loss(self, model, batch, training):
    (a, p, n), _ = batch
    ea, ep, en = (
      model(a, training=training),
      model(p, training=training),
      model(n, training=training),
    )
    d_ap = tf.sqrt(tf.reduce_sum(tf.square(ea - ep), axis=1))
    d_an = tf.sqrt(tf.reduce_sum(tf.square(ea - en), axis=1))
    return tf.reduce_mean(tf.math.softplus(d_ap - d_an))


class NormPenaltyTrainer(safetrain.Trainer):
  """A regression with an L2-norm (not squared) penalty on the output rows:
  a row of zero features gives a zero output row, whose norm's gradient is
  0/0."""

  def build_model(self):
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, use_bias=False)])

  def build_train_dataset(self):
    rng = np.random.default_rng(1)
    n = 64 * BATCH
    x = rng.normal(size=(n, 5)).astype(np.float32)
    for p in BAD_POSITIONS:
      x[p * BATCH + 7] = 0.0  # a blank record
    y = (x @ rng.normal(size=(5, 3))).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)

  def compute_loss(self, model, batch, training):
    x, y = batch
    pred = model(x, training=training)
    return tf.reduce_mean(tf.square(pred - y)) + 1e-3 * tf.reduce_mean(tf.norm(pred, axis=1))


def run(trainer_cls, workdir):
  c = tiny_config(
    **{"trainer": trainer_cls.__name__, "train.steps": 20, "train.steps_per_loop": 10}
  )
  return trainer_cls(c, workdir).fit()


def test_a_duplicate_pair_in_a_triplet_loss_is_a_bad_batch_not_a_diverging_state(workdir):
  result = run(SiameseTrainer, workdir)
  assert result.rollbacks == 0 and result.lr_scale == 1.0 and result.step == 20
  assert result.quarantined == 3
  q = quarantine(workdir)
  assert [(r["position"], r["kind"]) for r in q] == [(p, "nonfinite_grads") for p in BAD_POSITIONS]
  # The probe named the row of the batch that ended the run of failures.
  assert q[-1]["rows"] == [2]
  decided = [r for r in incidents(workdir) if r["action"] == "quarantined_batch"]
  assert decided and all(r["cause"] == "bad_batch" for r in decided)
  assert "SqrtGrad" in decided[-1]["diagnosis"]  # forensics names the op


def test_a_blank_record_under_a_norm_penalty_is_a_bad_batch(workdir):
  result = run(NormPenaltyTrainer, workdir)
  assert result.rollbacks == 0 and result.lr_scale == 1.0 and result.step == 20
  assert result.quarantined == 3
  assert quarantine(workdir)[-1]["rows"] == [7]
