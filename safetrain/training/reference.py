"""The loss a learning run must get below (`guard.learn_*`, the
`not_learning` check): the trivial predictor's, or the initial weights'.

For the keras losses the default `compute_loss` computes, the best constant
prediction is known in closed form from the targets: their mean (squared
error, Poisson), their median (absolute error), their label frequencies
(the cross-entropies, as probabilities or as logits). Its loss, through the
run's own loss function on the first batch, is what predicting without
looking at the inputs costs; a model that does no better has learned
nothing. For any other loss the reference is the loss at the initial
weights, which a learning run leaves behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from safetrain.training import data as data_lib


@dataclasses.dataclass(frozen=True)
class Reference:
  """What a run must get below: `loss`, and what it is the loss of."""

  loss: float
  what: str


_EPS = 1e-7
_MEAN = ("mse", "mean_squared_error", "poisson", "huber", "log_cosh", "logcosh")
_MEDIAN = ("mae", "mean_absolute_error")
_SPARSE = {"sparse_categorical_crossentropy": False, "softmax_cross_entropy": True}
_ONE_HOT = {"categorical_crossentropy": False}
_BINARY = {"binary_crossentropy": False, "sigmoid_cross_entropy": True}


def _constant(loss: str, y: np.ndarray, pred_shape) -> tuple[np.ndarray, str] | None:
  """The best constant prediction for `loss` on targets `y`, shaped like one
  row of the model's output, and what it is; None for another loss."""
  width = pred_shape[-1] if len(pred_shape) > 1 else None
  if loss in _MEAN:
    return np.mean(y, axis=0), "predicting the targets' mean"
  if loss in _MEDIAN:
    return np.median(y, axis=0), "predicting the targets' median"
  if loss in _SPARSE and width:
    labels = y.reshape(-1).astype(np.int64)
    if labels.min() < 0 or labels.max() >= width:
      return None
    freq = np.bincount(labels, minlength=width) / labels.size
    freq = np.clip(freq, _EPS, 1.0)
    freq = freq / freq.sum()
    pred = np.log(freq) if _SPARSE[loss] else freq
    return pred, "predicting the label frequencies"
  if loss in _ONE_HOT:
    freq = np.clip(np.mean(y.reshape(-1, y.shape[-1]), axis=0), _EPS, 1.0)
    return freq / freq.sum(), "predicting the label frequencies"
  if loss in _BINARY:
    p = np.clip(np.mean(y, axis=0), _EPS, 1 - _EPS)
    pred = np.log(p / (1 - p)) if _BINARY[loss] else p
    return pred, "predicting the positive rate"
  return None


def trivial(loss: str, loss_fn: Callable, model, batch) -> Reference | None:
  """The trivial predictor's loss on `batch` through `loss_fn` (the run's
  per-example loss, `losses.make_loss(loss)`), or None when `loss` has no
  closed-form constant or the batch is not (x, y[, w]) with one output."""
  try:
    x, y, _ = data_lib.unpack_batch(batch)
  except ValueError:
    return None
  if tf.nest.is_nested(y):
    return None
  y = np.asarray(y)
  if y.size == 0 or not np.issubdtype(y.dtype, np.number) or not np.isfinite(y).all():
    return None
  shape = getattr(model, "output_shape", None)
  if not isinstance(shape, tuple) or tf.nest.is_nested(shape[0]):
    return None
  found = _constant(loss, y, shape)
  if found is None:
    return None
  constant, what = found
  pred = np.broadcast_to(np.asarray(constant, np.float32), (y.shape[0], *shape[1:]))
  value = float(tf.reduce_mean(loss_fn(tf.constant(y), tf.constant(pred))))
  return Reference(value, what) if np.isfinite(value) else None


def initial(mean_loss: Callable, model, batch) -> Reference | None:
  """The loss at the initial weights on `batch` (`mean_loss`: the trainer's
  compute_loss as a mean), or None when it is not finite."""
  try:
    value = float(mean_loss(model, batch, False)[0])
  except (ValueError, TypeError, tf.errors.OpError) as e:
    logging.info("not_learning check off: the initial loss could not be computed (%s)", e)
    return None
  return Reference(value, "the initial weights") if np.isfinite(value) else None
