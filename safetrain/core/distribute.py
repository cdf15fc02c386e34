"""Choosing a tf.distribute strategy from `config.distribute`."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from safetrain.core import compat


def split_cpu(n: int) -> None:
  """Splits the first CPU into `n` logical devices (before TF initialises)."""
  cpus = tf.config.list_physical_devices("CPU")
  current = tf.config.get_logical_device_configuration(cpus[0])
  if current is not None and len(current) == n:
    return
  try:
    tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
    )
  except RuntimeError as e:
    raise RuntimeError(
      f"distribute.cpu_replicas={n} must be set before TensorFlow initialises its "
      "devices (run it in a fresh process, or set it before any other TF work)"
    ) from e


def make_strategy(*, strategy: str, cpu_replicas: int) -> tf.distribute.Strategy:
  """Returns the strategy `distribute.strategy` names.

  auto: MirroredStrategy over the visible GPUs when there are several, over
  `cpu_replicas` logical CPUs when that is > 1, else the default one-device
  strategy. one_device: the default strategy. mirrored: MirroredStrategy over
  the GPUs, or the logical CPUs. multi_worker: MultiWorkerMirroredStrategy with
  the cluster from TF_CONFIG.
  """
  if cpu_replicas > 1:
    split_cpu(cpu_replicas)
  if strategy == "multi_worker":
    return _multi_worker()
  gpus = tf.config.list_logical_devices("GPU")
  if strategy == "auto":
    if len(gpus) > 1 or cpu_replicas > 1:
      strategy = "mirrored"
    else:
      return tf.distribute.get_strategy()
  if strategy == "one_device":
    return tf.distribute.get_strategy()
  devices = gpus or tf.config.list_logical_devices("CPU")
  return _mirrored([d.name for d in devices])


def _multi_worker() -> tf.distribute.MultiWorkerMirroredStrategy:
  if "TF_CONFIG" not in os.environ:
    logging.warning("distribute.strategy=multi_worker without TF_CONFIG: one worker")
  try:
    return tf.distribute.MultiWorkerMirroredStrategy()
  except RuntimeError as e:
    raise RuntimeError(
      "distribute.strategy=multi_worker must create its strategy before TensorFlow "
      "initialises (before any other TensorFlow op in the process): run each worker "
      "in a fresh process, e.g. with the safetrain command"
    ) from e


def _mirrored(devices: list[str]) -> tf.distribute.MirroredStrategy:
  # Ours gets collective keys of its own, and the next strategy others.
  compat.reserve_collective_keys()
  strategy = tf.distribute.MirroredStrategy(devices)
  compat.reserve_collective_keys()
  return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the worker that writes files (task 0 of a multi-worker cluster)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type is None:
    return True
  if task_type == "chief":
    return True
  cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
  return task_type == "worker" and task_id == 0 and "chief" not in cluster


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """How many worker processes take part (1 unless multi-worker)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  spec = resolver.cluster_spec()
  jobs = spec.jobs
  return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in jobs) or 1


def broadcast_from_chief(strategy: tf.distribute.Strategy, value: int, is_chief: bool) -> int:
  """Returns the chief's `value` on every worker (a collective: all must call).

  Each replica of the chief contributes (value, 1), the others (0, 0); the sum
  over replicas divided by the count is the chief's value, however many
  replicas each worker has.
  """
  mine = tf.constant([value, 1] if is_chief else [0, 0], tf.int64)
  per_replica = strategy.experimental_distribute_values_from_function(lambda _: mine)
  total = strategy.reduce("sum", per_replica, axis=None).numpy()
  return int(total[0] // max(int(total[1]), 1))


@dataclasses.dataclass(frozen=True)
class Workers:
  """The run's processes as the host side sees them: the strategy, whether
  this process is the chief (it writes the workdir), and how many take part."""

  strategy: tf.distribute.Strategy
  is_chief: bool
  count: int

  @classmethod
  def of(cls, strategy: tf.distribute.Strategy) -> Workers:
    return cls(strategy, is_chief(strategy), num_workers(strategy))

  @property
  def single(self) -> bool:
    return self.count == 1

  def from_chief(self, value: int) -> int:
    """The chief's `value` on every worker (a collective with several)."""
    return value if self.single else broadcast_from_chief(self.strategy, value, self.is_chief)

  def agreed_stop(self, reason: str | None) -> str | None:
    """The chief's actions decide for every worker whether the run stops (a
    collective), so no worker trains on into collectives the others left."""
    stop = self.from_chief(int(bool(reason)))
    return (reason or "the chief's actions asked to stop") if stop else None


def skip_optimizer_all_reduce(optimizer, strategy: tf.distribute.Strategy) -> bool:
  """Stops a Keras optimizer from all-reducing the gradients it is given.

  The guarded step all-reduces gradients itself (every guard decision is taken
  on them) and hands them to `apply_gradients` in replica context, where Keras
  3 would sum them over replicas a second time: a second full collective per
  step. Returns True when that reduction is switched off; False leaves it on
  (one replica, or an optimizer this does not know, such as a wrapper), and
  the caller divides the gradients by the number of replicas instead.
  """
  if strategy.num_replicas_in_sync == 1:
    return False
  if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
    return False
  return compat.disable_gradient_all_reduce(optimizer)


def replica_local_state(
  strategy: tf.distribute.Strategy, model: keras.Model, forward: Callable[[], object]
) -> list:
  """Float non-trainable variables the training forward pass updates.

  Keras updates them (BatchNorm's moving statistics) on each replica from its
  own shard, so replicas would drift apart; the step sets them to their mean
  over replicas instead. Found once by a probe `forward` pass, which is undone.
  """
  if strategy.num_replicas_in_sync == 1:
    return []
  variables = model.non_trainable_variables
  before = [v.numpy() for v in variables]
  forward()
  changed = [
    v
    for v, b in zip(variables, before)
    if tf.as_dtype(v.dtype).is_floating and not np.array_equal(v.numpy(), b)
  ]
  for v, b in zip(variables, before):
    v.assign(b)
  return changed
