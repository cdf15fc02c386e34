"""Stateful Keras metrics (`Trainer.build_metrics()`): one set for training,
updated on good steps only and reset at the start of every inner loop, and
one for evaluation, reset at the start of every evaluation.

Each metric is updated with `update_state(y, y_pred, sample_weight)`: `y` and
`sample_weight` come from the batch (`data.unpack_batch`, after the input
guard dropped bad rows), `y_pred` from `compute_loss` (the default one has
it; an override returns it as a third element, `(loss, metrics, y_pred)`).

The metric variables are never checkpointed: a set is reset before it is
updated (the training set at each inner loop's start, the evaluation set at
each evaluation's start) and read when its loop or evaluation ends, and every
save, restore and rollback happens between loops, where no metric holds
anything that has not been reported. After a resume or a rollback every
loop's metrics therefore start from zero, as in an uninterrupted run.

Under a distribution strategy the variables are Keras's own (`on_read`,
aggregated by sum), so each replica accumulates its shard and a read outside
the replicas sums them: the result is the metric over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from safetrain.core.errors import ConfigError
from safetrain.training import data as data_lib

# Fields of a loop record and of an evaluation's results a metric may not shadow.
RESERVED = frozenset(
  "step attempts loss last_loss grad_norm grad_norm_max lr lr_scale loss_scale good overflow "
  "divergence skipped_batches dropped_rows spikes steps_per_sec examples rollback final_eval "
  "time".split()
)


class MetricSet:
  """A named set of Keras metrics updated from `(y, y_pred, sample_weight)`.

  Args:
    metrics: {name: keras.metrics.Metric}, built in the strategy's scope.
    unpack: batch -> (x, y, sample_weight); `data.unpack_batch` by default.
  """

  def __init__(self, metrics: dict, unpack: Callable = data_lib.unpack_batch):
    self.metrics = dict(metrics)
    self._unpack = unpack

  def __bool__(self) -> bool:
    return bool(self.metrics)

  @property
  def names(self) -> list[str]:
    return sorted(self.metrics)

  def update(self, batch, y_pred) -> tf.Operation:
    """Updates every metric with the batch's labels and `y_pred` (graph-safe;
    in replica context under a strategy)."""
    _, y, sample_weight = self._unpack(batch)
    for name in self.names:
      self.metrics[name].update_state(y, y_pred, sample_weight=sample_weight)
    return tf.no_op()

  def reset(self) -> None:
    """Resets every metric (eagerly, outside the replicas)."""
    for metric in self.metrics.values():
      metric.reset_state()

  def results(self) -> dict[str, float]:
    """{name: result} of every metric, as Python floats."""
    return {name: float(np.asarray(self.metrics[name].result())) for name in self.names}

  def variables(self) -> list:
    return [v for name in self.names for v in self.metrics[name].variables]


def check(metrics, trainer: str, taken: set[str]) -> dict:
  """Checks what `build_metrics()` returned; returns it as a dict.

  Raises ConfigError naming the problem: not a dict of Keras metrics, a name
  that clashes with a compute_loss metric or a record field, or a metric
  whose result is not a scalar.
  """
  if not isinstance(metrics, dict) or not all(
    isinstance(k, str) and isinstance(m, keras.metrics.Metric) for k, m in metrics.items()
  ):
    raise ConfigError(
      "trainer",
      trainer,
      "build_metrics() must return a dict {name: keras.metrics.Metric} (new objects each call)",
    )
  for name, metric in metrics.items():
    if name in taken:
      raise ConfigError(
        "trainer", trainer, f"build_metrics() name {name!r} is already a record field or metric"
      )
    try:
      size = np.asarray(metric.result()).size
    except Exception:  # noqa: BLE001 - a metric built on its first update (F1Score)
      continue
    if size != 1:
      raise ConfigError(
        "trainer",
        trainer,
        f"build_metrics() metric {name!r} ({type(metric).__name__}) has a non-scalar result; "
        "configure it to return one number (for example average='macro')",
      )
  return dict(metrics)


def build_sets(
  build_metrics: Callable[[], dict],
  trainer: str,
  *,
  taken: set[str],
  first_batch,
  check_pred: Callable[[], object],
) -> tuple[MetricSet, MetricSet]:
  """The training and evaluation sets of `Trainer.build_metrics()`, checked
  (ConfigError naming the problem): two calls, new objects with the same
  names each; labels in the batch; y_pred from compute_loss."""
  train = check(build_metrics(), trainer, taken | RESERVED)
  if not train:
    return MetricSet({}), MetricSet({})
  evaluation = check(build_metrics(), trainer, taken | RESERVED)
  if set(evaluation) != set(train) or any(m is train[k] for k, m in evaluation.items()):
    raise ConfigError(
      "trainer", trainer, "build_metrics() must return new metrics, with the same names, each call"
    )
  try:
    data_lib.unpack_batch(first_batch)
  except ValueError as e:
    raise ConfigError("trainer", trainer, f"build_metrics() needs labels: {e}") from None
  check_pred()
  return MetricSet(train), MetricSet(evaluation)
