"""The side state of a rollback (safetrain/checkpoint/rollback_state.py) on a directory of
real checkpoints, without a trainer: recorded and committed by rollback.json,
applied on start until a full save supersedes it, set aside when damaged."""

import os

import pytest
import tensorflow as tf

from safetrain.checkpoint import files, repair, rollback_state
from safetrain.checkpoint.files import ROLLBACK_FILE, path_of

GEN = "gen/.ATTRIBUTES/VARIABLE_VALUE"


def _save(d, steps, gen=0):
  """ckpt-STEP for each of `steps`, committed by CheckpointManager, holding
  the generation `gen` (the number of rollbacks before the save)."""
  v = tf.Variable([0.0, 0.0])
  g = tf.Variable(gen, dtype=tf.int64)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v, gen=g), str(d), 5, "ckpt")
  for s in steps:
    v.assign([float(s), 1.0])
    manager.save(checkpoint_number=s)
  return str(d)


def _state(d, write=True):
  fix = repair.Repair(d, write=write, notes=repair.Notes())
  return rollback_state.RollbackState(fix, generation_key=GEN)


def _notes(state):
  return " | ".join(state.repair.notes.messages)


@pytest.fixture
def rolled_back(tmp_path):
  """ckpt-0, 5, 10, and a rollback to ckpt-5 that lowered `lr` to 0.5."""
  d = _save(tmp_path / "ckpts", [0, 5, 10])
  lr = tf.Variable(0.5)
  _state(d).record(path_of(d, 5), {"lr": lr}, generation=1, scratch=str(tmp_path / "s"))
  return d, lr


def test_record_commits_the_carry_then_retires_the_abandoned_timeline(rolled_back, tmp_path):
  d, lr = rolled_back
  assert rollback_state.read_pointer(d) == rollback_state.Pointer(
    base=5, state=1, generation=1, abandoned=[10]
  )
  found = files.scan(d)
  assert sorted(found.files) == [0, 5] and list(found.listed) == [0, 5] and found.latest == 5
  assert sorted(found.side) == [1]
  # A second incident before the run got past ckpt-5: escalated to ckpt-0.
  state = _state(d)
  state.record(path_of(d, 0), {"lr": lr}, generation=2, scratch=str(tmp_path / "s"))
  assert rollback_state.read_pointer(d) == rollback_state.Pointer(0, 2, 2, [5])
  found = files.scan(d)
  assert sorted(found.files) == [0] and sorted(found.side) == [2]  # rollback-1 tidied up
  assert f"{path_of(d, 5)} retired: the run rolled back past it to {path_of(d, 0)}" in _notes(state)


def test_a_pending_rollback_applies_its_carry(rolled_back):
  d, lr = rolled_back
  lr.assign(1.0)  # a fresh process
  state = _state(d)
  pointer = state.pending(files.scan(d))
  assert pointer.base == 5
  assert state.apply(pointer, {"lr": lr}) is False  # nothing left out
  assert lr.numpy() == 0.5
  assert "applied the state of the rollback to ckpt-5" in _notes(state)


def test_a_full_save_after_the_rollback_supersedes_it_and_an_older_one_does_not(rolled_back):
  d, _ = rolled_back
  _save(d, [7], gen=0)  # saved before the rollback (a stale generation)
  assert _state(d).pending(files.scan(d)) is not None
  _save(d, [15], gen=1)
  state = _state(d)
  assert state.pending(files.scan(d)) is None
  assert not os.path.exists(os.path.join(d, ROLLBACK_FILE)) and not files.scan(d).side
  assert "is obsolete: ckpt-15 was saved after that rollback" in _notes(state)


def test_a_rollback_json_that_does_not_parse_is_kept_in_corrupt_with_its_side_state(
  rolled_back, capsys
):
  d, _ = rolled_back
  open(os.path.join(d, ROLLBACK_FILE), "w").write('{"base": 5, "sta')
  assert _state(d).pending(files.scan(d)) is None
  kept = sorted(n.split("-", 1)[1] for n in os.listdir(os.path.join(d, files.CORRUPT_DIR)))
  assert kept == ["rollback-1.data-00000-of-00001", "rollback-1.index", ROLLBACK_FILE]
  assert "cannot be used (rollback.json does not parse)" in capsys.readouterr().err
  assert not files.scan(d).side and not files.scan(d).has_rollback


def test_side_files_that_no_rollback_json_names_are_removed(rolled_back):
  d, _ = rolled_back
  os.remove(os.path.join(d, ROLLBACK_FILE))  # as if killed before the commit
  state = _state(d)
  assert state.pending(files.scan(d)) is None
  assert not files.scan(d).side and not os.path.exists(os.path.join(d, files.CORRUPT_DIR))
  assert "removed rollback state files no rollback.json names" in _notes(state)


def test_a_damaged_side_state_is_set_aside_and_the_carry_left_as_it_was(rolled_back, capsys):
  d, lr = rolled_back
  data = files.side_path(d, 1) + ".data-00000-of-00001"
  raw = bytearray(open(data, "rb").read())
  raw[len(raw) // 2] ^= 0xFF
  open(data, "wb").write(bytes(raw))
  lr.assign(1.0)
  state = _state(d)
  assert state.apply(state.pending(files.scan(d)), {"lr": lr}) is False
  assert lr.numpy() == 1.0
  assert "cannot be used (DataLossError" in capsys.readouterr().err
  assert len(os.listdir(os.path.join(d, files.CORRUPT_DIR))) == 3


def test_a_changed_input_pipeline_leaves_only_the_iterator_out(tmp_path):
  d = _save(tmp_path, [0, 5])
  lr = tf.Variable(0.5)
  it = iter(tf.data.Dataset.range(20).batch(2))
  next(it)
  _state(d).record(path_of(d, 0), {"lr": lr, "iterator": it}, 1, str(tmp_path / "s"))
  lr.assign(1.0)
  changed = iter(tf.data.Dataset.range(20).map(lambda x: x * 1).batch(2))
  state = _state(d)
  assert state.apply(state.pending(files.scan(d)), {"lr": lr, "iterator": changed}) is True
  assert lr.numpy() == 0.5  # the rest applies; the trainer re-creates the iterator


def test_a_retirement_cut_short_by_a_kill_is_finished(tmp_path, monkeypatch):
  d = _save(tmp_path / "ckpts", [0, 5, 10])
  with monkeypatch.context() as m:
    m.setattr(rollback_state.RollbackState, "retire", lambda *args, **kwargs: None)
    _state(d).record(path_of(d, 5), {"lr": tf.Variable(0.5)}, 1, str(tmp_path / "s"))
  assert 10 in files.scan(d).listed  # committed, not retired yet
  state = _state(d)
  found = files.scan(d)
  pointer = state.pending(found)
  assert state.finish_retirement(pointer, found)
  found = files.scan(d)
  assert list(found.listed) == [0, 5] and found.latest == 5 and sorted(found.files) == [0, 5]
  assert not state.finish_retirement(pointer, found)


def test_a_worker_that_is_not_the_chief_writes_only_its_scratch(tmp_path):
  d = _save(tmp_path / "ckpts", [0, 5, 10])
  before = sorted(os.listdir(d))
  scratch = str(tmp_path / "scratch")
  _state(d, write=False).record(path_of(d, 5), {"lr": tf.Variable(0.5)}, 1, scratch)
  assert sorted(os.listdir(d)) == before and not os.path.exists(scratch)


def test_drop_removes_the_commit_first_then_the_side_state(rolled_back):
  d, _ = rolled_back
  _state(d).drop()
  assert not files.scan(d).has_rollback and not files.scan(d).side
  assert sorted(files.scan(d).files) == [0, 5]  # the checkpoints are not its to touch


@pytest.mark.parametrize("text", ["", "[]", '{"base": 5, "state": 1, "generation": 1}'])
def test_a_pointer_that_is_not_whole_reads_as_none(tmp_path, text):
  open(tmp_path / ROLLBACK_FILE, "w").write(text)
  assert rollback_state.read_pointer(str(tmp_path)) is None
