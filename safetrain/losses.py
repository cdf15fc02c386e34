"""The loss of the default `Trainer.compute_loss`, from `config.loss`."""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from safetrain import compat
from safetrain.config import ConfigError


def make_loss(name: str) -> Callable:
  """A loss `fn(y, pred, sample_weight=None) -> mean` named by `config.loss`:
  any keras.losses name, softmax_cross_entropy or sigmoid_cross_entropy."""
  if name == "softmax_cross_entropy":
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  if name == "sigmoid_cross_entropy":
    return keras.losses.BinaryCrossentropy(from_logits=True)
  try:
    fn = keras.losses.get(name)
  except ValueError as e:
    raise ConfigError(
      "loss", name, "a keras.losses name, softmax_cross_entropy or sigmoid_cross_entropy"
    ) from e
  if isinstance(fn, keras.losses.Loss):
    return fn

  def mean_loss(y, pred, sample_weight=None):
    per_example = tf.cast(fn(y, pred), tf.float32)
    if sample_weight is not None:
      per_example = per_example * tf.cast(sample_weight, tf.float32)
    return tf.reduce_mean(per_example)

  return mean_loss


def regularization_loss(model: keras.Model) -> tf.Tensor:
  """The sum of `model.losses` in float32, as Keras `fit` adds it."""
  losses = [tf.reduce_sum(tf.cast(term, tf.float32)) for term in model.losses]
  if not losses:
    return tf.constant(0.0)
  # A sum of a stacked vector, not tf.add_n: an AddN of many terms inside the
  # compiled loop is what Grappler rewrites into temporary variables.
  return tf.reduce_sum(tf.stack(losses))


def float32_predictions(pred):
  """The model's predictions in float32, for the loss.

  A softmax or sigmoid head computed in float16 (as every layer is under
  mixed_float16 unless given dtype="float32") is recomputed in float32 from
  its logits instead of cast. A cast hides the Softmax/Sigmoid op from Keras's
  cross-entropy, which then takes log(p) of the rounded probabilities, and its
  gradient -1/p, cast back to float16 on the way to the head, overflows once
  a true class's probability is small (p < loss scale / (batch * 65504)): a
  loss scale driven to its floor by a model that is merely confidently wrong.
  The recomputed float32 softmax/sigmoid carries its logits as Keras's own
  activations do, so Keras's cross-entropy works from the logits. Other
  outputs are cast; float32 outputs are returned as they are.
  """

  def one(p):
    if not isinstance(p, tf.Tensor) or p.dtype == tf.float32 or not p.dtype.is_floating:
      return tf.cast(p, tf.float32)
    found = compat.activation_input(p)
    if found is None:
      return tf.cast(p, tf.float32)
    logits, activation = found
    logits = tf.cast(logits, tf.float32)
    if activation == "Softmax":
      return keras.activations.softmax(logits)
    return keras.activations.sigmoid(logits)

  return tf.nest.map_structure(one, pred)
