"""`safetrain.fit`: a compiled Keras model trained as `model.fit` takes it.

The data, loss and metrics are Keras's; the loop is safetrain's. `fit()`
turns its arguments into a config and a private `Trainer` subclass
(`_FitTrainer`), so the run has the same workdir, guard, recovery, resume,
records and export as any Trainer run.

What comes from Keras, and how (Keras 3, `keras/src/trainers`):

- **The loss** is the model's `compile()` loss, computed by a copy of the
  model's `CompileLoss` (the same structure matching of `y` to the outputs,
  the same loss objects, `loss_weights`), plus `model.losses`, as
  `Model.compute_loss` adds them. Where every compiled loss reduces with
  "sum_over_batch_size" (the default) and no output carries a Keras mask,
  the copy computes per-example values (the losses with reduction None,
  averaged over the non-batch axes, summed over the outputs with their
  weights): their mean is Keras's loss, and the guard can drop non-finite
  examples (`guard.drop_examples`). Otherwise the loss is Keras's scalar and
  a batch with a non-finite loss is skipped whole.
- **The metrics** are fresh copies of the compiled ones (`CompileMetrics`),
  with Keras's loss tracker (`keras_loss` in the records: the mean over the
  examples, batches weighted by their size) and, for several outputs, the
  per-output losses (`NAME_loss`). Training metrics accumulate over an epoch
  as Keras's do (reset when an epoch starts, and after a rollback).
- **The data**: arrays (numpy, tensors, lists and dicts of them) are batched
  as Keras's array adapter batches them (`batch_size` default 32, the last
  batch partial); a `tf.data.Dataset` is used as it is. `class_weight`
  becomes sample weights as Keras computes them (`config.class_weight`, in
  `training/data.py`).
- **Epochs** map onto steps: an epoch is `steps_per_epoch` steps, or one pass
  over the data; `train.steps = epochs * steps_per_epoch` (or `steps`), and
  the evaluation (validation) runs every epoch (`eval.every_steps`), every
  `validation_freq` epochs as Keras does, at the end of the epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable

import keras
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from keras.src import backend as keras_backend
from keras.src.losses import loss as loss_module
from keras.src.trainers import compile_utils

from safetrain.core import compat
from safetrain.core import config as config_lib
from safetrain.results import FitResult
from safetrain.step import batch_checks
from safetrain.storage.jsonl import read_jsonl
from safetrain.trainer import Trainer
from safetrain.training import losses as losses_lib
from safetrain.training import optimizers as optimizers_lib
from safetrain.training import reference as reference_lib

__all__ = ["KerasFitResult", "fit"]

# The records' name of Keras's loss tracker (`loss` is safetrain's own: the
# mean over a loop's good steps, each step counting once).
KERAS_LOSS = "keras_loss"


@dataclasses.dataclass
class KerasFitResult(FitResult):
  """What `safetrain.fit` returns: a `FitResult`, plus `history`.

  Attributes:
    history: per epoch, as Keras's `History.history`: `loss` (Keras's: the
      mean over the epoch's examples), each compiled metric, the per-output
      losses of a multi-output model, and `val_*` for the epochs that
      validated. Read from the workdir's metrics.jsonl, so it spans resumes;
      after a rollback within an epoch, that epoch's training numbers count
      from the restored step.
    steps_per_epoch: the steps one epoch is.
  """

  history: dict = dataclasses.field(default_factory=dict)
  steps_per_epoch: int = 0


def fit(
  model: keras.Model,
  x=None,
  y=None,
  *,
  validation_data=None,
  workdir: str,
  steps: int | None = None,
  epochs: int | None = None,
  batch_size: int | None = None,
  steps_per_epoch: int | None = None,
  shuffle: bool | str = True,
  sample_weight=None,
  class_weight: dict | None = None,
  validation_split: float = 0.0,
  validation_steps: int | None = None,
  validation_batch_size: int | None = None,
  validation_freq: int = 1,
  callbacks: list | None = None,
  config: ml_collections.ConfigDict | None = None,
) -> KerasFitResult:
  """Trains a compiled Keras model as `model.fit` would, under safetrain.

  The arguments mean what they mean to `model.fit`, and the run is a
  safetrain run in `workdir`: checked steps, rollback and recovery, records,
  checkpoints, and the model exported to `WORKDIR/export/model.keras`. Call
  it again with the same workdir (and a model compiled the same way) to
  resume; with more `epochs` to train on.

  Args:
    model: a Keras model. Its `compile()` loss, metrics and optimizer are
      used; what it was not compiled with comes from `config` (`config.loss`,
      `config.optimizer`). Trained in place, on one device.
    x, y: the training data as `model.fit` takes it: arrays (numpy or
      tensors; lists, tuples or dicts of them for several inputs or
      outputs), or a `tf.data.Dataset` of `(x, y)` or `(x, y,
      sample_weight)` batches (then `y` stays None).
    validation_data: `(x_val, y_val)`, `(x_val, y_val, sample_weight)` or a
      `tf.data.Dataset`, evaluated at the end of every epoch.
    workdir: the run's directory (see docs/workdir.md).
    steps: total updates to train to (instead of `epochs`).
    epochs: epochs to train to, counting those of earlier calls on this
      workdir (default 1).
    batch_size: rows per batch for arrays (default 32).
    steps_per_epoch: steps in one epoch (default: one pass over the data).
    shuffle: arrays only: True draws a new order of the examples every epoch
      (from `config.seed`), "batch" shuffles within each batch, False keeps
      the order.
    sample_weight: per-example weights for arrays (one array per output, or
      one for all).
    class_weight: {class index: weight}, as Keras applies it: multiplied
      into the sample weights of the training batches.
    validation_split: the last fraction of the arrays to validate on.
    validation_steps: batches per validation (default: all).
    validation_batch_size: rows per validation batch for arrays (default
      `batch_size`).
    validation_freq: validate every this many epochs.
    callbacks: Keras callbacks (see docs/callbacks.md).
    config: a `safetrain.default_config()` for everything else (guard,
      recovery, checkpoints, clipping: `clip.global_norm=0` for Keras's
      numbers). fit() sets `train.steps`, `train.batch_size`,
      `train.steps_per_loop` (at most an epoch), `eval.every_steps`,
      `eval.steps`, `class_weight`, `precision.policy` (the model's) and
      `distribute.strategy` (one device) from its arguments.

  Returns:
    A `KerasFitResult` (a `FitResult` with Keras's `history`). Raises what
    `Trainer.fit()` raises (`DivergenceError` when recovery is spent, ...),
    and ValueError or ConfigError naming a bad argument.
  """
  config = copy.deepcopy(config) if config is not None else config_lib.default_config()
  config_lib.validate(config)
  _check_arguments(
    model,
    config,
    steps=steps,
    epochs=epochs,
    shuffle=shuffle,
    positive=dict(
      steps=steps,
      epochs=epochs,
      batch_size=batch_size,
      steps_per_epoch=steps_per_epoch,
      validation_steps=validation_steps,
      validation_batch_size=validation_batch_size,
      validation_freq=validation_freq,
    ),
  )
  try:
    # The argument, as in Keras; else the config's (a Trainer user's key).
    class_weight = config_lib.class_weights(
      config.class_weight if class_weight is None else class_weight, field="class_weight"
    )
  except config_lib.ConfigError as e:
    raise ValueError(f"safetrain.fit: class_weight={e.value!r} is invalid: {e.allowed}") from None

  if validation_split:
    if not 0.0 < validation_split < 1.0:
      raise ValueError(f"safetrain.fit: validation_split must be in (0, 1); got {validation_split}")
    if validation_data is not None:
      logging.warning("safetrain.fit: validation_data given, so validation_split is not used")
    elif _is_dataset(x):
      raise ValueError(
        "safetrain.fit: validation_split is only supported for arrays, not a tf.data.Dataset "
        "(pass validation_data)"
      )
    else:
      (x, y, sample_weight), validation_data = _split(x, y, sample_weight, validation_split)

  train = _data(
    x,
    y,
    sample_weight,
    batch_size=batch_size,
    steps=steps_per_epoch,
    shuffle=shuffle,
    seed=config.seed,
    what="the training data",
  )
  validation = None
  if validation_data is not None:
    validation = _validation(validation_data, validation_batch_size or train.batch_size)
  epoch_steps = _steps_per_epoch(train, steps_per_epoch)
  total = steps if steps is not None else (epochs or 1) * epoch_steps

  config.train.steps = int(total)
  config.train.steps_per_loop = int(min(config.train.steps_per_loop, epoch_steps))
  if train.batch_size:
    config.train.batch_size = int(train.batch_size)
  # An evaluation ends every epoch (and Keras callbacks see it as the epoch's
  # end), with or without validation data; _FitTrainer.evaluate validates on
  # the epochs Keras validates on.
  config.eval.every_steps = int(epoch_steps)
  config.eval.steps = int(validation_steps or 0)
  config.class_weight = class_weight
  config.precision.policy = _policy(model)
  config.distribute.strategy = "one_device"
  config_lib.validate(config)

  trainer = _FitTrainer(
    config,
    workdir,
    model=model,
    train=train,
    validation=validation,
    epoch_steps=epoch_steps,
    validation_freq=validation_freq,
    callbacks=list(callbacks or []),
  )
  result = trainer.fit()
  fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(FitResult)}
  fields["eval_metrics"] = {k: v for k, v in result.eval_metrics.items() if k != KERAS_LOSS}
  return KerasFitResult(
    **fields,
    history=_history(os.fspath(workdir), epoch_steps, validation_freq, trainer.metric_names),
    steps_per_epoch=epoch_steps,
  )


def _check_arguments(model, config, *, steps, epochs, shuffle, positive: dict) -> None:
  """What fit() can be given, checked before any TensorFlow work: one
  ValueError (or ConfigError) naming the argument."""
  if not isinstance(model, keras.Model):
    raise ValueError(f"safetrain.fit needs a keras.Model; got {type(model).__name__}")
  strategy = getattr(model, "_distribute_strategy", None)
  if strategy is not None and strategy is not tf.distribute.get_strategy():
    raise ValueError(
      "safetrain.fit trains on one device, and this model was built under a "
      f"{type(strategy).__name__} scope: to train on several devices, write a "
      "safetrain.Trainer subclass (its build_model runs under safetrain's strategy)"
    )
  if config.distribute.strategy not in ("auto", "one_device") or config.distribute.cpu_replicas > 1:
    raise config_lib.ConfigError(
      "distribute.strategy",
      config.distribute.strategy,
      "safetrain.fit trains the model on its own device (auto or one_device, cpu_replicas "
      "0 or 1); for several devices, write a safetrain.Trainer subclass",
    )
  if steps is not None and epochs is not None:
    raise ValueError("safetrain.fit: pass steps (total updates) or epochs, not both")
  for name, value in positive.items():
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"safetrain.fit: {name} must be an integer >= 1; got {value!r}")
  if shuffle not in (True, False, "batch"):
    raise ValueError(f"safetrain.fit: shuffle must be True, False or 'batch'; got {shuffle!r}")


# ------------------------------------------------------------------ the data


def _is_dataset(x) -> bool:
  return isinstance(x, tf.data.Dataset)


@dataclasses.dataclass
class _Data:
  """A source of batches: `dataset()` builds it (a fresh pipeline each call,
  as Trainer hooks need), `batches` per pass (None: unknown or infinite)."""

  dataset: Callable[[], tf.data.Dataset]
  batches: int | None
  batch_size: int | None
  # A dataset whose length TensorFlow cannot tell (after a filter).
  unknown: bool = False


def _arrays(value, name: str):
  """A structure of arrays as numpy (lists become tuples, as Keras does)."""
  if value is None:
    return None

  def one(a):
    if isinstance(a, (tf.Tensor, tf.Variable)):
      return a.numpy()
    array = np.asarray(a)
    if array.dtype == object:
      raise ValueError(f"safetrain.fit: {name} holds {type(a).__name__}, not numeric arrays")
    return array

  return tf.nest.map_structure(one, _lists_to_tuples(value))


def _lists_to_tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_lists_to_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _lists_to_tuples(v) for k, v in value.items()}
  return value


def _rows(arrays, what: str) -> int:
  sizes = {int(np.shape(a)[0]) if np.ndim(a) else 0 for a in tf.nest.flatten(arrays)}
  if len(sizes) != 1 or 0 in sizes:
    raise ValueError(
      f"safetrain.fit: {what} must be arrays with the same number of rows; got "
      + ", ".join(str(np.shape(a)) for a in tf.nest.flatten(arrays))
    )
  return sizes.pop()


def _data(
  x,
  y,
  sample_weight,
  *,
  batch_size,
  steps,
  shuffle,
  seed: int,
  what: str,
  passes: int | None = None,
) -> _Data:
  """Training or validation data, as Keras's data adapters take it; arrays
  make `passes` passes over their rows (None: one after another, forever)."""
  if x is None:
    raise ValueError(f"safetrain.fit: {what} is missing (x is None)")
  if _is_dataset(x):
    for name, value in (("y", y), ("sample_weight", sample_weight)):
      if value is not None:
        raise ValueError(
          f"safetrain.fit: with x a tf.data.Dataset, {name} must be None: the dataset "
          f"yields it, as in Keras ((x, y) or (x, y, sample_weight) batches)"
        )
    if batch_size is not None:
      logging.warning("safetrain.fit: batch_size is not used with a tf.data.Dataset (batched)")
    return _dataset_data(x, what)
  if y is None:
    raise ValueError(f"safetrain.fit: {what} has no targets: pass y (or a dataset of (x, y))")
  x, y = _arrays(x, "x"), _arrays(y, "y")
  sample_weight = _arrays(sample_weight, "sample_weight")
  if sample_weight is not None and tf.nest.is_nested(y) and not tf.nest.is_nested(sample_weight):
    # One array for every output, as Keras replicates it.
    sample_weight = tf.nest.map_structure(lambda _: sample_weight, y)
  inputs = (x, y) if sample_weight is None else (x, y, sample_weight)
  n = _rows(inputs, what)
  if not batch_size:
    batch_size = int(math.ceil(n / steps)) if steps else 32
  return _Data(
    dataset=lambda: _array_dataset(
      inputs, n, batch_size, shuffle=shuffle, seed=seed, passes=passes
    ),
    batches=int(math.ceil(n / batch_size)),
    batch_size=batch_size,
  )


def _array_dataset(
  inputs, n: int, batch_size: int, *, shuffle, seed: int, passes: int | None
) -> tf.data.Dataset:
  """Batches of `inputs` as Keras's ArrayDataAdapter makes them (full batches
  of `batch_size` rows, then the partial rest), one pass after another.

  Each pass (epoch) `e` orders the rows by a stateless draw from (seed, e),
  so the pipeline has no state outside the graph: its iterator is saved in
  the checkpoints and a resumed run reads exactly the batches it would have.
  """
  full, rest = divmod(n, batch_size)

  def order(epoch):
    rows = tf.range(n, dtype=tf.int64)
    if not shuffle:
      return rows
    key = tf.random.stateless_uniform([n], seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
    if shuffle == "batch":
      # Batches in order, the rows within each one shuffled.
      key = tf.cast(rows // batch_size, tf.float32) * 2.0 + key
    return tf.argsort(
      key,
      stable=True,
    )

  def batches(epoch):
    rows = tf.cast(order(epoch), tf.int64)
    head = tf.data.Dataset.from_tensor_slices(tf.reshape(rows[: full * batch_size], [full, -1]))
    if rest:
      head = head.concatenate(tf.data.Dataset.from_tensors(rows[full * batch_size :]))
    return head

  epochs = tf.data.Dataset.counter(dtype=tf.int64)
  if passes is not None:
    epochs = epochs.take(passes)
  indices = epochs.flat_map(batches)
  data = tf.data.Dataset.from_tensors(inputs).repeat()
  dataset = tf.data.Dataset.zip((indices, data))
  return dataset.map(lambda i, d: tf.nest.map_structure(lambda a: tf.gather(a, i), d))


def _dataset_data(dataset: tf.data.Dataset, what: str) -> _Data:
  spec = dataset.element_spec
  if not (isinstance(spec, tuple) and len(spec) in (2, 3)):
    raise ValueError(
      f"safetrain.fit: {what} must yield (x, y) or (x, y, sample_weight) batches; it yields "
      f"{_describe(spec)}"
    )
  cardinality = int(dataset.cardinality())
  # Infinite or unknown: None (an unknown length is counted when an epoch
  # needs it, in _steps_per_epoch).
  batches = cardinality if cardinality >= 0 else None
  rows = {s.shape[0] for s in tf.nest.flatten(spec) if s.shape.rank}
  size = rows.pop() if len(rows) == 1 else None
  return _Data(
    dataset=lambda: dataset,
    batches=batches,
    batch_size=size,
    unknown=cardinality == tf.data.UNKNOWN_CARDINALITY,
  )


def _describe(spec) -> str:
  return str(
    tf.nest.map_structure(
      lambda s: f"{s.dtype.name}{s.shape.as_list()}" if hasattr(s, "dtype") else str(s), spec
    )
  ).replace("'", "")


def _validation(data, batch_size: int) -> _Data:
  """`validation_data` as Keras unpacks it, in order, batched like the training data."""
  if _is_dataset(data):
    return _dataset_data(data, "validation_data")
  if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
    raise ValueError(
      "safetrain.fit: validation_data must be (x_val, y_val), (x_val, y_val, "
      f"sample_weight) or a tf.data.Dataset; got {type(data).__name__}"
    )
  x, y, weights = (*data, None) if len(data) == 2 else data
  return _data(
    x,
    y,
    weights,
    batch_size=batch_size,
    steps=None,
    shuffle=False,
    seed=0,
    what="validation_data",
    passes=1,
  )


def _split(x, y, sample_weight, fraction: float):
  """Keras's validation_split: the last `fraction` of the rows, unshuffled."""
  arrays = (_arrays(x, "x"), _arrays(y, "y"), _arrays(sample_weight, "sample_weight"))
  n = _rows(tuple(a for a in arrays if a is not None), "the training data")
  at = int(math.floor(n * (1.0 - fraction)))
  if at in (0, n):
    raise ValueError(
      f"safetrain.fit: {n} rows cannot be split into training and validation sets with "
      f"validation_split={fraction}"
    )

  def part(a, lo, hi):
    return None if a is None else tf.nest.map_structure(lambda t: t[lo:hi], a)

  train = tuple(part(a, 0, at) for a in arrays)
  val = tuple(a for a in (part(a, at, n) for a in arrays) if a is not None)
  return train, val


def _steps_per_epoch(train: _Data, steps_per_epoch: int | None) -> int:
  """The steps of one epoch, as Keras's EpochIterator counts them."""
  batches = train.batches
  if batches is None and train.unknown and steps_per_epoch is None:
    # Keras finds the length at the end of the first epoch; a run needs it now.
    batches = int(train.dataset().reduce(np.int64(0), lambda n, _: n + 1))
    logging.info("safetrain.fit: the training dataset has %d batches (counted)", batches)
    if batches == 0:
      raise ValueError("safetrain.fit: the training dataset is empty")
  if steps_per_epoch is None:
    if batches is None:
      raise ValueError(
        "safetrain.fit: the training dataset is infinite: pass steps_per_epoch (or steps)"
      )
    return batches
  if batches is not None and steps_per_epoch > batches:
    # Keras ends such an epoch when the data runs out ("Your input ran out of
    # data"), after one pass.
    logging.warning(
      "safetrain.fit: steps_per_epoch=%d is more than the %d batches of the data: an epoch "
      "is one pass (%d steps), as Keras cuts it",
      steps_per_epoch,
      batches,
      batches,
    )
    return batches
  if batches is not None and batches % steps_per_epoch:
    logging.warning(
      "safetrain.fit: steps_per_epoch=%d does not divide the %d batches of the data: "
      "every epoch is %d steps of the repeated data (Keras cuts an epoch short where "
      "the data ends)",
      steps_per_epoch,
      batches,
      steps_per_epoch,
    )
  return steps_per_epoch


def _policy(model: keras.Model) -> str:
  name = getattr(getattr(model, "dtype_policy", None), "name", "float32")
  return name if name in config_lib.POLICIES else "float32"


# ------------------------------------------------------------- Keras's loss


def _per_example_allowed(compile_loss) -> bool:
  """Whether every compiled loss reduces as a mean over its elements, so that
  per-example values averaged are Keras's loss."""
  flat = getattr(compile_loss, "_flat_losses", None)
  if not flat:
    return False
  return all(
    isinstance(entry.loss, keras.losses.Loss)
    and entry.loss.reduction in ("sum_over_batch_size", "mean")
    for entry in flat
  )


class _PerExample:
  """A compiled Keras loss with no reduction, averaged over the non-batch
  axes: one value per example, sample weights applied as Keras applies them
  (`Loss.__call__` with reduction None; the loss object is not copied:
  Keras copies a Loss by serializing it, which a custom class may not allow)."""

  def __init__(self, loss: keras.losses.Loss):
    self.loss = loss
    self.name = loss.name

  def __call__(self, y_true, y_pred, sample_weight=None):
    loss = self.loss
    in_mask = keras_backend.get_keras_mask(y_pred)
    y_pred = tf.nest.map_structure(lambda t: keras.ops.convert_to_tensor(t, loss.dtype), y_pred)
    y_true = tf.nest.map_structure(lambda t: keras.ops.convert_to_tensor(t, loss.dtype), y_true)
    values = loss.call(y_true, y_pred)
    out_mask = keras_backend.get_keras_mask(values)
    mask = in_mask if out_mask is None else (out_mask if in_mask is None else in_mask & out_mask)
    values = loss_module.reduce_weighted_values(
      values, sample_weight=sample_weight, mask=mask, reduction=None, dtype=loss.dtype
    )
    if values.shape.rank and values.shape.rank > 1:
      values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return values


def _copy_compile_loss(model: keras.Model):
  """A new CompileLoss with the model's compiled loss and loss weights (its
  own per-output trackers), or None when the model was compiled without one.

  Why an internal (`keras.src`): Keras 3 has no public way to compute the
  compiled loss without updating the model's own loss trackers, or per example.
  """
  original = getattr(model, "_compile_loss", None)
  if original is None:
    return None
  return compile_utils.CompileLoss(
    original._user_loss, original._user_loss_weights, output_names=original.output_names
  )


def _clone_metrics(metrics):
  """Compile-time metrics with every Metric object replaced by a fresh copy."""

  def one(m):
    if isinstance(m, keras.metrics.Metric):
      return type(m).from_config(m.get_config())
    return m

  if metrics is None:
    return None
  if isinstance(metrics, dict):
    return {
      k: _clone_metrics(v) if isinstance(v, (list, tuple, dict)) else one(v)
      for k, v in metrics.items()
    }
  if isinstance(metrics, (list, tuple)):
    return type(metrics)(
      _clone_metrics(m) if isinstance(m, (list, tuple, dict)) else one(m) for m in metrics
    )
  return one(metrics)


class _KerasLoss:
  """The model's compiled loss plus `model.losses`, as Keras computes it,
  per example where that gives Keras's mean."""

  def __init__(self, model: keras.Model, y, y_pred, sample_weight):
    self.scalar = _copy_compile_loss(model)
    self.per_example = _copy_compile_loss(model)
    # Built eagerly on the first batch (Keras builds on the first call).
    self.scalar(y, y_pred, sample_weight)
    self.per_example(y, y_pred, sample_weight)
    if _per_example_allowed(self.per_example):
      flat = self.per_example._flat_losses
      flat[:] = [entry._replace(loss=_PerExample(entry.loss)) for entry in flat]
    else:
      self.per_example = None
      logging.info(
        "safetrain.fit: the compiled loss is not a mean over elements (a reduction other "
        "than sum_over_batch_size): a batch whose loss is not finite is skipped whole"
      )

  def __call__(self, y, y_pred, sample_weight):
    masked = any(keras_backend.get_keras_mask(p) is not None for p in tf.nest.flatten(y_pred))
    if self.per_example is not None and not masked:
      return self.per_example(y, y_pred, sample_weight)
    return self.scalar(y, y_pred, sample_weight)


class _KerasMetrics:
  """Keras's metrics of one set (training or evaluation): its loss tracker,
  the per-output losses and fresh copies of the compiled metrics, updated
  from `(y, y_pred, sample_weight)` as Keras's train and test steps do."""

  def __init__(self, model: keras.Model, y, y_pred, sample_weight, *, reset_now: Callable):
    self._model = model
    self._reset_now = reset_now
    self.tracker = keras.metrics.Mean(name="loss")
    self.loss = _copy_compile_loss(model)
    original = getattr(model, "_compile_metrics", None)
    self.compiled = None
    if original is not None:
      self.compiled = compile_utils.CompileMetrics(
        _clone_metrics(original._user_metrics),
        _clone_metrics(original._user_weighted_metrics),
        output_names=original.output_names,
      )
    # Built eagerly on the first batch, then emptied.
    self.update(y, y_pred, sample_weight)
    self.names = list(self._results())
    self.reset(force=True)

  def update(self, y, y_pred, sample_weight):
    if self.loss is not None:
      # Keras weighs each per-output loss by its batch's *static* size, which
      # its traced steps do not know when the last batch is partial: the
      # per-output losses are plain means over batches (the total is weighed
      # by the rows, below). The same here: the batch size hidden.
      hidden = tf.nest.map_structure(
        lambda t: tf.raw_ops.PlaceholderWithDefault(input=t, shape=[None] + t.shape[1:]), y_pred
      )
      loss = self.loss(y, hidden, sample_weight)
      loss = loss + losses_lib.regularization_loss(self._model)
      rows = tf.shape(tf.nest.flatten(y_pred)[0])[0]
      self.tracker.update_state(loss, sample_weight=rows)
    if self.compiled is not None:
      self.compiled.update_state(y, y_pred, sample_weight)

  def _results(self) -> dict:
    out = {}
    if self.loss is not None:
      out[KERAS_LOSS] = self.tracker.result()
      for tracker in self.loss.metrics:
        out[tracker.name] = tracker.result()
    if self.compiled is not None:
      out.update(self.compiled.result())
    return out

  def result(self, name: str):
    return self._results()[name]

  def reset(self, force: bool = False):
    if force or self._reset_now():
      self.tracker.reset_state()
      if self.loss is not None:
        for tracker in self.loss.metrics:
          tracker.reset_state()
      if self.compiled is not None:
        self.compiled.reset_state()


class _View(keras.metrics.Metric):
  """One number of a `_KerasMetrics` set, as safetrain's MetricSet wants it
  (one scalar metric per name). The set's first view updates and resets the
  whole set; the others only read."""

  def __init__(self, group: _KerasMetrics, key: str, drives: bool):
    super().__init__(name=key.replace("/", "_"))
    self._group, self._key, self._drives = group, key, drives

  def update_state(self, y_true, y_pred, sample_weight=None):
    if self._drives:
      self._group.update(y_true, y_pred, sample_weight)

  def result(self):
    return self._group.result(self._key)

  def reset_state(self):
    if self._drives:
      self._group.reset()


# --------------------------------------------------------------- the trainer


# A Loss configured on logits has the logits form of its closed form.
_ON_LOGITS = {
  "sparse_categorical_crossentropy": "softmax_cross_entropy",
  "binary_crossentropy": "sigmoid_cross_entropy",
}


def _loss_name(loss) -> str | None:
  """The name safetrain knows a compiled loss by (`config.loss`'s names, a
  Loss on logits by its logits form), given by name, Loss object or keras
  function; None for any other loss."""
  if isinstance(loss, str):
    return loss
  if isinstance(loss, keras.losses.Loss):
    config = loss.get_config()
    name = config.get("name", "")
    return _ON_LOGITS.get(name, "") if config.get("from_logits") else name
  if callable(loss) and getattr(loss, "__module__", "").startswith("keras"):
    return loss.__name__
  return None


def _closed_form(loss) -> tuple[str, Callable] | None:
  """(`_loss_name`, the loss as a function of (y, y_pred)) for
  `reference.trivial`; None when the loss is not a mean over the batch (its
  trivial value would not compare) or is unknown (trivial then says None)."""
  name = _loss_name(loss)
  if name is None:
    return None
  if isinstance(loss, keras.losses.Loss):
    return (name, loss) if loss.get_config().get("reduction") == "sum_over_batch_size" else None
  return name, keras.losses.get(loss) if isinstance(loss, str) else loss


class _FitTrainer(Trainer):
  """The Trainer `safetrain.fit` runs: the user's model and data, Keras's
  loss and metrics."""

  # A compiled optimizer's clipnorm still clips, as docs/keras_fit.md says.
  _optimizer_may_clip = True

  def __init__(
    self,
    config,
    workdir,
    *,
    model,
    train: _Data,
    validation: _Data | None,
    epoch_steps: int,
    validation_freq: int,
    callbacks: list,
  ):
    super().__init__(config, workdir)
    self._user_model = model
    self._train = train
    self._validation = validation
    self._epoch_steps = epoch_steps
    self._validation_freq = validation_freq
    self._callbacks = callbacks
    self._keras_loss: _KerasLoss | None = None
    self._last_reset_step = -1
    self.metric_names: list[str] = []
    # `safetrain export WORKDIR` cannot rebuild this trainer (the model and
    # data live in the caller's process): the run exports model.keras itself.
    self._origin = {"file": None, "arg": None}

  def _single_loss(self):
    """The model's one compiled loss (a name, a Loss or a function), or
    None (several, or none)."""
    compiled = getattr(self._user_model, "_compile_loss", None)
    loss = getattr(compiled, "_user_loss", None)
    while isinstance(loss, (list, tuple, dict)) and len(loss) == 1:
      loss = next(iter(loss.values())) if isinstance(loss, dict) else loss[0]
    return None if isinstance(loss, (list, tuple, dict)) else loss

  def _learn_reference(self):
    """For one compiled keras loss of known closed form (`reference`), the
    trivial predictor's loss, as for a Trainer's `config.loss`; else the
    initial weights'."""
    named = _closed_form(self._single_loss()) if self.config.guard.learn_steps else None
    if named is not None:
      found = reference_lib.trivial(*named, self.model, self._first_batch)
      if found is not None:
        return found
    return super()._learn_reference()

  def _takes_class_indices(self) -> bool:
    """A single compiled loss that is a sparse categorical cross-entropy
    (by name, class or function) without an `ignore_class` (whose value may
    lie outside the classes on purpose) reads `y` as class indices."""
    loss = self._single_loss()
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):  # whatever its name
      return loss.get_config().get("ignore_class") is None
    if isinstance(loss, keras.losses.Loss):
      return False
    return losses_lib.takes_class_indices(_loss_name(loss) or "")

  def build_train_dataset(self):
    return self._train.dataset()

  def build_eval_dataset(self):
    return self._validation.dataset() if self._validation is not None else None

  def build_model(self):
    model = self._user_model
    x, y, sample_weight = _unpack(self._first_batch)
    y_pred = model(x, training=False)  # builds an unbuilt model, eagerly
    if self._takes_class_indices() and isinstance(y_pred, tf.Tensor):
      # The eager build of the loss reads the labels in range, as the
      # trainer's build does after this hook (the loop drops bad rows).
      y = batch_checks.Labels(leaf=0, name="y", num_classes=int(y_pred.shape[-1])).in_range(y)
    if getattr(model, "_compile_loss", None) is not None:
      self._keras_loss = _KerasLoss(model, y, losses_lib.float32_predictions(y_pred), sample_weight)
    self._first_pred = y_pred
    return model

  def build_optimizer(self):
    model = self._user_model
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
      o, c = self.config.optimizer, self.config
      optimizer = optimizers_lib.from_config(c)
      compat.set_learning_rate_schedule(
        optimizer,
        optimizers_lib.build_schedule(
          name=o.schedule,
          learning_rate=o.learning_rate,
          total_steps=c.train.steps,
          warmup_steps=o.warmup_steps,
          end_lr_factor=o.end_lr_factor,
        ),
      )
      return optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
      # safetrain scales the loss itself (precision.policy, loss_scale.*).
      optimizer = optimizer.inner_optimizer
    schedule = compat.learning_rate_schedule(optimizer)
    if isinstance(schedule, optimizers_lib.ScaledSchedule):
      # Wrapped by an earlier fit() in this process: start from the user's rate.
      compat.set_learning_rate_schedule(optimizer, schedule.base)
    return optimizer

  def compute_loss(self, model, batch, training):
    if self._keras_loss is None:
      loss, pred = losses_lib.default_loss(
        self._loss_fn, self.regularization_loss, model, batch, training
      )
      return loss, {}, pred
    x, y, sample_weight = _unpack(batch)
    pred = losses_lib.float32_predictions(model(x, training=training))
    loss = self._keras_loss(y, pred, sample_weight)
    return loss + self.regularization_loss(model), {}, pred

  def build_metrics(self):
    if self._keras_loss is None and getattr(self._user_model, "_compile_metrics", None) is None:
      return {}
    _, y, sample_weight = _unpack(self._first_batch)
    pred = losses_lib.float32_predictions(self._first_pred)
    first = not self.metric_names
    group = _KerasMetrics(
      self._user_model,
      y,
      pred,
      sample_weight,
      reset_now=self._epoch_started if first else (lambda: True),
    )
    self.metric_names = group.names
    return {name: _View(group, name, drives=i == 0) for i, name in enumerate(group.names)}

  def _epoch_started(self) -> bool:
    """Whether the training metrics start over: at an epoch's first step, and
    after a rollback (the step went back), as they cannot un-count a loop."""
    step = int(self._run.step.numpy())
    again = step % self._epoch_steps == 0 or step < self._last_reset_step
    self._last_reset_step = step
    return again

  def callbacks(self):
    return list(self._callbacks)

  def evaluate(self) -> dict[str, float]:
    """Validates at the end of the epochs Keras validates on (every
    `validation_freq`); {} at the others."""
    if self._built and self._controller.started:
      epoch = int(self._run.step.numpy()) // self._epoch_steps
      if epoch % self._validation_freq:
        return {}
    return super().evaluate()


def _unpack(batch):
  x, y, sample_weight = (*batch, None) if len(batch) == 2 else batch
  return x, y, sample_weight


def _history(workdir: str, epoch_steps: int, freq: int, names: list[str]) -> dict:
  """Keras's History.history from the workdir's metrics.jsonl: per epoch, the
  last record that ended it (a rollback's redo replaces the undone one), and
  the validation of the epochs that validate (every `freq`: a final
  evaluation record at another epoch repeats the last one)."""
  train, val = {}, {}
  for record in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    step = record.get("step")
    if not isinstance(step, int) or step <= 0 or step % epoch_steps:
      continue
    epoch = step // epoch_steps
    if record.get("rollback"):
      continue
    if not record.get("final_eval"):
      train[epoch] = record
    if epoch % freq == 0 and any(k.startswith("eval_") for k in record):
      val[epoch] = record
  history: dict[str, list[float]] = {}
  epochs = sorted(train)
  for name in names:
    key = "loss" if name == KERAS_LOSS else name
    history[key] = [train[e].get(name) for e in epochs]
  evaluated = [e for e in epochs if e in val]
  if evaluated:
    fields = ["loss"] + [n for n in names if n != KERAS_LOSS]
    for name in fields:
      history[f"val_{name}"] = [val[e].get(f"eval_{name}") for e in evaluated]
  return history
