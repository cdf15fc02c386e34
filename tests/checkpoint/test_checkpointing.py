"""The checkpoint store (safetrain/checkpoint/store.py) on plain variables, without
a trainer: save, the list, a rollback made durable and applied on restart."""

import os

import pytest
import tensorflow as tf

from safetrain.checkpoint import store as checkpointing
from safetrain.checkpoint.store import CheckpointStore, path_of
from safetrain.training import state

GEN = "gen/.ATTRIBUTES/VARIABLE_VALUE"


def _objects():
  data = tf.Module()
  data.position = tf.Variable(0, dtype=tf.int64)
  return dict(v=tf.Variable([0.0, 0.0]), gen=tf.Variable(0, dtype=tf.int64), data=data)


def _store(d, objects, max_to_keep=5):
  return CheckpointStore(
    d,
    max_to_keep=max_to_keep,
    objects=objects,
    carry=("data", "gen"),
    generation_key=GEN,
    position_key=state.variable_key("data", "position"),
  )


def _train(store, objects, steps):
  """Saves ckpt-STEP for each of `steps`, with v = [STEP, 1] and the data
  position at 10 * STEP."""
  for s in steps:
    objects["v"].assign([float(s), 1.0])
    objects["data"].position.assign(10 * s)
    store.save(s)


def test_a_committed_checkpoint_is_never_written_again(tmp_path):
  objects = _objects()
  store = _store(str(tmp_path), objects)
  _train(store, objects, [0, 5])
  with pytest.raises(RuntimeError, match="refusing to overwrite the committed checkpoint"):
    store.save(5)
  assert [s for s, _ in store.checkpoints()] == [0, 5] and store.latest_step() == 5


def test_a_rollback_is_durable_without_a_model_save_and_applies_on_restart(tmp_path):
  d = str(tmp_path)
  objects = _objects()
  store = _store(d, objects)
  _train(store, objects, [0, 5, 10])
  target = path_of(d, 5)
  assert store.restore_rollback(target, {"v": objects["v"]}) == 5
  assert objects["v"].numpy().tolist() == [5.0, 1.0] and int(objects["data"].position) == 100
  assert store.position_of(target) == 50
  objects["gen"].assign(1)
  store.record_rollback(target, generation=1)
  assert store.checkpoints() == [(0, path_of(d, 0)), (5, target)]  # ckpt-10 retired
  assert store.current_step() == 5 and store.latest_path() == target

  restarted = _objects()
  again = _store(d, restarted)
  assert again.restore_latest() == target
  assert restarted["v"].numpy().tolist() == [5.0, 1.0]
  # What the rollback carried, not what ckpt-5 holds: the position it went on
  # from, and the generation after the rollback.
  assert int(restarted["data"].position) == 100 and int(restarted["gen"]) == 1
  assert any("applied the state of the rollback to ckpt-5" in r for r in again.repairs)
  again.save(6)  # a full save holds all of it: the side state goes
  assert not os.path.exists(os.path.join(d, checkpointing.ROLLBACK_FILE))
  assert not checkpointing.scan(d).side


def test_a_checkpoint_set_aside_is_gone_from_the_list_and_later_saves(tmp_path):
  d = str(tmp_path)
  objects = _objects()
  store = _store(d, objects, max_to_keep=3)
  _train(store, objects, [0, 5, 10])
  store.set_aside(path_of(d, 10), "it restores non-finite values")
  assert [s for s, _ in store.checkpoints()] == [0, 5] and store.latest_path() == path_of(d, 5)
  _train(store, objects, [15, 20])
  assert [s for s, _ in store.checkpoints()] == [5, 15, 20]
  assert sorted(checkpointing.scan(d).files) == [5, 15, 20]
  assert sorted(os.listdir(os.path.join(d, checkpointing.CORRUPT_DIR))) == [
    "ckpt-10.data-00000-of-00001",
    "ckpt-10.index",
  ]


def test_restore_latest_passes_over_an_unhealthy_checkpoint(tmp_path, capsys):
  d = str(tmp_path)
  objects = _objects()
  _train(_store(d, objects), objects, [0, 5, 10])
  restarted = _objects()
  store = _store(d, restarted)
  healthy = lambda: float(restarted["v"][0]) != 10.0  # noqa: E731
  assert store.restore_latest(healthy=healthy) == path_of(d, 5)
  assert "ckpt-10 is unreadable (it restores non-finite values)" in capsys.readouterr().err
  assert store.check_readable(path_of(d, 5)) is None
  assert "NotFoundError" in store.check_readable(path_of(d, 10))  # moved to corrupt/


def test_restore_model_readonly_touches_nothing(tmp_path):
  d = str(tmp_path)
  objects = _objects()
  _train(_store(d, objects), objects, [0, 5])
  data = os.path.join(d, "ckpt-5.data-00000-of-00001")
  raw = open(data, "rb").read()
  open(data, "wb").write(bytes(b ^ 0xFF for b in raw))
  before = sorted(os.listdir(d))
  v = tf.Variable([9.0, 9.0])
  path = _store(d, _objects()).restore_model_readonly({"v": v}, healthy=lambda: True)
  assert path == path_of(d, 0) and v.numpy().tolist() == [0.0, 1.0]
  assert sorted(os.listdir(d)) == before
