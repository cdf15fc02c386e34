"""The run's state, declared once: the rollback, carried and snapshot lists
and the checkpoint keys come from the trainer's declaration."""

import pytest
import tensorflow as tf
from common import TinyTrainer, tiny_config

from safetrain.training import state


def test_the_lists_are_derived_from_the_declaration():
  a, b, c = tf.Module(), tf.Module(), tf.Module()
  a.v = tf.Variable(1.0)
  d = state.Declaration(
    [
      state.Entry("a", a, rolls_back=True, snapshot=a),
      state.Entry("b", b, rolls_back=False),
      state.Entry("c", c, rolls_back=False, checkpointed=False),
    ]
  )
  assert d.rolled_back() == {"a": a} and d.carried() == {"b": b}
  assert d.snapshotted() == [a]
  assert d.key_of(a.v) == "a/v/.ATTRIBUTES/VARIABLE_VALUE"
  with pytest.raises(KeyError):
    d.key_of(tf.Variable(0.0))
  with pytest.raises(ValueError, match="twice"):
    state.Declaration([state.Entry("a", a, True), state.Entry("a", b, False)])


def test_a_trainer_checkpoints_what_it_declares_under_the_declared_keys(tmp_path):
  t = TinyTrainer(tiny_config(**{"train.steps": 10}), str(tmp_path))
  t.fit()
  keys = {e.key for e in t.state.entries if e.checkpointed}
  assert {"model", "optimizer", "run", "data", "recovery", "clip"} <= keys
  rolled, carried = t.state.rolled_back(), t.state.carried()
  assert "data" in carried and "recovery" in carried and "model" in rolled
  assert not set(rolled) & set(carried)
  path = str(tmp_path / "checkpoints" / "ckpt-10")
  saved = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
  # (the Keras model itself writes its variables through model_variables)
  assert keys - {"iterator", "model"} <= saved
  position_key = t.state.key_of(t.state.carried()["data"].position)
  assert tf.train.load_variable(path, position_key) == 10


def test_parts_are_what_fit_runs_and_only_after_build(tmp_path):
  """`Trainer.parts` is what build() made, the same objects fit() uses: the
  feed's iterator advances with the run, the store lists its checkpoints."""
  t = TinyTrainer(tiny_config(**{"train.steps": 10}), str(tmp_path))
  with pytest.raises(RuntimeError, match="not built yet"):
    t.parts  # noqa: B018 - the property raises before build()
  t.fit()
  p = t.parts
  assert p.feed.position() == int(t.state["data"].position.numpy()) == 10
  assert p.checkpoints.latest_step() == 10
  assert p.compiled.loop.function.experimental_get_tracing_count() == 1
  assert p.keeper.healthy() and p.keeper.all_finite()
