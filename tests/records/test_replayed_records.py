"""A resume replays the steps after its checkpoint. The incidents and the
quarantine records a stopped process already wrote for them (it was killed,
or an I/O fault stopped it between one record and the next checkpoint) are
not written a second time; what the replay finds beyond them is (issue 25
item 10)."""

import errno
import os

import pytest
import tensorflow as tf
from common import TinyTrainer, fill_the_disk_for, tiny_config

import safetrain


def read(workdir, name):
  path = os.path.join(workdir, name)
  return safetrain.read_jsonl(path) if os.path.exists(path) else []


def incident_keys(workdir):
  return [(r["step"], r["kind"], r["action"]) for r in read(workdir, "incidents.jsonl")]


def quarantine_keys(workdir):
  return [(r["attempt"], r["position"], r["action"]) for r in read(workdir, "quarantine.jsonl")]


def config(**overrides):
  # Bad batches at attempts 3 and 8, one per inner loop of 5.
  return tiny_config(
    **{"train.steps": 10, "checkpoint.every_steps": 5, "drill.loss_steps": "3,8", **overrides}
  )


EXPECTED_INCIDENTS = [
  (3, "nonfinite_loss", "quarantined_batch"),
  (7, "nonfinite_loss", "quarantined_batch"),
]
EXPECTED_QUARANTINE = [(3, 2, "quarantined_batch"), (8, 7, "quarantined_batch")]


def test_a_fault_between_the_incident_and_the_quarantine_record_is_not_recorded_twice(
  workdir, monkeypatch
):
  fill_the_disk_for(monkeypatch, "quarantine.jsonl")
  with pytest.raises(OSError, match="No space left"):
    TinyTrainer(config(), workdir).fit()
  # The incident of the first loop was written, its quarantine record not.
  assert incident_keys(workdir) == EXPECTED_INCIDENTS[:1]
  assert quarantine_keys(workdir) == []
  monkeypatch.undo()
  result = TinyTrainer(config(), workdir).fit()
  assert result.step == 10 and result.quarantined == 2
  assert incident_keys(workdir) == EXPECTED_INCIDENTS
  assert quarantine_keys(workdir) == EXPECTED_QUARANTINE


def fail_the_second_save(monkeypatch):
  """ckpt-0 commits; the save at step 5 fails (the process stops there)."""
  real = tf.train.CheckpointManager.save
  saves = []

  def save(self, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
      raise OSError(errno.EIO, os.strerror(errno.EIO), self.directory)
    return real(self, *args, **kwargs)

  monkeypatch.setattr(tf.train.CheckpointManager, "save", save)


def test_a_stop_before_the_checkpoint_replays_the_loop_without_duplicates(workdir, monkeypatch):
  fail_the_second_save(monkeypatch)
  with pytest.raises(safetrain.WorkdirError, match="ckpt-0\\) is intact"):
    TinyTrainer(config(), workdir).fit()
  assert incident_keys(workdir) == EXPECTED_INCIDENTS[:1]
  assert quarantine_keys(workdir) == EXPECTED_QUARANTINE[:1]
  monkeypatch.undo()
  result = TinyTrainer(config(), workdir).fit()
  # Resumed at step 0: the first loop ran again, found the same bad batch,
  # and wrote nothing twice; the second loop's is new and recorded.
  assert result.step == 10
  assert incident_keys(workdir) == EXPECTED_INCIDENTS
  assert quarantine_keys(workdir) == EXPECTED_QUARANTINE


def test_a_replay_that_finds_something_else_records_it(workdir, monkeypatch):
  fail_the_second_save(monkeypatch)
  with pytest.raises(safetrain.WorkdirError, match="ckpt-0\\) is intact"):
    TinyTrainer(config(), workdir).fit()
  monkeypatch.undo()
  # The rerun's data is bad at attempt 4, not 3: the replay's incident is
  # another one, so it is recorded beside the first process's.
  TinyTrainer(config(**{"drill.loss_steps": "4,8"}), workdir).fit()
  assert incident_keys(workdir) == [
    (3, "nonfinite_loss", "quarantined_batch"),
    (4, "nonfinite_loss", "quarantined_batch"),
    (7, "nonfinite_loss", "quarantined_batch"),
  ]
