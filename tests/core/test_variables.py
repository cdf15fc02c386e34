"""Host reads of variables between loops (safetrain/core/variables.py): one op,
the current value, and a value later updates leave alone."""

import keras
import numpy as np
import tensorflow as tf

from safetrain.core import variables


def test_read_gives_the_current_value_and_later_updates_leave_it_alone():
  plain = tf.Variable([1.0, 2.0])
  wrapped = keras.Variable(np.array([[3.0, 4.0]], np.float32))
  counter = tf.Variable(7, dtype=tf.int64)
  reads = [variables.read(v) for v in (plain, wrapped, counter)]
  plain.assign_add([10.0, 10.0])
  wrapped.assign(wrapped * 2.0)
  counter.assign_add(1)
  np.testing.assert_array_equal(reads[0], [1.0, 2.0])
  np.testing.assert_array_equal(reads[1], [[3.0, 4.0]])
  assert int(reads[2]) == 7
  # And a read now sees the updates.
  np.testing.assert_array_equal(variables.number(plain), [11.0, 12.0])
  np.testing.assert_array_equal(variables.number(wrapped), [[6.0, 8.0]])
  assert variables.number(counter) == 8 and variables.number(counter).dtype == np.int64


def test_read_takes_one_op_where_read_value_takes_two():
  """Traced, both end in the function's output Identity; read_value adds one."""
  v = tf.Variable([1.0])
  ops = {}
  for name, fn in (("read", variables.read), ("read_value", lambda x: x.read_value())):
    graph = tf.function(fn).get_concrete_function(v).graph
    ops[name] = [op.type for op in graph.get_operations() if op.type not in ("Placeholder", "NoOp")]
  assert ops["read"] == ["ReadVariableOp", "Identity"], ops
  assert ops["read_value"] == ["ReadVariableOp", "Identity", "Identity"], ops


def test_read_of_a_mirrored_variable_is_the_primary_copy():
  devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
  strategy = tf.distribute.MirroredStrategy(devices)
  with strategy.scope():
    v = tf.Variable([5.0, 6.0])
  np.testing.assert_array_equal(variables.number(v), [5.0, 6.0])
  before = variables.read(v)
  v.assign([0.0, 0.0])
  np.testing.assert_array_equal(before, [5.0, 6.0])
