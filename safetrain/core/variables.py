"""Reading variables on the host between inner loops, one op per read.

A variable's `read_value()` and `.numpy()` run two eager ops (the read and an
Identity); `read` runs the read alone, which costs ~15 us instead of ~55 us
here. Between two inner loops the controller reads a few dozen variables: a
snapshot alone reads every model and optimizer variable (34 on the MLP of
benchmarks/, 2.9 ms a loop with `read_value()`, 0.8-1.1 ms with `read`).

A read is immutable like any other: TensorFlow copies a variable's buffer
before an update writes to it while a read still holds it.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def read(variable) -> tf.Tensor:
  """The variable's current value (Keras, plain or distributed)."""
  if isinstance(variable, keras.Variable):
    variable = variable.value
  if isinstance(variable, tf.distribute.DistributedValues):
    return variable.value()  # the primary copy, in cross-replica context
  return tf.raw_ops.ReadVariableOp(resource=variable.handle, dtype=variable.dtype)


def number(variable):
  """The variable's current value as a numpy value."""
  return read(variable).numpy()
