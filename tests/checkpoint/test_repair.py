"""The repair on start (safetrain/checkpoint/repair.py), on directories of real
checkpoint files and without a trainer: what a kill left is removed, damage
is kept in corrupt/, and the state file lists what is left."""

import os

import pytest
import tensorflow as tf

from safetrain.checkpoint import files, repair
from safetrain.checkpoint.files import Scan, path_of
from safetrain.core import compat
from safetrain.core.errors import WorkdirError


def _directory(d, steps=(0, 5, 10), max_to_keep=5):
  """ckpt-STEP for each of `steps`, saved and committed by CheckpointManager."""
  v = tf.Variable([0.0, 0.0])
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), d, max_to_keep, "ckpt")
  for s in steps:
    v.assign([float(s), 1.0])
    manager.save(checkpoint_number=s)
  return str(d)


def _readable(path):
  """What the store's restore says, without a model: None or why not."""
  try:
    files.verify(path)
  except Exception as e:  # noqa: BLE001
    return files.describe(e)
  return None


def _cut_index(d, step):
  """What a save killed before its commit leaves: an index half written."""
  index = open(path_of(d, step) + ".index", "rb").read()
  open(path_of(d, step) + ".index", "wb").write(index[: len(index) // 2])


def _flip(d, step):
  data = os.path.join(d, f"ckpt-{step}.data-00000-of-00001")
  raw = bytearray(open(data, "rb").read())
  for i in range(len(raw) // 3, len(raw) // 3 + 8):
    raw[i] ^= 0xFF
  open(data, "wb").write(bytes(raw))


def _list(d, steps):
  compat.write_checkpoint_state(d, [path_of(d, s) for s in steps])


def _repair(d, write=True):
  return repair.Repair(d, write=write, notes=repair.Notes())


def _scan(listed, files_on_disk, has_state=True):
  return Scan(
    has_state=has_state,
    state_damaged=False,
    listed={s: float(s) for s in listed},
    latest=listed[-1] if listed else None,
    files={s: [f"ckpt-{s}.index", f"ckpt-{s}.data-00000-of-00001"] for s in files_on_disk},
    leftovers=[],
  )


# ------------------------------------------------------------- decisions


def test_restore_order_newest_save_first_and_a_rollbacks_checkpoint_before_all():
  found = _scan([0, 5, 10], [0, 5, 10, 3, 15, 20])
  assert repair.newer_than_listed(found) == [20, 15]  # 3 is older: not the last save
  assert repair.restore_order(found) == [20, 15, 10, 5, 0]
  assert repair.restore_order(found, first=5) == [5, 20, 15, 10, 0]
  assert repair.restore_order(found, first=7) == [20, 15, 10, 5, 0]  # gone: no matter
  no_state = _scan([], [0, 5], has_state=False)
  assert repair.restore_order(no_state) == [5, 0]


def test_an_interrupted_save_is_told_from_damage(tmp_path):
  d = _directory(tmp_path, steps=(0, 3, 5, 10, 15))
  _list(d, [0, 5, 10])
  _cut_index(d, 15)  # unlisted, newest, index cut: a save killed before its commit
  _cut_index(d, 5)  # listed: it was committed, so this is damage
  _cut_index(d, 3)  # unlisted but older than a commit: no save writes there
  _flip(d, 10)  # the index is whole: the bytes changed after the save
  found = files.scan(d)
  assert repair.is_interrupted_save(d, 15, found)
  assert not repair.is_interrupted_save(d, 5, found)
  assert not repair.is_interrupted_save(d, 3, found)
  assert not repair.is_interrupted_save(d, 10, found)


@pytest.mark.parametrize("lone, expected", [(0, True), (5, False)])
def test_without_a_state_file_only_a_lone_first_save_is_an_interrupted_one(
  tmp_path, lone, expected
):
  d = _directory(tmp_path, steps=(lone,))
  os.remove(os.path.join(d, files.STATE_FILE))
  _cut_index(d, lone)
  assert repair.is_interrupted_save(d, lone, files.scan(d)) is expected
  open(os.path.join(d, files.STATE_FILE), "w").write("garbage \x00")
  assert not repair.is_interrupted_save(d, lone, files.scan(d))  # a save was committed


# --------------------------------------------------------------- the walk


def test_resume_removes_an_interrupted_save_keeps_damage_and_lists_what_is_left(tmp_path):
  d = _directory(tmp_path, steps=(0, 5, 10, 15))
  _list(d, [0, 5, 10])
  _cut_index(d, 15)
  _flip(d, 10)
  evidence = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d) if "ckpt-10." in n}
  fix = _repair(d)
  tried = []
  restored = fix.restore_newest(
    files.scan(d), try_restore=lambda p: tried.append(p) or _readable(p), max_to_keep=3
  )
  assert restored == 5 and tried == [path_of(d, s) for s in (15, 10, 5)]
  found = files.scan(d)
  assert sorted(found.files) == [0, 5] and list(found.listed) == [0, 5] and found.latest == 5
  corrupt = os.path.join(d, files.CORRUPT_DIR)
  assert {n: open(os.path.join(corrupt, n), "rb").read() for n in os.listdir(corrupt)} == evidence
  assert len(fix.notes.messages) == 2
  assert "ckpt-15 was never committed (killed while saving): removed" in fix.notes.messages[0]
  assert "ckpt-10 is unreadable (DataLossError" in fix.notes.messages[1]
  assert "falling back to the previous checkpoint" in fix.notes.messages[1]


def test_resume_finishes_a_killed_sweep_and_sets_aside_a_kept_checkpoint_missing_a_file(
  tmp_path,
):
  d = _directory(tmp_path, steps=(0, 5, 10, 15), max_to_keep=4)
  _list(d, [0, 5, 10, 15])  # with max_to_keep=3, ckpt-0 was being swept
  os.remove(path_of(d, 0) + ".index")
  os.remove(path_of(d, 5) + ".index")  # kept by max_to_keep: damage
  fix = _repair(d)
  assert fix.restore_newest(files.scan(d), try_restore=_readable, max_to_keep=3) == 15
  assert not any(n.startswith("ckpt-0.") for n in os.listdir(d))
  assert os.listdir(os.path.join(d, files.CORRUPT_DIR)) == ["ckpt-5.data-00000-of-00001"]
  assert list(files.scan(d).listed) == [10, 15]
  assert "ckpt-0 was being deleted (max_to_keep)" in fix.notes.messages[0]


def test_resume_with_every_committed_checkpoint_damaged_stops_and_deletes_nothing(tmp_path):
  d = _directory(tmp_path)
  for s in (0, 5, 10):
    _flip(d, s)
  with pytest.raises(WorkdirError, match="no readable checkpoint .* Nothing was deleted"):
    _repair(d).restore_newest(files.scan(d), try_restore=_readable, max_to_keep=3)
  assert len(os.listdir(os.path.join(d, files.CORRUPT_DIR))) == 6
  assert not files.scan(d).files and not files.scan(d).has_state


def test_after_a_committed_rollback_a_newer_save_is_not_taken(tmp_path):
  d = _directory(tmp_path, steps=(0, 5, 10, 15))
  _list(d, [0, 5, 10])
  _cut_index(d, 15)
  fix = _repair(d)
  restored = fix.restore_newest(
    files.scan(d), try_restore=_readable, max_to_keep=3, rollback_base=5
  )
  assert restored == 5  # the rollback's checkpoint, though ckpt-10 reads back
  assert sorted(files.scan(d).files) == [0, 5, 10] and files.scan(d).latest == 5
  assert "ckpt-15 was never committed" in fix.notes.messages[0]


def test_a_worker_that_is_not_the_chief_decides_the_same_and_changes_nothing(tmp_path):
  d = _directory(tmp_path, steps=(0, 5, 10, 15))
  _list(d, [0, 5, 10])
  _cut_index(d, 15)
  _flip(d, 10)
  before = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)}
  fix = _repair(d, write=False)
  assert fix.restore_newest(files.scan(d), try_restore=_readable, max_to_keep=3) == 5
  assert {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)} == before
  assert "left in place (not the chief)" in fix.notes.messages[1]


# ---------------------------------------------------------------- changes


@pytest.mark.parametrize("content", [b"", b"model_checkpoint_path: \x00\xff garbage"])
def test_a_state_file_that_does_not_parse_is_kept_unless_empty(tmp_path, capsys, content):
  d = _directory(tmp_path)
  open(os.path.join(d, files.STATE_FILE), "wb").write(content)
  fix = _repair(d)
  fix.set_aside_state_file()
  kept = os.listdir(os.path.join(d, files.CORRUPT_DIR)) if content else []
  assert [open(os.path.join(d, files.CORRUPT_DIR, n), "rb").read() for n in kept] == (
    [content] if content else []
  )
  assert not os.path.exists(os.path.join(d, files.STATE_FILE))
  assert ("is empty" if not content else "does not parse") in capsys.readouterr().err


def test_set_aside_unlists_a_checkpoint_and_keeps_the_others_save_times(tmp_path):
  d = _directory(tmp_path)
  times = files.scan(d).listed
  _repair(d).set_aside(10, "it restores non-finite values")
  found = files.scan(d)
  assert found.listed == {0: times[0], 5: times[5]} and found.latest == 5
  assert sorted(os.listdir(os.path.join(d, files.CORRUPT_DIR))) == [
    "ckpt-10.data-00000-of-00001",
    "ckpt-10.index",
  ]
  _directory(d, steps=(10,), max_to_keep=5)  # saved again later, then set aside too
  _repair(d).set_aside(10, "again")
  assert "ckpt-10_2.index" in os.listdir(os.path.join(d, files.CORRUPT_DIR))
