"""Automatic recovery: rollback, learning-rate backoff, data skip, budget."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from common import ROOT, IndexTrainer, TinyTrainer, all_finite, tiny_config, weights

import safetrain
from safetrain.recovery import rollback as recovery


def incidents(workdir):
  return safetrain.read_jsonl(os.path.join(workdir, "incidents.jsonl"))


def test_consecutive_nans_roll_back_halve_the_lr_and_training_completes(workdir):
  c = tiny_config()  # checkpoints every 10 steps, rollback after 3 bad steps
  c.drill.loss_steps = "12-14"
  t = TinyTrainer(c, workdir)
  r = t.fit()
  assert r.step == 20 and r.rollbacks == 1 and r.lr_scale == 0.5 and all_finite(t)
  skipped, rollback = incidents(workdir)
  assert (skipped["kind"], skipped["action"], skipped["step"], skipped["count"]) == (
    "nonfinite_loss",
    "skipped_step",
    12,
    3,
  )
  assert rollback["action"] == "rollback" and rollback["kind"] == "nonfinite_loss"
  assert rollback["restored_step"] == 10 and rollback["step"] == 12
  assert (rollback["lr_scale_before"], rollback["lr_scale_after"]) == (1.0, 0.5)
  # Batches since the checkpoint: one good (step 11) and the three bad ones.
  assert rollback["batches_skipped"] == 4 and r.batches_skipped == 4
  for key in (
    "step",
    "kind",
    "action",
    "restored_step",
    "lr_scale_before",
    "lr_scale_after",
    "batches_skipped",
    "diagnosis",
    "time",
  ):
    assert key in rollback
  recs = safetrain.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert recs[-1]["lr_scale"] == 0.5 and recs[-1]["step"] == 20


def test_divergence_at_step_one_rolls_back_to_the_initial_state(workdir):
  c = tiny_config()
  c.drill.loss_steps = "1-3"
  t = TinyTrainer(c, workdir)
  t.build()
  initial = weights(t)
  r = t.fit()
  rollback = [i for i in incidents(workdir) if i["action"] == "rollback"]
  assert [(i["step"], i["restored_step"]) for i in rollback] == [(1, 0)]
  assert r.step == 20 and r.rollbacks == 1
  assert not np.array_equal(weights(t)[0], initial[0])


def test_budget_exhaustion_raises_with_a_diagnosis_and_keeps_the_checkpoint(workdir):
  c = tiny_config(**{"recovery.max_rollbacks": 2})
  c.drill.grad_steps = "8-100000"
  t = TinyTrainer(c, workdir)
  with pytest.raises(safetrain.DivergenceError) as err:
    t.fit()
  e = err.value
  assert "rollback budget is spent" in e.diagnosis and "nonfinite_grads" in e.diagnosis
  actions = [i["action"] for i in incidents(workdir) if i["action"] != "skipped_step"]
  assert actions == ["rollback", "rollback", "abort"]
  # The last healthy checkpoint is intact, loadable and finite.
  reader = tf.train.load_checkpoint(e.last_healthy_checkpoint)
  dtypes = reader.get_variable_to_dtype_map()
  floats = [k for k, d in dtypes.items() if d.is_floating]
  assert len(floats) >= len(t.model.weights)
  for key in floats:
    assert np.all(np.isfinite(reader.get_tensor(key))), key


def test_lr_scale_floor_stops_the_run(workdir):
  c = tiny_config(**{"recovery.min_lr_scale": 0.3})
  c.drill.loss_steps = "5-7,9-11"
  with pytest.raises(safetrain.DivergenceError, match="under recovery.min_lr_scale=0.3"):
    TinyTrainer(c, workdir).fit()


@pytest.mark.parametrize("snapshots", [0, 2])
def test_escalation_goes_one_checkpoint_further_back(workdir, snapshots):
  c = tiny_config(**{"train.steps": 30, "recovery.snapshots": snapshots})
  c.drill.loss_steps = "22-24,26-28"  # the second incident comes before step 30
  r = TinyTrainer(c, workdir).fit()
  rollbacks = [i for i in incidents(workdir) if i["action"] == "rollback"]
  assert [i["restored_step"] for i in rollbacks] == [20, 10]
  # The state of step 20 comes from memory when there is a snapshot of it (the
  # same values as ckpt-20); escalating past the ring goes to disk.
  memory = [i["checkpoint"].startswith("memory snapshot") for i in rollbacks]
  assert memory == [bool(snapshots), False]
  assert r.lr_scale == 0.25 and r.step == 30


def test_budget_refills_after_healthy_steps(workdir):
  c = tiny_config(
    **{"train.steps": 30, "recovery.max_rollbacks": 1, "recovery.budget_reset_steps": 5}
  )
  c.drill.loss_steps = "3-5,26-28"
  r = TinyTrainer(c, workdir).fit()
  assert r.rollbacks == 2 and r.step == 30


def test_rewarm_ramps_the_learning_rate_after_a_rollback(workdir):
  c = tiny_config(**{"train.steps_per_loop": 1, "recovery.rewarm_steps": 4})
  c.drill.loss_steps = "12-14"
  TinyTrainer(c, workdir).fit()
  recs = safetrain.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  lr = {m["step"]: m["lr"] for m in recs if m["good"]}
  # lr at step s is the rate used for update s; restored at 11 (the snapshot
  # of the last one-step loop) -> ramp 1/4..4/4 from step 12.
  [rollback] = [i for i in incidents(workdir) if i["action"] == "rollback"]
  assert rollback["restored_step"] == 11
  assert [round(lr[s] / 0.005, 6) for s in (12, 13, 14, 15, 16)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("mode", ["skip", "replay"])
def test_skip_versus_replay_decides_which_batches_follow_a_rollback(workdir, mode):
  c = tiny_config(
    **{
      "train.steps": 8,
      "train.steps_per_loop": 1,
      "checkpoint.every_steps": 4,
      "recovery.data": mode,
    }
  )
  c.trainer = "IndexTrainer"
  c.drill.loss_steps = "6-8"  # batches 5, 6, 7 (0-based) are the bad ones
  IndexTrainer(c, workdir).fit()
  recs = safetrain.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  seen = [(m["step"], int(m["batch_index"])) for m in recs if m["good"]]
  before = [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
  [rollback] = [i for i in incidents(workdir) if i["action"] == "rollback"]
  if mode == "skip":
    # Back to the in-memory snapshot of step 5, reading on after the bad batches.
    assert seen == before + [(6, 8), (7, 9), (8, 10)]
    assert (rollback["restored_step"], rollback["batches_skipped"]) == (5, 3)
  else:
    # Replay rewinds the iterator: from the checkpoint of step 4 (snapshots
    # hold no iterator), the same batches again.
    assert seen == before + [(5, 4), (6, 5), (7, 6), (8, 7)]
    assert (rollback["restored_step"], rollback["batches_skipped"]) == (4, 0)


class _Killed(Exception):
  pass


def test_a_run_killed_after_a_rollback_resumes_with_lower_lr_and_spent_budget(workdir, monkeypatch):
  c = tiny_config(**{"recovery.max_rollbacks": 2})
  c.drill.loss_steps = "12-14"
  first = TinyTrainer(c, workdir)
  roll_back = recovery.Recovery.roll_back

  def recover_then_die(*args, **kwargs):
    roll_back(*args, **kwargs)
    raise _Killed  # the process dies right after the rollback

  monkeypatch.setattr(recovery.Recovery, "roll_back", recover_then_die)
  with pytest.raises(_Killed):
    first.fit()
  monkeypatch.undo()

  second = TinyTrainer(c, workdir)
  r = second.fit()
  assert r.step == 20 and r.lr_scale == 0.5 and r.rollbacks == 1 and all_finite(second)
  assert int(second.state["recovery"].rollbacks_used.numpy()) == 1
  assert int(second.state["recovery"].attempts.numpy()) > 14  # the drill did not fire again


def test_healthy_run_is_identical_with_recovery_disabled(tmp_path):
  runs = {}
  for enabled in (True, False):
    c = tiny_config(**{"train.steps": 25, "recovery.enabled": enabled})
    t = TinyTrainer(c, str(tmp_path / str(enabled)))
    r = t.fit()
    assert r.incidents == []
    runs[enabled] = weights(t)
  for a, b in zip(runs[True], runs[False]):
    np.testing.assert_array_equal(a, b)


def test_the_command_exits_3_when_recovery_is_spent(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "safetrain",
      f"--config={ROOT}/experiments/linear_regression.py:smoke",
      f"--workdir={tmp_path}",
      "--config.drill.loss_steps=1-100000",
      "--config.recovery.max_rollbacks=1",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert "safetrain: diverged: Training diverged" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_after_divergence_error_the_model_holds_the_last_healthy_state(workdir):
  """An action poisons the weights after every loop from step 10 on: each
  loop is rolled back (nonfinite_params) until the budget is spent. After the
  DivergenceError, trainer.model holds the last healthy checkpoint's weights,
  not the poisoned ones."""

  class Poisoner(TinyTrainer):
    def actions(self):
      def poison(record):
        if record.step >= 10:
          kernel = self.model.trainable_variables[0]
          kernel.assign(kernel * float("nan"))

      return [poison]

  c = tiny_config(**{"recovery.max_rollbacks": 2, "train.steps": 40})
  t = Poisoner(c, workdir)
  with pytest.raises(safetrain.DivergenceError) as err:
    t.fit()
  assert [i["kind"] for i in incidents(workdir) if i["action"] == "rollback"] == [
    "nonfinite_params"
  ] * 2
  reader = tf.train.load_checkpoint(err.value.last_healthy_checkpoint)
  saved = [reader.get_tensor(f"model_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE") for i in range(2)]
  live = [v.numpy() for v in t.model.variables[:2]]
  assert all(np.isfinite(w).all() for w in live)
  assert all(np.array_equal(a, b) for a, b in zip(saved, live))
