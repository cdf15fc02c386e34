"""Prove it survives: preemption, kill -9, damaged checkpoints, foreign workdirs,
torn records.

The subprocess drills run the real command on tests/fixtures/configs/
kill_drill.py (dropout, a reshuffled dataset, a checkpoint every loop) and
compare the end state bit for bit with an uninterrupted in-process run of the
same experiment. benchmarks/drill_kill.py holds the drill machinery and the
long version (20 kills); a 3-kill version runs here.
"""

import importlib.util
import json
import os
import shutil
import signal
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import BASE, ROOT, TinyTrainer, tiny_config, weights

import safetrain
from safetrain.checkpoint import store as checkpointing
from safetrain.cli import experiment
from safetrain.cli import main as cli
from safetrain.core import compat
from safetrain.storage.jsonl import JsonlWriter, read_jsonl

STEPS = 200  # of the subprocess drills: about 4 s of training here


def _load_drill():
  spec = importlib.util.spec_from_file_location(
    "drill_kill", os.path.join(ROOT, "benchmarks", "drill_kill.py")
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules["drill_kill"] = module
  spec.loader.exec_module(module)
  return module


drill = _load_drill()


def _reference_run(workdir, steps):
  """An uninterrupted in-process run of the drill experiment (bit-identical to
  the command's run: the drills below check exactly that)."""
  module = experiment.load_module(drill.EXPERIMENT)
  config = module.get_config()
  config.train.steps = steps
  module.DrillTrainer(config, workdir).fit()
  return workdir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return _reference_run(str(tmp_path_factory.mktemp("reference") / "run"), STEPS)


def _ckpt_dir(workdir):
  return os.path.join(workdir, "checkpoints")


def _fit(workdir, cls=TinyTrainer, **overrides):
  trainer = cls(tiny_config(**overrides), str(workdir))
  return trainer, trainer.fit()


def _state(trainer):
  return weights(trainer) + [v.numpy() for v in trainer.optimizer.variables]


# ------------------------------------------------------------- preemption


def test_sigint_in_process_stops_cleanly_and_the_resume_is_exact(tmp_path):
  overrides = {"train.steps": 50, "train.steps_per_loop": 5, "checkpoint.every_steps": 25}
  workdir = tmp_path / "run"
  metrics = workdir / "metrics.jsonl"

  def interrupt():
    while not (metrics.exists() and metrics.stat().st_size):
      time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGINT)

  thread = threading.Thread(target=interrupt, daemon=True)
  thread.start()
  first, r1 = _fit(workdir, **overrides)
  thread.join()
  assert r1.stopped == "preempted"
  assert 0 < r1.step < 50 and r1.step % 5 == 0  # the inner loop finished
  assert first.parts.checkpoints.latest_step() == r1.step
  assert read_jsonl(str(metrics))[-1]["step"] == r1.step
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler put back

  resumed, r2 = _fit(workdir, **overrides)
  straight, r3 = _fit(tmp_path / "straight", **overrides)
  assert r2.step == r3.step == 50 and r2.stopped == "completed"
  for a, b in zip(_state(resumed), _state(straight)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_before_training_starts_exits_143_without_a_traceback(tmp_path, capfd, monkeypatch):
  experiment_file = os.path.join(ROOT, "tests", "fixtures", "configs", "sigterm_at_start.py")
  monkeypatch.setattr(
    sys, "argv", ["safetrain", f"--config={experiment_file}", f"--workdir={tmp_path}"]
  )
  previous = signal.getsignal(signal.SIGTERM)
  try:
    with pytest.raises(SystemExit) as e:
      cli.run()
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert e.value.code == 143
  err = capfd.readouterr().err
  assert "stopped by a signal outside the training loop" in err and "Traceback" not in err


# ----------------------------------------------------------------- kill -9


def _check_end_state(workdir, reference, steps=STEPS):
  assert not checkpointing.scan(_ckpt_dir(workdir)).interrupted_save
  n = drill.compare_checkpoints(
    drill.final_checkpoint(workdir, steps), drill.final_checkpoint(reference, steps)
  )
  assert n > 20  # model, optimizer, step, loss scale, spike detector, recovery, data position
  assert drill.compare_metrics(workdir, reference) == steps // 5


def test_sigterm_then_a_kill9_at_a_random_moment_then_a_bit_exact_finish(tmp_path, reference):
  """One run of the command: preempted with SIGTERM, restarted, killed with
  SIGKILL at a random moment, restarted to the end (a process start each is
  what costs the time here; the twenty-kill drill below is the long one)."""
  workdir, log_path = str(tmp_path / "run"), tmp_path / "log"
  with open(log_path, "wb") as log:
    p = drill.start(workdir, STEPS, log)
    assert drill.wait_for_progress(p, workdir), "the run ended before it was signalled"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
  text = log_path.read_text()
  assert "Traceback" not in text and "run the same command to resume" in text
  stopped_at = drill.check_records(workdir)[-1]["step"]
  assert 0 < stopped_at < STEPS
  # The inner loop finished, and its step is checkpointed: nothing is lost.
  found = checkpointing.scan(_ckpt_dir(workdir))
  assert found.latest == stopped_at and not found.interrupted_save

  with open(log_path, "ab") as log:
    report = drill.run_with_kills(workdir, STEPS, 1, seed=3, log=log, max_delay=1.0)
  text = log_path.read_text()
  assert report.kills == 1 and report.final_exit_code == 0, text[-3000:]
  assert "Traceback" not in text
  # The first restart resumed at the preempted step.
  assert f"Resumed from {_ckpt_dir(workdir)}/ckpt-{stopped_at} at step {stopped_at}" in text
  steps = [r["step"] for r in drill.check_records(workdir) if "loss" in r]
  assert steps[: stopped_at // 5] == list(range(5, stopped_at + 1, 5))
  assert steps[-1] == STEPS
  _check_end_state(workdir, reference)


@pytest.mark.slow
def test_twenty_kill9_at_random_moments_then_a_bit_exact_finish(tmp_path):
  # Long enough that all 20 kills land before the run ends (1000 steps was
  # not, once start-up got faster): the benchmark's drill length.
  steps = 3000
  reference = _reference_run(str(tmp_path / "reference"), steps)
  workdir = str(tmp_path / "run")
  with open(tmp_path / "log", "wb") as log:
    report = drill.run_with_kills(workdir, steps, 20, seed=20, log=log, max_delay=1.0)
  text = (tmp_path / "log").read_text()
  assert report.kills == 20 and report.final_exit_code == 0, text[-3000:]
  assert "Traceback" not in text
  _check_end_state(workdir, reference, steps)
  print(f"{report.mid_checkpoint_kills} of 20 kills landed mid-checkpoint: {report.traces}")


# --------------------------------------------------- interrupted saves, damage

# `run` (conftest.py): a copy, for one test to damage, of a workdir trained
# with common.BASE (step 25, ckpt-15, ckpt-20 and ckpt-25).


def _resumed_from(workdir):
  return os.path.basename(json.load(open(os.path.join(workdir, "config.json")))["resumed_from"])


def _list_in_state_file(d, steps):
  """Rewrites the state file as CheckpointManager would have left it."""
  d = str(d)
  compat.write_checkpoint_state(d, [checkpointing.path_of(d, s) for s in steps])


def _flip_bytes(path):
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 3, len(data) // 3 + 16):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])


DAMAGE = {
  "changed_bytes": lambda p: _flip_bytes(p + ".data-00000-of-00001"),
  "truncated_data": lambda p: _truncate(p + ".data-00000-of-00001"),
  "missing_index": lambda p: os.remove(p + ".index"),
  "truncated_index": lambda p: _truncate(p + ".index"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_used(run, capfd, damage):
  d = _ckpt_dir(run)
  DAMAGE[damage](os.path.join(d, "ckpt-25"))
  evidence = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d) if "ckpt-25." in n}
  capfd.readouterr()

  trainer, result = _fit(run, **dict(BASE, **{"train.steps": 40}))
  err = capfd.readouterr().err
  assert "ckpt-25" in err and "unreadable" in err and "falling back" in err
  assert _resumed_from(run) == "ckpt-20" and result.step == 40
  # The evidence is kept byte for byte, and max_to_keep (3) never touches it
  # though 4 checkpoints were saved since.
  corrupt = os.path.join(d, checkpointing.CORRUPT_DIR)
  assert {n: open(os.path.join(corrupt, n), "rb").read() for n in os.listdir(corrupt)} == evidence
  assert [s for s, _ in trainer.parts.checkpoints.checkpoints()] == [30, 35, 40]


def test_when_every_checkpoint_is_damaged_the_run_stops_and_keeps_them(run):
  for s in (15, 20, 25):
    _flip_bytes(os.path.join(_ckpt_dir(run), f"ckpt-{s}.data-00000-of-00001"))
  with pytest.raises(safetrain.WorkdirError, match="no readable checkpoint"):
    _fit(run, **BASE)
  corrupt = os.listdir(os.path.join(_ckpt_dir(run), checkpointing.CORRUPT_DIR))
  assert len(corrupt) == 6  # three checkpoints, index and data each: none deleted


def test_a_checkpoint_with_non_finite_values_is_not_resumed_from(run, capfd):
  # Written behind the trainer's back: it only ever saves finite states.
  writer = TinyTrainer(tiny_config(**BASE), str(run))
  writer.build()
  writer.parts.checkpoints.restore_latest()
  writer.model.weights[0].assign(tf.fill(writer.model.weights[0].shape, np.nan))
  writer.state["run"].step.assign(30)
  writer.parts.checkpoints.save(30)
  capfd.readouterr()
  _, result = _fit(run, **dict(BASE, **{"train.steps": 35}))
  assert "ckpt-30 is unreadable (it restores non-finite values)" in capfd.readouterr().err
  assert _resumed_from(run) == "ckpt-25" and result.step == 35


def test_traces_of_an_interrupted_save_are_cleaned_up(run):
  d = run / "checkpoints"
  # Killed before the commit of ckpt-25: the state file does not list it yet
  # (and still lists ckpt-10, whose files a killed clean-up had deleted).
  # ckpt-25 is complete, so the next start adopts it.
  _list_in_state_file(d, [10, 15, 20])
  # Killed while writing ckpt-30 (temporary directory, a half-written index
  # without a commit), and while the state file was being replaced.
  os.makedirs(os.path.join(d, "ckpt-30_temp"))
  open(os.path.join(d, "ckpt-30_temp", "part-00000-of-00001.index"), "wb").write(b"x")
  shutil.copy(os.path.join(d, "ckpt-25.data-00000-of-00001"), d / "ckpt-30.data-00000-of-00001")
  open(os.path.join(d, "ckpt-30.index"), "wb").write(open(d / "ckpt-25.index", "rb").read()[:40])
  open(os.path.join(d, "checkpoint.tmp0123abcd"), "w").write("model_checkpoint_path: ")
  found = checkpointing.scan(str(d))
  assert found.interrupted_save
  assert found.leftovers == ["checkpoint.tmp0123abcd", "ckpt-30_temp"]
  assert found.unlisted == [25, 30] and found.incomplete == [10]

  trainer, result = _fit(run, **dict(BASE, **{"train.steps": 30}))
  assert _resumed_from(run) == "ckpt-25" and result.step == 30
  found = checkpointing.scan(str(d))
  assert not found.interrupted_save
  assert sorted(found.files) == [20, 25, 30] and found.latest == 30
  assert not os.path.exists(os.path.join(d, checkpointing.CORRUPT_DIR))  # nothing was damaged
  assert len(trainer.parts.checkpoints.repairs) == 4  # 2 leftovers, ckpt-30, ckpt-10


def test_a_first_save_cut_short_starts_the_run_afresh(tmp_path):
  # Killed while writing the very first checkpoint (the initial state, step
  # 0): no state file yet, data renamed into place, index half written.
  run = tmp_path / "run"
  _fit(run, **dict(BASE, **{"train.steps": 5}))
  d = run / "checkpoints"
  os.remove(d / "checkpoint")
  for name in os.listdir(d):
    if not name.startswith("ckpt-0."):
      os.remove(d / name)
  _truncate(str(d / "ckpt-0.index"))
  _, result = _fit(run, **dict(BASE, **{"train.steps": 5}))
  assert json.load(open(run / "config.json"))["resumed_from"] is None
  assert result.step == 5 and sorted(checkpointing.scan(str(d)).files) == [0, 5]
  assert not os.path.exists(d / checkpointing.CORRUPT_DIR)


def test_a_lone_cut_short_checkpoint_past_step_0_is_kept_not_taken_for_a_first_save(run):
  # The same traces at step 25 cannot be the first save (that is ckpt-0): a
  # lost state file and damage. Kept in corrupt/, and the run stops.
  d = run / "checkpoints"
  os.remove(d / "checkpoint")
  for name in os.listdir(d):
    if not name.startswith("ckpt-25."):
      os.remove(d / name)
  _truncate(str(d / "ckpt-25.index"))
  evidence = sorted(open(d / n, "rb").read() for n in os.listdir(d))
  with pytest.raises(safetrain.WorkdirError, match="no readable checkpoint"):
    _fit(run, **dict(BASE, **{"train.steps": 30}))
  corrupt = d / checkpointing.CORRUPT_DIR
  assert sorted(open(corrupt / n, "rb").read() for n in os.listdir(corrupt)) == evidence


def test_a_clean_up_killed_half_way_is_finished_and_damage_is_not_mistaken_for_it(run, capfd):
  d = run / "checkpoints"
  # CheckpointManager lists a new save, then deletes the oldest (index first):
  # killed in between, ckpt-10 is listed with its data file only.
  shutil.copy(os.path.join(d, "ckpt-15.data-00000-of-00001"), d / "ckpt-10.data-00000-of-00001")
  _list_in_state_file(d, [10, 15, 20, 25])
  # ckpt-20 is kept by max_to_keep: its missing index is damage.
  os.remove(os.path.join(d, "ckpt-20.index"))
  capfd.readouterr()
  _, result = _fit(run, **dict(BASE, **{"train.steps": 30}))
  err = capfd.readouterr().err
  assert _resumed_from(run) == "ckpt-25" and result.step == 30
  assert "ckpt-20 is unreadable" in err and "ckpt-10" not in err
  assert os.listdir(os.path.join(d, checkpointing.CORRUPT_DIR)) == ["ckpt-20.data-00000-of-00001"]
  assert not any(n.startswith("ckpt-10.") for n in os.listdir(d))


# ------------------------------------------------------- foreign workdirs


class WideTrainer(TinyTrainer):
  def build_model(self):
    return keras.Sequential(
      [keras.Input((4,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )


class RenamedTrainer(TinyTrainer):
  pass


def test_a_workdir_of_another_model_is_a_clear_error_and_nothing_is_moved(run):
  before = sorted(os.listdir(_ckpt_dir(run)))
  with pytest.raises(safetrain.WorkdirError) as e:
    _fit(run, cls=WideTrainer, **BASE)
  message = str(e.value)
  assert "different model" in message and "TinyTrainer" in message and "WideTrainer" in message
  assert "[4, 16]" in message  # a shape only this model has
  assert sorted(os.listdir(_ckpt_dir(run))) == before


def test_a_workdir_of_another_optimizer_is_a_clear_error_and_nothing_is_moved(tmp_path):
  _fit(tmp_path, **{"train.steps": 10, "optimizer.name": "sgd"})
  before = sorted(os.listdir(_ckpt_dir(tmp_path)))
  with pytest.raises(safetrain.WorkdirError, match="does not fit this trainer"):
    _fit(tmp_path, **{"train.steps": 10, "optimizer.name": "adam"})
  assert sorted(os.listdir(_ckpt_dir(tmp_path))) == before


def test_a_renamed_trainer_with_the_same_model_resumes_with_a_warning(run, capfd):
  capfd.readouterr()
  _, result = _fit(run, cls=RenamedTrainer, **dict(BASE, **{"train.steps": 30}))
  assert "written by TinyTrainer, this is RenamedTrainer" in capfd.readouterr().err
  assert result.step == 30


def test_the_command_on_a_foreign_workdir_exits_2_with_one_line(run, capsys):
  args = ["safetrain", f"--config={drill.EXPERIMENT}", f"--workdir={run}"]
  assert cli.main_with_exit_code(args) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("safetrain: error: the checkpoint") and "\n" not in err
  assert "written by TinyTrainer, this is DrillTrainer" in err


# --------------------------------------------------------------- records


def test_a_torn_last_record_is_skipped_then_cut_off_and_every_line_stays_whole(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
  assert [r["step"] for r in read_jsonl(path)] == [1, 2]
  writer = JsonlWriter(path)
  writer.write({"step": 3, "loss": 0.5})
  lines = open(path).read().splitlines(keepends=True)
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
  assert all(line.endswith("\n") for line in lines)


def test_a_run_resumes_over_torn_records(run):
  for name in ("metrics.jsonl", "incidents.jsonl"):
    with open(run / name, "a") as f:
      f.write('{"step": 26, "kind": "nonfinite_lo')
  _fit(run, **dict(BASE, **{"train.steps": 30}))
  for name in ("metrics.jsonl", "incidents.jsonl"):
    for line in open(run / name):
      json.loads(line)
  assert [r["step"] for r in read_jsonl(str(run / "metrics.jsonl"))][-1] == 30
