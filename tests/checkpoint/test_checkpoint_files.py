"""The files of a checkpoint directory (safetrain/checkpoint/files.py): names,
what `scan` finds, what `verify` reads, and the atomic file changes."""

import os

import pytest
import tensorflow as tf

from safetrain.checkpoint import files
from safetrain.core import compat
from safetrain.core.errors import WorkdirError


def _save(directory, step, value=1.0):
  tf.train.Checkpoint(v=tf.Variable([value, -value])).write(files.path_of(directory, step))


def _touch(path, data=b"x"):
  with open(path, "wb") as f:
    f.write(data)


def test_paths_and_steps():
  assert files.path_of("/w/checkpoints", 12) == "/w/checkpoints/ckpt-12"
  assert files.step_of(files.path_of("/w/checkpoints", 12)) == 12
  assert files.side_path("/w/checkpoints", 3) == "/w/checkpoints/rollback-3"
  with pytest.raises(ValueError, match="not a safetrain checkpoint path"):
    files.step_of("/w/checkpoints/rollback-3")


def test_scan_sorts_every_kind_of_file(tmp_path):
  d = str(tmp_path)
  for s in (5, 8, 10):
    _save(d, s)
  compat.write_checkpoint_state(d, [files.path_of(d, s) for s in (3, 5, 8)], [1.0, 2.0, 3.0])
  os.remove(os.path.join(d, "ckpt-8.index"))
  os.makedirs(os.path.join(d, "ckpt-12_temp"))
  _touch(os.path.join(d, "checkpoint.tmp0123abcd"))
  _touch(os.path.join(d, "rollback.json.tmp99"))
  _touch(os.path.join(d, "rollback-2.index"))
  _touch(os.path.join(d, "rollback-2.data-00000-of-00001"))
  _touch(os.path.join(d, "rollback.json"), b"{}")
  os.makedirs(os.path.join(d, files.CORRUPT_DIR))
  _touch(os.path.join(d, "notes.txt"))

  found = files.scan(d)
  assert found.has_state and not found.state_damaged
  assert found.listed == {3: 1.0, 5: 2.0, 8: 3.0} and found.latest == 8
  assert sorted(found.files) == [5, 8, 10]
  assert found.files[8] == ["ckpt-8.data-00000-of-00001"]
  assert found.leftovers == ["checkpoint.tmp0123abcd", "ckpt-12_temp", "rollback.json.tmp99"]
  assert found.side == {2: ["rollback-2.data-00000-of-00001", "rollback-2.index"]}
  assert found.has_rollback
  assert found.unlisted == [10] and found.incomplete == [3, 8]
  assert found.interrupted_save


def test_scan_tells_a_damaged_state_file_from_a_missing_one(tmp_path):
  d = str(tmp_path)
  _save(d, 0)
  assert not files.scan(d).has_state and not files.scan(d).state_damaged
  _touch(os.path.join(d, files.STATE_FILE), b"model_checkpoint_path: \x00\xff garbage")
  found = files.scan(d)
  assert not found.has_state and found.state_damaged and found.listed == {}


def test_scan_of_a_missing_directory_is_empty(tmp_path):
  found = files.scan(str(tmp_path / "nothing"))
  assert not found.has_state and not found.files and not found.interrupted_save


def test_verify_reads_every_tensor_and_index_readable_only_the_index(tmp_path):
  d = str(tmp_path)
  _save(d, 1, value=3.0)
  path = files.path_of(d, 1)
  files.verify(path)
  data = os.path.join(d, "ckpt-1.data-00000-of-00001")
  raw = bytearray(open(data, "rb").read())
  raw[len(raw) // 2] ^= 0xFF
  _touch(data, bytes(raw))
  with pytest.raises(tf.errors.DataLossError):
    files.verify(path)
  assert files.index_readable(path)  # the index is whole: changed bytes, not a cut save
  index = open(path + ".index", "rb").read()
  _touch(path + ".index", index[: len(index) // 2])
  assert not files.index_readable(path)
  os.remove(path + ".index")
  assert not files.index_readable(path)


def test_describe_is_one_line_without_the_function_node_preamble():
  e = tf.errors.DataLossError(None, None, "{{function_node __wrapped}} bad checksum\nmore")
  assert files.describe(e) == "DataLossError: bad checksum"
  assert len(files.describe(ValueError("x" * 1000))) < 260


def test_atomic_write_replaces_the_file_and_leaves_nothing_when_it_fails(tmp_path):
  path = str(tmp_path / "rollback.json")
  files.atomic_write(path, "one\n")
  files.atomic_write(path, "two\n")
  assert open(path).read() == "two\n" and os.listdir(tmp_path) == ["rollback.json"]
  os.makedirs(tmp_path / "sub" / "rollback.json")  # a directory where the file goes
  with pytest.raises(
    WorkdirError, match="rollback.json is a directory where safetrain keeps a file"
  ):
    files.atomic_write(str(tmp_path / "sub" / "rollback.json"), "three\n")
  assert os.listdir(tmp_path / "sub") == ["rollback.json"]  # no temporary file left


def test_an_io_fault_is_one_line_naming_the_intact_checkpoint(tmp_path):
  d = str(tmp_path)
  _save(d, 5)
  compat.write_checkpoint_state(d, [files.path_of(d, 5)])
  full = OSError(28, "No space left on device", os.path.join(d, "ckpt-10_temp"))
  with pytest.raises(WorkdirError) as e:
    files.raise_io_error(d, "cannot write checkpoint ckpt-10", full, write=True)
  assert str(e.value).startswith("cannot write checkpoint ckpt-10: ")
  assert f"({files.path_of(d, 5)}) is intact" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(KeyError):  # not an I/O fault: a bug, raised as it is
    files.raise_io_error(d, "cannot write", KeyError("x"), write=True)
