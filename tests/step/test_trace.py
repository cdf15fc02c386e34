"""The compiled step is traced without AutoGraph: safetrain's own code uses
plain tf.cond/tf.while_loop (converting it was most of a cold start), while a
user's compute_loss override is still converted, as in any tf.function."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import TinyTrainer, tiny_config

# The one TensorFlow internal these tests watch: every function AutoGraph
# converts passes through it (a TensorFlow upgrade that renames it fails here).
from tensorflow.python.autograph.impl import api as autograph_api


@contextlib.contextmanager
def conversions():
  """The functions AutoGraph converts inside the block, as 'module:qualname'."""
  seen = []
  original = autograph_api._convert_actual

  def spy(entity, program_ctx):
    seen.append(f"{getattr(entity, '__module__', '?')}:{getattr(entity, '__qualname__', entity)}")
    return original(entity, program_ctx)

  autograph_api._convert_actual = spy
  try:
    yield seen
  finally:
    autograph_api._convert_actual = original


class BranchyLossTrainer(TinyTrainer):
  """A compute_loss with Python control flow over tensors, which only
  AutoGraph makes graph-safe."""

  def compute_loss(self, model, batch, training):
    x, y = batch
    loss = tf.reduce_mean(tf.square(model(x, training=training) - y))
    if loss > 1e9:  # a tensor condition: tf.cond after conversion
      loss = loss * 0.0
    extra = tf.constant(0.0)
    for i in tf.range(3):  # a tensor loop: tf.while_loop after conversion
      extra += tf.cast(i, tf.float32) * 0.0
    return loss + extra


def test_default_trainer_fit_converts_nothing(workdir):
  with conversions() as seen:
    result = TinyTrainer(tiny_config(**{"train.steps": 10}), workdir).fit()
  assert result.step == 10
  assert seen == []


def test_user_compute_loss_is_converted_and_safetrain_code_is_not(workdir):
  trainer = BranchyLossTrainer(tiny_config(**{"train.steps": 10}), workdir)
  before = None
  with conversions() as seen:
    trainer.build()
    before = [w.numpy().copy() for w in trainer.model.trainable_weights]
    result = trainer.fit()
  assert result.step == 10 and not result.incidents
  after = [w.numpy() for w in trainer.model.trainable_weights]
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
  assert all(np.isfinite(w).all() for w in after)
  user = [name for name in seen if name.startswith(f"{__name__}:")]
  assert user and all("BranchyLossTrainer.compute_loss" in name for name in user)
  # safetrain's only converted function is the one-line wrapper that hands
  # the override to AutoGraph; no step, guard or loop code is converted.
  own = {name for name in seen if name.startswith("safetrain.")}
  assert own <= {"safetrain.training.hook_checks:checking_loss.<locals>.user"}


@pytest.mark.parametrize("trainer_cls", [TinyTrainer, BranchyLossTrainer])
def test_the_loop_is_traced_once_for_the_whole_run(workdir, trainer_cls):
  c = tiny_config(**{"train.steps": 20, "train.steps_per_loop": 5, "checkpoint.every_steps": 5})
  trainer = trainer_cls(c, workdir)
  trainer.fit()
  assert len(trainer.parts.compiled.loop.function._list_all_concrete_functions()) == 1
  assert isinstance(trainer.model, keras.Model)
