"""Resume matches objects, not error strings: a checkpoint saved with or
without the data iterator, under any strategy and replica count, restores
into a trainer with or without one (by data position where the iterator
cannot be restored, with the documented warning); only a real mismatch of
the model or optimizer is the "another experiment" refusal."""

import keras
import pytest
import tensorflow as tf
from common import TinyTrainer, tiny_config

import safetrain


class PyFunctionTrainer(TinyTrainer):
  """TinyTrainer's data through a py_function stage: not checkpointable."""

  def build_train_dataset(self):
    def same(x, y):
      return tf.py_function(lambda a, b: (a, b), [x, y], [tf.float32, tf.float32])

    def shaped(x, y):
      return tf.ensure_shape(x, [None, 4]), tf.ensure_shape(y, [None, 1])

    return super().build_train_dataset().map(same).map(shaped)


class SgdTrainer(TinyTrainer):
  def build_optimizer(self):
    return keras.optimizers.SGD(0.01)


def _config(steps, **overrides):
  return tiny_config(**{"train.steps": steps, **overrides})


def _fit(cls, workdir, steps, **overrides):
  trainer = cls(_config(steps, **overrides), workdir)
  return trainer, trainer.fit()


def test_a_pipeline_that_lost_its_py_function_stage_resumes_by_position(tmp_path, caplog):
  """Saved without an iterator (py_function), restored into a trainer whose
  iterator is checkpointable: resumed, not refused."""
  workdir = str(tmp_path / "run")
  _, first = _fit(PyFunctionTrainer, workdir, 10)
  assert first.step == 10
  trainer, second = _fit(TinyTrainer, workdir, 20)
  assert second.step == 20
  assert int(trainer.state["data"].position.numpy()) >= 20
  assert "re-created from build_train_dataset() at batch 10" in caplog.text


def test_a_pipeline_that_gained_a_py_function_stage_resumes_by_position(tmp_path):
  workdir = str(tmp_path / "run")
  _fit(TinyTrainer, workdir, 10)
  _, second = _fit(PyFunctionTrainer, workdir, 20)
  assert second.step == 20


@pytest.mark.parametrize("saved,resumed", [("mirrored", "one_device"), ("one_device", "mirrored")])
def test_a_run_moved_to_another_strategy_and_replica_count_resumes(tmp_path, saved, resumed):
  """What strategy=auto does when a 2-GPU job moves to a 1-GPU machine, and
  back: the distributed iterator is not checkpointed, the plain one is."""
  workdir = str(tmp_path / "run")
  replicas = {"mirrored": 2, "one_device": 1}
  _, first = _fit(
    TinyTrainer,
    workdir,
    10,
    **{"distribute.strategy": saved, "distribute.cpu_replicas": replicas[saved]},
  )
  assert first.step == 10
  trainer, second = _fit(
    TinyTrainer,
    workdir,
    20,
    **{"distribute.strategy": resumed, "distribute.cpu_replicas": replicas[resumed]},
  )
  assert second.step == 20
  assert trainer.strategy.num_replicas_in_sync == replicas[resumed]


def test_another_optimizer_is_the_another_experiment_refusal(tmp_path):
  """An SGD run's checkpoint into a trainer with Adam, whose slots it does
  not hold: the model fits, the optimizer does not."""
  workdir = str(tmp_path / "run")
  _fit(SgdTrainer, workdir, 10)
  with pytest.raises(safetrain.WorkdirError, match="does not fit this trainer"):
    _fit(TinyTrainer, workdir, 20)
