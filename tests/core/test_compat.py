"""The TensorFlow and Keras internals safetrain relies on (safetrain/core/compat.py).

Each test attacks exactly what safetrain needs from one internal, so that an
upgrade that changes it fails here, by name, rather than in a run.
"""

import os
import shutil
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from safetrain.checkpoint.files import path_of
from safetrain.core import compat


def _checkpoints(directory, steps):
  """Real (tiny) checkpoints ckpt-STEP in `directory`, listed nowhere yet."""
  v = tf.Variable([1.0, 2.0])
  for s in steps:
    v.assign([float(s), -float(s)])
    tf.train.Checkpoint(v=v).write(path_of(directory, s))
  return v


def test_write_checkpoint_state_writes_what_checkpoint_manager_reads_and_sweeps(tmp_path):
  d = str(tmp_path / "ckpts")
  v = _checkpoints(d, [3, 5, 7])
  # Unlist ckpt-5 (a retired or damaged one): keep 3 and 7, with their times.
  compat.write_checkpoint_state(d, [path_of(d, 3), path_of(d, 7)], [100.0, 200.0], 99.0)

  text = open(os.path.join(d, "checkpoint")).read()
  # Relative paths, as CheckpointManager writes them: the workdir can move.
  assert 'model_checkpoint_path: "ckpt-7"' in text
  assert 'all_model_checkpoint_paths: "ckpt-3"' in text and d not in text
  state = tf.train.get_checkpoint_state(d)
  assert list(state.all_model_checkpoint_timestamps) == [100.0, 200.0]
  assert state.last_preserved_timestamp == 99.0

  # A copy of the directory is read as the copy, and CheckpointManager takes
  # the list as its own: it sweeps the oldest listed one past max_to_keep,
  # never the unlisted ckpt-5.
  copy = str(tmp_path / "moved")
  shutil.copytree(d, copy)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), copy, max_to_keep=2)
  assert manager.checkpoints == [path_of(copy, 3), path_of(copy, 7)]
  assert manager.latest_checkpoint == path_of(copy, 7)
  manager.save(checkpoint_number=9)
  assert manager.checkpoints == [path_of(copy, 7), path_of(copy, 9)]
  names = sorted(os.listdir(copy))
  assert not any(n.startswith("ckpt-3.") for n in names)
  assert any(n.startswith("ckpt-5.") for n in names)


def test_write_checkpoint_state_without_timestamps_lists_the_paths_in_order(tmp_path):
  d = str(tmp_path)
  _checkpoints(d, [1, 2])
  compat.write_checkpoint_state(d, [path_of(d, 2), path_of(d, 1)])
  state = tf.train.get_checkpoint_state(d)
  assert list(state.all_model_checkpoint_paths) == [path_of(d, 2), path_of(d, 1)]
  assert tf.train.latest_checkpoint(d) == path_of(d, 1)


# ------------------------------------------------------------------ Keras


def _dense(seed=0):
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  model.set_weights([np.full((3, 2), 0.5, np.float32), np.zeros(2, np.float32)])
  return model


def test_the_learning_rate_schedule_can_be_swapped_in_place_and_is_used():
  model = _dense()
  opt = keras.optimizers.SGD(0.1)
  opt.build(model.trainable_variables)
  variables = list(opt.variables)
  assert isinstance(compat.learning_rate_schedule(opt), keras.Variable)
  halve = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
  compat.set_learning_rate_schedule(opt, halve)
  assert compat.learning_rate_schedule(opt) is halve
  # The optimizer's variables (what checkpoints track) are the same objects.
  assert [id(v) for v in opt.variables] == [id(v) for v in variables]
  grads = [tf.ones((3, 2)), tf.ones(2)]
  opt.apply_gradients(zip(grads, model.trainable_variables))  # rate 1.0 at step 0
  opt.apply_gradients(zip(grads, model.trainable_variables))  # rate 0.5 at step 1
  np.testing.assert_allclose(model.get_weights()[0], np.full((3, 2), 0.5 - 1.5))


def test_an_optimizer_told_not_to_all_reduce_applies_each_replicas_gradient_once():
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  with strategy.scope():
    model = _dense()
    opt = keras.optimizers.SGD(1.0)
    opt.build(model.trainable_variables)
  assert compat.disable_gradient_all_reduce(opt)

  @tf.function
  def step():
    def replica():
      opt.apply_gradients(zip([tf.ones((3, 2)), tf.ones(2)], model.trainable_variables))

    strategy.run(replica)

  step()
  # Summed over the 2 replicas by Keras, the kernel would move by 2, not 1.
  np.testing.assert_allclose(model.get_weights()[0], np.full((3, 2), -0.5))


def test_flatten_layers_reaches_layers_inside_nested_models():
  inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="deep")])
  outer = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(1, name="top")])
  names = [layer.name for layer in compat.flatten_layers(outer)]
  assert names[0] == outer.name and "deep" in names and "top" in names


def test_replace_call_reroutes_a_layers_call_and_puts_it_back():
  model = _dense()
  layer = model.layers[0]
  seen = []
  original = layer.call

  def spy(*args, **kwargs):
    seen.append(True)
    return original(*args, **kwargs)

  compat.replace_call(layer, spy)
  model(tf.ones((1, 3)))
  assert seen == [True]
  compat.replace_call(layer, None)
  model(tf.ones((1, 3)))
  assert seen == [True] and "call" not in vars(layer)


# ------------------------------------------------------------- TensorFlow


def test_reserving_collective_keys_moves_the_base_of_the_next_strategy():
  before = tf.distribute.MirroredStrategy._collective_key_base
  assert isinstance(before, int)
  compat.reserve_collective_keys(7)
  assert tf.distribute.MirroredStrategy._collective_key_base == before + 7


def test_iterator_state_error_tells_a_stateful_pipeline_from_a_plain_one():
  tf.random.set_seed(0)  # op determinism (conftest) wants seeded random ops
  plain = tf.data.Dataset.range(10).shuffle(10, seed=1).batch(2)
  stateful = tf.data.Dataset.range(10).map(lambda i: tf.random.uniform([]) + tf.cast(i, tf.float32))
  assert compat.iterator_state_error(iter(plain)) is None
  assert "is stateful" in compat.iterator_state_error(iter(stateful))
  # And what it predicts is what a checkpoint save does.
  with pytest.raises(tf.errors.FailedPreconditionError):
    tf.train.Checkpoint(it=iter(stateful)).write(os.path.join(tempfile.mkdtemp(), "c"))
