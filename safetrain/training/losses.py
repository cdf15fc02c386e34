"""The loss of the default `Trainer.compute_loss`, from `config.loss`.

It is computed per example: the compiled step takes the mean over the
examples whose loss is finite (see `safetrain.examples`), which with every
example finite is exactly the mean Keras `fit` minimizes (Keras's
"sum_over_batch_size": sample weights multiply, the count divides).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import keras
import tensorflow as tf

from safetrain.core import boundary, compat
from safetrain.core.config import ConfigError
from safetrain.core.errors import BadInputError
from safetrain.step import per_example as examples
from safetrain.training import data as data_lib


class _PerExample(keras.losses.Loss):
  """A keras.losses function as an unreduced Loss (Keras applies the sample
  weights and casts, as it does for `model.compile(loss=name)`)."""

  def __init__(self, fn: Callable):
    super().__init__(reduction=None, name=getattr(fn, "__name__", "loss"))
    self.fn = fn

  def call(self, y_true, y_pred):
    return self.fn(y_true, y_pred)


def make_loss(name: str) -> Callable:
  """A loss `fn(y, pred, sample_weight=None) -> float32 per-example losses`
  named by `config.loss`: any keras.losses name, softmax_cross_entropy or
  sigmoid_cross_entropy. Per-example means shape [batch] (or [batch, ...] for
  per-timestep losses, which the step averages per example)."""
  if name == "softmax_cross_entropy":
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
  elif name == "sigmoid_cross_entropy":
    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)
  else:
    try:
      fn = keras.losses.get(name)
    except ValueError as e:
      raise ConfigError(
        "loss", name, "a keras.losses name, softmax_cross_entropy or sigmoid_cross_entropy"
      ) from e
    if fn is None:
      raise ConfigError(
        "loss", name, "a keras.losses name, softmax_cross_entropy or sigmoid_cross_entropy"
      )
    if isinstance(fn, keras.losses.Loss):
      loss = copy.copy(fn)
      loss.reduction = "none"
    else:
      loss = _PerExample(fn)

  def per_example(y, pred, sample_weight=None):
    return tf.cast(loss(y, pred, sample_weight=sample_weight), tf.float32)

  return per_example


# config.loss names whose labels are class indices: sparse categorical
# cross-entropy, on probabilities or (softmax_cross_entropy) on logits.
SPARSE_CATEGORICAL = (
  "sparse_categorical_crossentropy",
  "SparseCategoricalCrossentropy",
  "softmax_cross_entropy",
)


def takes_class_indices(name: str) -> bool:
  """Whether `config.loss` takes integer class labels in [0, num_classes)
  (what the input check holds labels to)."""
  return name in SPARSE_CATEGORICAL


def num_classes(model: keras.Model, x) -> int | None:
  """The last dimension of the model's (single) output: from
  `model.output_shape`, or from its output on `x` (the first batch's
  features) when the model declares none. None for several outputs."""
  try:
    shape = model.output_shape
  except (AttributeError, ValueError):
    shape = None
  if not (isinstance(shape, tuple) and shape and isinstance(shape[-1], int)):
    pred = model(x, training=False)
    if not isinstance(pred, tf.Tensor) or not pred.shape.rank:
      return None
    shape = tuple(pred.shape)
  return int(shape[-1]) if isinstance(shape[-1], int) else None


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


class Float32Outputs:
  """The model as a custom `compute_loss` sees it under a mixed policy: its
  outputs come back in float32 (`float32_predictions`), as Keras's loss
  wrapper hands a loss function float32 predictions, so a loss copied from a
  Keras script (a `log(softmax(...))`, a hand-written log-sum-exp) runs in the
  precision it ran in there. Everything else (variables, layers, `losses`)
  is the model's own.
  """

  def __init__(self, model: keras.Model):
    self._model = model

  # safetrain's code is traced as written; AutoGraph converts only the
  # user's compute_loss that calls this.
  @tf.autograph.experimental.do_not_convert
  def __call__(self, *args, **kwargs):
    return float32_predictions(self._model(*args, **kwargs))

  def __getattr__(self, name: str):
    return getattr(self._model, name)

  def __repr__(self) -> str:
    return f"Float32Outputs({self._model!r})"


def float32_view(model: keras.Model):
  """`model`, or a `Float32Outputs` view of it when it computes in a lower
  precision (mixed_float16, mixed_bfloat16)."""
  compute = getattr(model, "compute_dtype", "float32")
  return model if compute in ("float32", "float64") else Float32Outputs(model)


def default_loss(loss_fn: Callable, regularization: Callable, model, batch, training: bool):
  """The default `Trainer.compute_loss`, and the predictions it made (for the
  stateful metrics): `loss_fn` (`make_loss`) per example, plus
  `regularization(model)` (`Trainer.regularization_loss`)."""
  x, y, sample_weight = data_lib.unpack_batch(batch)
  pred = model(x, training=training)
  pred = float32_predictions(pred)
  per_example = loss_fn(y, pred, sample_weight=sample_weight)
  return per_example + regularization(model), pred


def normalised(compute_loss: Callable, default_loss: Callable | None, *, trainer: str):
  """(`call_per_example`, `call_mean`) for a trainer's compute_loss hook."""
  hook = dict(compute_loss=compute_loss, default_loss=default_loss, trainer=trainer)
  return functools.partial(call_per_example, **hook), functools.partial(call_mean, **hook)


def call_per_example(
  model, batch, training, with_pred: bool = False, *, compute_loss, default_loss, trainer: str
):
  """A trainer's compute_loss, normalised to (float32 loss or per-example
  losses, {name: float32 metric}), and y_pred as a third element `with_pred`
  (for the stateful metrics): what the compiled step takes.

  Args:
    model, batch, training: compute_loss's arguments.
    with_pred: also return y_pred (ConfigError when compute_loss has none).
    compute_loss: the trainer's hook.
    default_loss: for a trainer that keeps the default compute_loss, the
      `(loss, y_pred)` it is made of, else None.
    trainer: the Trainer class's name, for the error message.
  """
  if with_pred and default_loss is not None:
    (loss, pred), metrics_ = default_loss(model, batch, training), {}
  else:
    out = compute_loss(model, batch, training)
    if not isinstance(out, (tuple, list)):
      out = (out, {})
    loss, metrics_, pred = (*out, None) if len(out) == 2 else out
  result = tf.cast(loss, tf.float32), {k: tf.cast(v, tf.float32) for k, v in metrics_.items()}
  if not with_pred:
    return result
  if pred is None:
    raise ConfigError(
      "trainer",
      trainer,
      "build_metrics() needs y_pred: compute_loss must return (loss, metrics, y_pred)",
    )
  return (*result, pred)


def call_mean(model, batch, training, with_pred: bool = False, **hook):
  """`call_per_example` (same `hook` arguments), with per-example losses
  averaged plainly (a NaN stays NaN): (float32 mean loss, metrics[, y_pred])."""
  loss, *rest = call_per_example(model, batch, training, with_pred, **hook)
  return (examples.plain_mean(loss), *rest)


def sample_loss(mean_loss: Callable, model, batch, element_spec, *, trainer: str):
  """`mean_loss(model, batch, False)` on the first batch, eagerly. A batch
  that does not fit the model or the loss fails here, as a BadInputError
  naming what the dataset yields (`element_spec`), not later inside the
  compiled step."""
  misfit = (ValueError, TypeError, KeyError, IndexError, tf.errors.OpError)
  try:
    return mean_loss(model, batch, False)
  except (*misfit, boundary.HookError) as e:
    if isinstance(e, BadInputError):
      raise
    if isinstance(e, boundary.HookError):
      if not isinstance(e.error, misfit):
        raise
      e = e.error  # an override's compute_loss that the batch does not fit
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise BadInputError(
      f"the first training batch does not fit {trainer}'s model and "
      f"compute_loss ({type(e).__name__}: {first}). The dataset yields "
      f"{data_lib.describe_spec(element_spec)}; the default compute_loss expects "
      "(x, y), (x, y, sample_weight) or dicts with 'x' and 'y', with x as the model's input."
    ) from e
