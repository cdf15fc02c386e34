"""Evaluation: the mean of the loss and metrics over the examples seen.

Every batch counts by its rows, on one device as on several replicas, so a
short last batch weighs what its examples weigh and the result equals Keras
`model.evaluate` on the same data. Evaluation is guarded like training
(`eval_guard`): rows with NaN or Inf features are left out under
`guard.bad_inputs` and counted, and a result that is not finite is a warning
naming the metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from safetrain.core.errors import BadInputError, WorkdirError
from safetrain.step import batch_checks
from safetrain.training import data as data_lib
from safetrain.training import eval_guard

EXAMPLES = "examples"


class Evaluator:
  """Runs a compiled evaluation step over an eval dataset.

  Args:
    strategy: the distribution strategy the model lives under.
    build_dataset: returns the eval dataset (called once, on first use), or
      None for no evaluation.
    compute_loss: batch -> (loss, {name: metric}), each the mean over the
      batch's rows (the trainer's compute_loss with training=False).
    steps: batches per evaluation; 0 evaluates the whole dataset.
    metrics: the stateful Keras metrics of evaluation (`MetricSet`), reset
      at the start of every evaluation, or None; compute_loss then returns
      y_pred as a third element.
    check_inputs: `guard.check_inputs`: leave out rows with NaN or Inf features.
    bad_inputs: `guard.bad_inputs`: drop_rows (the bad rows), skip_batch (the
      batches holding one), raise (BadInputError).
    num_classes: with the default compute_loss and a sparse categorical loss,
      the model's output size: a row whose label `y` is outside [0,
      num_classes) is a bad row too; None: labels are not checked.
  """

  def __init__(
    self,
    *,
    strategy: tf.distribute.Strategy,
    build_dataset: Callable[[], tf.data.Dataset | None],
    compute_loss: Callable,
    steps: int,
    metrics=None,
    check_inputs: bool = True,
    bad_inputs: str = "drop_rows",
    num_classes: int | None = None,
  ):
    self._strategy = strategy
    self._build_dataset = build_dataset
    self._compute_loss = compute_loss
    self._steps = steps
    self._metrics = metrics or None
    self._check_inputs = check_inputs
    self._bad_inputs = bad_inputs
    self._num_classes = num_classes
    self._what = "rows with NaN or Inf features" + (
      f" or class labels outside [0, {num_classes})" if num_classes is not None else ""
    )
    self._dataset = None
    self._built = False
    self.retrace()

  def retrace(self) -> None:
    """Makes the compiled step (at build, and again when a layer's dtype
    changed: the next call traces anew)."""
    # A short last batch has another shape: one generic trace, not one per shape.
    self._step_fn = tf.function(self._step, reduce_retracing=True, autograph=False)

  def __call__(self) -> dict[str, float]:
    """Evaluates once.

    Returns:
      {name: mean over the examples} for the loss and every metric, plus
      `examples`, how many were evaluated; {} when there is no eval dataset.
    """
    if not self._built:
      dataset = self._build_dataset()
      if dataset is not None:
        self._dataset = self._strategy.experimental_distribute_dataset(dataset)
      self._built = True
    if self._dataset is None:
      return {}
    totals: dict[str, float] = {}
    rows = dropped = 0.0
    if self._metrics is not None:
      self._metrics.reset()
    for batches, batch in enumerate(self._dataset, 1):
      sums, n, bad = self._step_fn(batch)
      rows += float(n)
      dropped += float(bad)
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      if self._steps and batches >= self._steps:
        break
    if dropped and self._bad_inputs == "raise":
      raise BadInputError(
        f"the eval dataset has {int(dropped)} {self._what} "
        "(guard.bad_inputs=raise); use guard.bad_inputs=drop_rows or skip_batch to "
        "evaluate without them"
      )
    if dropped:
      logging.warning(
        "evaluation: %d %s were left out (guard.bad_inputs=%s).",
        int(dropped),
        self._what,
        self._bad_inputs,
      )
    if not rows:
      logging.warning("The eval dataset yielded no examples; nothing was evaluated.")
      return {eval_guard.DROPPED: int(dropped)} if dropped else {}
    out = {k: v / rows for k, v in totals.items()}
    if self._metrics is not None:
      out.update(self._metrics.results())
    for name, value in out.items():
      if isinstance(value, float) and not math.isfinite(value):
        logging.warning(
          "evaluation: %s is %s over %d examples: the model or the metric is not finite "
          "on the eval set.",
          name,
          value,
          int(rows),
        )
    out[EXAMPLES] = int(rows)
    if dropped:
      out[eval_guard.DROPPED] = int(dropped)
    return out

  def _labels(self, batch) -> batch_checks.Labels | None:
    """The label check of an eval batch (its own layout), or None."""
    if self._num_classes is None:
      return None
    leaf = data_lib.label_leaf(batch)
    if leaf is None:
      return None
    return batch_checks.Labels(leaf=leaf, name="y", num_classes=self._num_classes)

  def _step(self, batch):
    """Sums over the batch of each replica's means times its rows."""

    def replica(batch):
      bad = tf.constant(0)
      if self._check_inputs:
        batch, bad = eval_guard.guard_rows(
          batch, policy=self._bad_inputs, labels=self._labels(batch)
        )
      rows = tf.shape(tf.nest.flatten(batch)[0])[0]
      loss, metrics, *pred = self._compute_loss(batch)
      if self._metrics is not None:
        self._metrics.update(batch, pred[0])
      w = tf.cast(rows, tf.float32)
      # A replica's shard of a short last batch may be empty, and its mean NaN.
      out = {k: tf.where(rows > 0, v * w, 0.0) for k, v in dict(metrics, loss=loss).items()}
      return out, w, tf.cast(bad, tf.float32)

    sums, rows, bad = self._strategy.run(replica, args=(batch,))
    reduce = lambda v: self._strategy.reduce("sum", v, axis=None)  # noqa: E731
    return {k: reduce(v) for k, v in sums.items()}, reduce(rows), reduce(bad)


def restore_model(checkpoints, model, healthy: Callable[[], bool]) -> str:
  """Loads the newest committed checkpoint of `checkpoints` (a
  CheckpointStore) that reads back finite (`healthy`) into `model`, without
  repairing or moving anything (a run may be writing); returns its path.
  WorkdirError when there is none."""
  path = checkpoints.restore_model_readonly(
    dict(model=model, model_variables=list(model.variables)), healthy=healthy
  )
  if path is None:
    raise WorkdirError(
      f"no healthy checkpoint in {checkpoints.directory}: train first "
      "(fit()), or point the trainer at the workdir of a trained run"
    )
  logging.info("Restored the model of %s (read-only)", path)
  return path
