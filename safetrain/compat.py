"""Every place safetrain reaches into TensorFlow or Keras internals.

Each internal is wrapped in one function here, with why no public API does
the job, and a test in tests/test_compat.py that attacks exactly what
safetrain relies on, so that a TensorFlow or Keras upgrade that changes it
fails there, loudly and by name, instead of somewhere deep in a run.
"""

from __future__ import annotations

from tensorflow.python.checkpoint import checkpoint_management


def write_checkpoint_state(
  directory: str,
  paths: list[str],
  timestamps: list[float] | None = None,
  last_preserved_timestamp: float | None = None,
) -> None:
  """Rewrites `directory`'s `checkpoint` state file to list exactly `paths`.

  The state file is written as `tf.train.CheckpointManager` writes it: paths
  relative to `directory`, the last of `paths` the latest, one timestamp each,
  replaced atomically (TensorFlow writes a temporary file and renames it).

  Why an internal: the repair on start and a rollback's retirement must
  unlist chosen checkpoints and keep the others' save times (max_to_keep
  reads them). CheckpointManager has no call for that, and the public
  `tf.compat.v1.train.update_checkpoint_state` writes the paths as given,
  absolute, so a copied or moved workdir would point into the original one.
  `update_checkpoint_state_internal(save_relative_paths=True)` is what
  CheckpointManager itself calls (also exported as
  `tf.__internal__.train.update_checkpoint_state`).

  Args:
    directory: the checkpoint directory.
    paths: the checkpoints to list, oldest save first; not empty.
    timestamps: the save time of each of `paths` (seconds since the epoch),
      or None for none (CheckpointManager then takes the time it starts).
    last_preserved_timestamp: what CheckpointManager's
      keep_checkpoint_every_n_hours counts from, or None.
  """
  checkpoint_management.update_checkpoint_state_internal(
    directory,
    model_checkpoint_path=paths[-1],
    all_model_checkpoint_paths=paths,
    all_model_checkpoint_timestamps=timestamps,
    last_preserved_timestamp=last_preserved_timestamp,
    save_relative_paths=True,
  )
