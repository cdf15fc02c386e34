"""The TensorFlow and Keras internals safetrain relies on (safetrain/compat.py).

Each test attacks exactly what safetrain needs from one internal, so that an
upgrade that changes it fails here, by name, rather than in a run.
"""

import os
import shutil

import tensorflow as tf

from safetrain import compat
from safetrain.checkpoint_files import path_of


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
