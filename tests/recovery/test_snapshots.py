"""The in-memory snapshot ring, through its own interface."""

import keras
import numpy as np
import tensorflow as tf

from safetrain.recovery.snapshots import SnapshotRing


def _model_and_optimizer():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  opt = keras.optimizers.Adam(0.1)
  opt.build(model.trainable_variables)
  return model, opt


def _train(model, opt, steps):
  x = tf.ones([4, 3])
  for _ in range(steps):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(model(x) ** 2)
    opt.apply_gradients(
      zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    )


def test_a_snapshot_is_not_changed_by_later_updates_and_restores_exactly():
  model, opt = _model_and_optimizer()
  step = tf.Variable(7, dtype=tf.int64)
  variables = list(model.variables) + list(opt.variables) + [step]
  ring = SnapshotRing(variables, slots=2, max_mb=1)
  _train(model, opt, 1)
  before = [np.array(v.numpy()) for v in variables]
  ring.take(step=7, position=7)
  # Optimizer updates (assign_add/assign_sub) and plain assigns after the
  # snapshot must not reach it.
  _train(model, opt, 3)
  step.assign(10)
  assert not np.array_equal(model.variables[0].numpy(), before[0])
  ((target_step, k),) = ring.targets()
  assert target_step == 7
  ring.restore(k)
  for v, want in zip(variables, before):
    np.testing.assert_array_equal(v.numpy(), want)


def test_the_ring_replaces_its_oldest_slot_and_forgets_a_rolled_back_timeline():
  v = tf.Variable([1.0, 2.0])
  ring = SnapshotRing([v], slots=2, max_mb=1)
  for step in (1, 2, 3):
    v.assign([float(step)] * 2)
    ring.take(step=step, position=step)
  assert [s for s, _ in ring.targets()] == [2, 3]
  ring.drop_after(2)
  assert [s for s, _ in ring.targets()] == [2]
  v.assign([9.0, 9.0])
  ring.restore(ring.targets()[0][1])
  np.testing.assert_array_equal(v.numpy(), [2.0, 2.0])


def test_a_ring_over_its_memory_cap_is_off():
  ring = SnapshotRing([tf.Variable(tf.zeros([1024, 1024]))], slots=2, max_mb=4)  # 2 x 4 MB
  assert not ring.enabled and ring.memory_mb == 0
  ring.take(step=1, position=1)
  assert ring.targets() == []
