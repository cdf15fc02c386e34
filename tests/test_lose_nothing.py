"""Lose nothing, ever (issue 11): attacks on the workdir and what must survive.

One run per workdir (a lock; a double launch of the real command), rollbacks
that rewrite no committed checkpoint (a kill -9 timed on the rollback's file
changes), lost or damaged state that is repaired and never deleted, rollback
targets checked before and after they are restored, and I/O faults that end
in one line and a resumable workdir.

The subprocess drills run the real command on tests/fixtures/configs/
kill_drill.py, with the machinery of benchmarks/drill_kill.py.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf
from common import BASE, ROOT, TinyTrainer, all_finite, fill_the_disk_for, tiny_config
from test_drills import DAMAGE, _ckpt_dir, _fit, _flip_bytes, drill

import safetrain
from safetrain.checkpoint import rollback_state
from safetrain.checkpoint import store as checkpointing
from safetrain.cli import main as cli
from safetrain.recovery import rollback as recovery
from safetrain.storage import lock as workdir

GOOD = drill.EXPERIMENT


def _files(directory):
  """{relative path: sha256} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _one_error_line(code, err, *expected):
  assert code == 2, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  lines = [ln for ln in err.splitlines() if ln.startswith("safetrain: error:")]
  assert len(lines) == 1, err[-3000:]
  for text in expected:
    assert text in lines[0], lines[0]
  return lines[0]


def _cli(argv, capsys):
  code = cli.main_with_exit_code(["safetrain", *argv])
  out, err = capsys.readouterr()
  return code, out, err


# ------------------------------------------------------- 1: one run per workdir


def test_a_double_launch_trains_once_and_the_second_run_exits_2_naming_the_holder(tmp_path):
  """Two real processes of the command, started together on one workdir with
  different flags: one trains, the other exits 2 at once naming the workdir
  and the pid of the one that holds it, and changes nothing."""
  workdir = str(tmp_path / "run")
  lrs = ("0.01", "0.02")
  procs = []
  with open(tmp_path / "log0", "wb") as log0, open(tmp_path / "log1", "wb") as log1:
    for lr, log in zip(lrs, (log0, log1)):
      procs.append(drill.start(workdir, 3000, log, (f"--config.optimizer.learning_rate={lr}",)))
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
      time.sleep(0.05)
    done = [p for p in procs if p.poll() is not None]
    for p in procs:
      if p.poll() is None:
        # The winner: once it has recorded a loop, stop it; it has shown enough.
        drill.wait_for_progress(p, workdir, base=0)
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
  assert len(done) == 1, f"both runs were still training after 120 s (exit codes {codes})"
  loser = procs.index(done[0])
  winner = 1 - loser
  assert codes[loser] == 2 and codes[winner] == 143, codes
  err = (tmp_path / f"log{loser}").read_text()
  line = _one_error_line(2, err, f"--workdir={workdir} is in use", f"pid {procs[winner].pid}")
  assert "nothing was changed" in line
  # The workdir is the winner's alone: its flags, each step recorded once.
  config = json.load(open(os.path.join(workdir, "config.json")))["config"]
  assert config["optimizer"]["learning_rate"] == float(lrs[winner])
  steps = [r["step"] for r in drill.check_records(workdir) if "loss" in r]
  assert steps == list(range(5, 5 * len(steps) + 1, 5)) and steps
  assert checkpointing.scan(_ckpt_dir(workdir)).latest == steps[-1]


def _hold_lock(path):
  """A process (without TensorFlow) that holds the workdir lock until its
  stdin closes."""
  code = (
    "import sys\n"
    "from safetrain.storage.lock import WorkdirLock\n"
    "WorkdirLock(sys.argv[1]).acquire()\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
  )
  p = subprocess.Popen(
    [sys.executable, "-c", code, str(path)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert p.stdout.readline().strip() == b"locked"
  return p


def test_fit_refuses_a_locked_workdir_and_a_killed_holder_leaves_no_stale_lock(run):
  holder = _hold_lock(run)
  before = _files(run)
  try:
    with pytest.raises(workdir.WorkdirInUseError) as e:
      _fit(run, **dict(BASE, **{"train.steps": 30}))
    assert e.value.holder == holder.pid and f"pid {holder.pid}" in str(e.value)
    assert isinstance(e.value, safetrain.WorkdirError)  # exit 2 in the command
    assert _files(run) == before  # nothing touched, not even config.json
  finally:
    holder.kill()  # kill -9: the kernel releases the lock
    holder.wait()
  _, result = _fit(run, **dict(BASE, **{"train.steps": 30}))
  assert result.step == 30


def test_only_the_chief_of_a_multi_worker_run_takes_the_lock():
  cluster = {"worker": ["a:1", "b:1"]}
  task = lambda t, i: json.dumps({"cluster": cluster, "task": {"type": t, "index": i}})  # noqa: E731
  assert workdir.is_chief_process("multi_worker", task("worker", 0))
  assert not workdir.is_chief_process("multi_worker", task("worker", 1))
  with_chief = json.dumps({"cluster": dict(cluster, chief=["c:1"]), "task": {"type": "worker"}})
  assert not workdir.is_chief_process("multi_worker", with_chief)
  assert workdir.is_chief_process("auto", task("worker", 1))  # TF_CONFIG is not ours then


# -------------------------------------------- 2: rollbacks rewrite no checkpoint


def test_no_save_ever_writes_over_a_committed_checkpoint(workdir, monkeypatch):
  """A rollback (to ckpt-10), then a second incident before the run got past
  it (escalated to ckpt-0, ckpt-10 retired), then training on: every save
  goes to a step no committed checkpoint has, and a committed checkpoint's
  bytes never change while it is committed."""
  saves, committed = [], {}
  original = checkpointing.CheckpointStore.save

  def watched(self, step):
    d = self.directory
    found = checkpointing.scan(d)
    assert step not in found.listed, f"ckpt-{step} is committed and would be rewritten"
    for s in found.listed:  # what is committed is exactly what was saved
      assert _files_of(d, s) == committed[s], f"ckpt-{s} changed while committed"
    path = original(self, step)
    committed[step] = _files_of(d, step)
    saves.append(step)
    return path

  monkeypatch.setattr(checkpointing.CheckpointStore, "save", watched)
  c = tiny_config(**{"train.steps": 30})
  c.drill.loss_steps = "12-14,17-19"
  t = TinyTrainer(c, workdir)
  r = t.fit()
  rollbacks = [i for i in r.incidents if i["action"] == "rollback"]
  assert [(i["step"], i["restored_step"]) for i in rollbacks] == [(12, 10), (13, 0)]
  assert saves == [0, 10, 10, 20, 30]  # ckpt-10 again only after it was retired
  assert r.step == 30 and r.lr_scale == 0.25 and all_finite(t)
  d = _ckpt_dir(workdir)
  assert not os.path.exists(os.path.join(d, checkpointing.ROLLBACK_FILE))  # superseded
  assert not checkpointing.scan(d).side


def _files_of(d, step):
  return {
    n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
    for n in os.listdir(d)
    if n.startswith(f"ckpt-{step}.")
  }


ROLLBACK_STEPS = 60
# NaN losses at attempts 23-25: a rollback to ckpt-20; at 28-30: a second
# incident before the run got past ckpt-20, escalated to ckpt-15.
ROLLBACK_FLAGS = ("--config.drill.loss_steps=23-25,28-30",)


@pytest.fixture(scope="module")
def rollback_reference(tmp_path_factory):
  """An uninterrupted in-process run of the rollback drill."""
  reference = str(tmp_path_factory.mktemp("rollback_reference") / "run")
  module = drill_module()
  config = module.get_config()
  config.train.steps = ROLLBACK_STEPS
  config.drill.loss_steps = ROLLBACK_FLAGS[0].split("=", 1)[1]
  module.DrillTrainer(config, reference).fit()
  assert drill.rollbacks_recorded(reference) == 2
  return reference


def _rollback_drill(tmp_path, reference, kills):
  """Runs the command, killed with SIGKILL at each (moment, nth rollback) of
  `kills`, then to the end; checks the end state is bit-identical to the
  reference's. Returns the kill traces and the log."""
  work = str(tmp_path / "run")
  traces = []
  with open(tmp_path / "log", "wb") as log:
    for moment, nth in kills:
      p = drill.start(work, ROLLBACK_STEPS, log, ROLLBACK_FLAGS)
      traces.append(drill.kill_at_rollback(p, work, moment, nth))
      assert traces[-1] is not None, "the run ended before the rollback"
    p = drill.start(work, ROLLBACK_STEPS, log, ROLLBACK_FLAGS)
    assert p.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
  # The terminal, and WORKDIR/log.txt (every line: the INFO ones are there).
  text = (tmp_path / "log").read_text() + open(os.path.join(work, "log.txt")).read()
  assert "Traceback" not in text and "unreadable" not in text and "cannot be used" not in text
  assert not os.path.exists(os.path.join(_ckpt_dir(work), checkpointing.CORRUPT_DIR))
  n = drill.compare_checkpoints(
    drill.final_checkpoint(work, ROLLBACK_STEPS), drill.final_checkpoint(reference, ROLLBACK_STEPS)
  )
  assert n > 20  # model, optimizer, step, loss scale, spikes, recovery state, data position
  assert drill.compare_metrics(work, reference) == ROLLBACK_STEPS // 5
  assert not checkpointing.scan(_ckpt_dir(work)).interrupted_save
  return traces, text


def test_kill9_at_the_first_write_of_a_rollback_then_a_bit_exact_finish(
  tmp_path, rollback_reference
):
  """The command, killed with SIGKILL at the first file change of its second
  (escalated) rollback, timed by polling checkpoints/ in a tight loop: the
  first rollback is committed (rollback.json, no model saved), the second's
  side state half written. The restart applies the first, redoes the second,
  and ends bit-identical to an uninterrupted run.

  The kill races the rollback's few milliseconds of writes: on a loaded
  machine the poller may see the first change only after the commit. Every
  try must end bit-identical; the drill is tried again (up to 3 times) until
  the kill lands between the first write and the commit."""
  for attempt in range(3):
    (tmp_path / f"try{attempt}").mkdir()
    traces, text = _rollback_drill(tmp_path / f"try{attempt}", rollback_reference, [("change", 2)])
    assert any(n.startswith("rollback-") for n in traces[0]["first_change"]), traces
    if traces[0]["rollback"]["base"] == 20:  # still the first rollback's commit
      break
  assert traces[0]["rollback"]["base"] == 20, "the kill never landed before the commit"
  assert "applied the state of the rollback to ckpt-20" in text


@pytest.mark.slow
def test_kill9_at_every_moment_of_the_rollbacks_then_a_bit_exact_finish(
  tmp_path, rollback_reference
):
  """Slow (four processes): killed at the first write of the first rollback
  (nothing committed: the restart redoes it), at the commit of its redo, and
  at the commit of the escalated one (ckpt-20 not yet retired)."""
  kills = [("change", 1), ("commit", 1), ("commit", 1)]
  traces, text = _rollback_drill(tmp_path, rollback_reference, kills)
  assert traces[0]["rollback"] is None
  assert [t["rollback"]["base"] for t in traces[1:]] == [20, 15]
  assert "applied the state of the rollback to ckpt-15" in text


def drill_module():
  from safetrain.cli import experiment  # noqa: PLC0415

  return experiment.load_module(drill.EXPERIMENT)


class _Killed(BaseException):
  pass


def test_a_kill_after_the_rollback_commit_resumes_with_its_state(run, monkeypatch):
  """In-process: the rollback's commit (rollback.json) is the last thing the
  process did. The restart restores the rollback's checkpoint (not the newer
  one it went back from), retires that newer one, and carries on with the
  lowered learning rate, the spent budget and the data position."""
  c = tiny_config(**dict(BASE, **{"train.steps": 35}))
  c.drill.loss_steps = "27-29,31-33"  # at 25: a rollback to 25, then one to 20
  first = TinyTrainer(c, str(run))
  first.build()
  record = first.parts.checkpoints.record_rollback
  state = {}

  def commit_then_die(path, generation):
    if generation == 2:
      # The commit, then death before the retirement of ckpt-25.
      with monkeypatch.context() as m:
        m.setattr(rollback_state.RollbackState, "retire", lambda *args, **kwargs: None)
        record(path, generation)
      state.update(
        first.state["recovery"].snapshot(), position=int(first.state["data"].position.numpy())
      )
      raise _Killed
    record(path, generation)

  first.parts.checkpoints.record_rollback = commit_then_die
  with pytest.raises(_Killed):
    first.fit()
  d = _ckpt_dir(run)
  assert 25 in checkpointing.scan(d).listed  # not retired yet
  second = TinyTrainer(c, str(run))
  second.build()
  assert second._controller._restore_latest() == os.path.join(d, "ckpt-20")
  assert second.state["recovery"].snapshot() == {k: v for k, v in state.items() if k != "position"}
  assert int(second.state["data"].position.numpy()) == state["position"]
  assert state["lr_scale"] == 0.25 and state["rollbacks_used"] == 2
  assert 25 not in checkpointing.scan(d).listed  # the retirement was finished
  assert not os.path.exists(os.path.join(d, checkpointing.CORRUPT_DIR))
  assert not any(n.startswith("ckpt-25.") for n in os.listdir(d))
  third = TinyTrainer(c, str(run))
  r = third.fit()
  assert r.step == 35 and r.lr_scale == 0.25 and r.rollbacks == 2


class MappedTrainer(TinyTrainer):
  """TinyTrainer with one more stage in its input pipeline."""

  def build_train_dataset(self):
    return super().build_train_dataset().map(lambda x, y: (x * 1.0, y))


@pytest.mark.parametrize("change", ["batch_size", "pipeline"])
def test_a_committed_rollback_applies_after_the_input_pipeline_changed(run, caplog, change):
  """Killed right after a rollback's commit, resumed with another batch size
  or another pipeline stage: the checkpointed iterator (also the one in the
  rollback state) no longer fits, so the data is found again by position,
  and the rest of what the rollback committed (learning-rate scale, budget)
  still applies."""
  c = tiny_config(**dict(BASE, **{"train.steps": 35}))
  c.drill.loss_steps = "27-29"
  first = TinyTrainer(c, str(run))
  first.build()
  record = first.parts.checkpoints.record_rollback

  def commit_then_die(path, generation):
    record(path, generation)
    raise _Killed

  first.parts.checkpoints.record_rollback = commit_then_die
  with pytest.raises(_Killed):
    first.fit()
  caplog.clear()
  cls = TinyTrainer
  if change == "batch_size":
    c.train.batch_size = 8
  else:
    cls = MappedTrainer
  with caplog.at_level("INFO"):
    r = cls(c, str(run)).fit()
  said = " ".join(rec.getMessage() for rec in caplog.records)
  assert "cannot be used" not in said and "re-created" in said
  assert "applied the state of the rollback to ckpt-25" in said
  assert r.step == 35 and r.lr_scale == 0.5 and r.rollbacks == 1
  assert not os.path.exists(os.path.join(_ckpt_dir(run), checkpointing.CORRUPT_DIR))


# ---------------------------------- 3, 6: lost or damaged state, nothing deleted


@pytest.fixture(scope="module")
def command_trained(tmp_path_factory):
  """A workdir of the command (kill_drill.py) at step 25: ckpt-15, 20, 25."""
  work = tmp_path_factory.mktemp("command") / "run"
  assert (
    cli.main_with_exit_code(
      ["safetrain", f"--config={GOOD}", f"--workdir={work}", "--config.train.steps=25"]
    )
    == 0
  )
  return work


def test_state_file_lost_and_every_checkpoint_damaged_exits_2_and_keeps_every_file(
  command_trained, tmp_path, capsys
):
  run = tmp_path / "run"
  shutil.copytree(command_trained, run)
  d = _ckpt_dir(run)
  os.remove(os.path.join(d, "checkpoint"))
  for s in (15, 20, 25):
    _flip_bytes(os.path.join(d, f"ckpt-{s}.data-00000-of-00001"))
  before = _files(d)
  assert len(before) == 6
  code, _, err = _cli([f"--config={GOOD}", f"--workdir={run}"], capsys)
  _one_error_line(code, err, "no readable checkpoint", "Nothing was deleted")
  after = _files(d)
  # Every file is still there, byte for byte, moved to corrupt/.
  assert sorted(after.values()) == sorted(before.values()) and len(after) == 6
  assert all(p.startswith(checkpointing.CORRUPT_DIR + os.sep) for p in after)


def test_state_file_lost_and_the_newest_checkpoint_damaged_moves_it_and_resumes(run, capfd):
  d = _ckpt_dir(run)
  os.remove(os.path.join(d, "checkpoint"))
  DAMAGE["truncated_index"](os.path.join(d, "ckpt-25"))  # what a kill leaves, but not provably
  evidence = {n: h for n, h in _files(d).items() if n.startswith("ckpt-25.")}
  _, result = _fit(run, **dict(BASE, **{"train.steps": 30}))
  assert "ckpt-25 is unreadable" in capfd.readouterr().err
  assert json.load(open(run / "config.json"))["resumed_from"].endswith("ckpt-20")
  corrupt = {n: h for n, h in _files(d).items() if n.startswith(checkpointing.CORRUPT_DIR)}
  assert sorted(corrupt.values()) == sorted(evidence.values())
  assert result.step == 30


@pytest.mark.parametrize("content", [b"", b"model_checkpoint_path: \x00\xff garbage"])
def test_an_empty_or_garbled_state_file_is_rebuilt_and_the_run_resumes(run, capfd, content):
  d = _ckpt_dir(run)
  with open(os.path.join(d, "checkpoint"), "wb") as f:
    f.write(content)  # an empty one is what a power loss can leave
  _, result = _fit(run, **dict(BASE, **{"train.steps": 30}))
  err = capfd.readouterr().err
  assert json.load(open(run / "config.json"))["resumed_from"].endswith("ckpt-25")
  assert result.step == 30 and checkpointing.scan(d).has_state
  kept = os.listdir(os.path.join(d, checkpointing.CORRUPT_DIR)) if content else []
  assert ("is empty" in err) if not content else ("does not parse" in err and len(kept) == 1)
  if content:
    assert open(os.path.join(d, checkpointing.CORRUPT_DIR, kept[0]), "rb").read() == content


# ------------------------------------- 4, 5: rollback targets, checked, set aside


def _nan_checkpoint(run, step):
  """Rewrites ckpt-STEP with NaN weights, behind the trainer's back (it only
  ever saves finite states)."""
  d = _ckpt_dir(run)
  writer = TinyTrainer(tiny_config(**BASE), str(run))
  writer.build()
  writer.parts.checkpoints.checkpoint.restore(os.path.join(d, f"ckpt-{step}")).expect_partial()
  writer.model.weights[0].assign(tf.fill(writer.model.weights[0].shape, np.nan))
  for name in os.listdir(d):
    if name.startswith(f"ckpt-{step}."):
      os.remove(os.path.join(d, name))
  writer.parts.checkpoints.checkpoint.write(os.path.join(d, f"ckpt-{step}"))


@pytest.mark.parametrize("damage", ["changed_bytes", "nan_weights"])
def test_a_bad_older_checkpoint_is_set_aside_when_a_rollback_reaches_it(run, capfd, damage):
  """Resumed at 25 (ckpt-15, 20, 25): a rollback to 25, then an escalation
  to 20, which is damaged (bytes changed) or holds NaN weights: it is set
  aside and the rollback uses 15, with one backoff each, no more."""
  d = _ckpt_dir(run)
  if damage == "nan_weights":
    _nan_checkpoint(run, 20)
  else:
    _flip_bytes(os.path.join(d, "ckpt-20.data-00000-of-00001"))
  evidence = sorted(h for n, h in _files(d).items() if n.startswith("ckpt-20."))
  c = tiny_config(**dict(BASE, **{"train.steps": 40}))
  c.drill.loss_steps = "27-29,31-33"
  trainer = TinyTrainer(c, str(run))
  capfd.readouterr()
  r = trainer.fit()
  err = capfd.readouterr().err
  rollbacks = [i for i in r.incidents if i["action"] == "rollback"]
  assert [i["restored_step"] for i in rollbacks] == [25, 15]
  assert r.rollbacks == 2 and r.lr_scale == 0.25 and r.step == 40 and all_finite(trainer)
  why = "it restores non-finite values" if damage == "nan_weights" else "DataLossError"
  assert f"ckpt-20 is unreadable ({why}" in err
  corrupt = os.path.join(d, checkpointing.CORRUPT_DIR)
  assert sorted(h for n, h in _files(corrupt).items()) == evidence
  assert 20 not in [s for s, _ in trainer.parts.checkpoints.checkpoints()]


def test_a_rollback_with_no_readable_checkpoint_left_stops_and_deletes_nothing(run, monkeypatch):
  """Every checkpoint is damaged on disk at the moment a rollback looks for a
  target: each is set aside, and the run stops with DivergenceError (exit 3)
  instead of restoring garbage; every file is kept in corrupt/."""
  d = _ckpt_dir(run)
  # No in-memory snapshots: the rollback's target is on disk.
  c = tiny_config(**dict(BASE, **{"train.steps": 40, "recovery.snapshots": 0}))
  c.drill.loss_steps = "27-29"
  trainer = TinyTrainer(c, str(run))
  find = recovery.rollback_target
  evidence = []

  def damage_then_find(*args):
    if not evidence:  # once, when the rollback starts looking for a target
      for n in sorted(os.listdir(d)):
        if n.startswith("ckpt-") and ".data-" in n:
          _flip_bytes(os.path.join(d, n))
      evidence.extend(sorted(_files(d)[n] for n in _files(d) if n.startswith("ckpt-")))
    return find(*args)

  monkeypatch.setattr(recovery, "rollback_target", damage_then_find)
  with pytest.raises(safetrain.DivergenceError, match="no checkpoint is left to roll back to"):
    trainer.fit()
  corrupt = _files(os.path.join(d, checkpointing.CORRUPT_DIR))
  assert sorted(corrupt.values()) == sorted(evidence) and len(evidence) == 6
  assert not checkpointing.scan(d).files


# ------------------------------------------------------------- 7: I/O faults


def _no_space(calls):
  original = tf.train.CheckpointManager.save

  def save(self, checkpoint_number=None, **kwargs):
    calls.append(checkpoint_number)
    if len(calls) == 3:  # the third save: the disk is full
      raise tf.errors.ResourceExhaustedError(
        None,
        None,
        f"{self.directory}/ckpt-{checkpoint_number}_temp/part-00000-of-00001.data-00000-of-"
        "00001.tempstate1234; No space left on device",
      )
    return original(self, checkpoint_number=checkpoint_number, **kwargs)

  return save


def test_a_full_disk_at_a_save_exits_2_with_one_line_and_the_rerun_resumes(
  tmp_path, capsys, monkeypatch
):
  work = tmp_path / "run"
  argv = [f"--config={GOOD}", f"--workdir={work}", "--config.train.steps=20"]
  calls = []
  monkeypatch.setattr(tf.train.CheckpointManager, "save", _no_space(calls))
  code, _, err = _cli(argv, capsys)
  _one_error_line(code, err, "ckpt-10", "No space left on device", "ckpt-5) is intact")
  d = _ckpt_dir(work)
  found = checkpointing.scan(d)
  assert list(found.listed) == [0, 5] and not found.interrupted_save
  checkpointing.verify(os.path.join(d, "ckpt-5"))
  monkeypatch.undo()
  code, _, err = _cli(argv, capsys)
  assert code == 0, err[-3000:]
  assert json.load(open(work / "config.json"))["resumed_from"].endswith("ckpt-5")


@pytest.mark.parametrize("fault", ["metrics_is_a_directory", "metrics_on_a_full_device"])
def test_a_record_that_cannot_be_written_exits_2_and_the_rerun_resumes(
  tmp_path, capsys, monkeypatch, fault
):
  work = tmp_path / "run"
  argv = [f"--config={GOOD}", f"--workdir={work}", "--config.train.steps=10"]
  os.makedirs(work)
  metrics = work / "metrics.jsonl"
  if fault == "metrics_is_a_directory":  # refused before anything is written
    os.makedirs(metrics)
    expected = f"{metrics} is a directory where safetrain keeps a file"
  else:  # every write of the record fails with ENOSPC (as /dev/full answers)
    fill_the_disk_for(monkeypatch, "metrics.jsonl")
    expected = f"I/O error on {metrics}: {os.strerror(errno.ENOSPC)}"
  code, _, err = _cli(argv, capsys)
  line = _one_error_line(code, err, expected)
  if fault == "metrics_on_a_full_device":
    assert "ckpt-0) is intact" in line  # the initial state was committed first
  monkeypatch.undo()
  if metrics.is_dir():
    os.rmdir(metrics)
  code, _, err = _cli(argv, capsys)
  assert code == 0, err[-3000:]
  assert [r["step"] for r in drill.check_records(str(work)) if "loss" in r] == [5, 10]


def test_a_workdir_path_too_long_for_the_files_below_it_exits_2_before_training(tmp_path, capsys):
  limit = os.pathconf(str(tmp_path), "PC_PATH_MAX")
  work = str(tmp_path)
  while len(work) < limit - 100:  # passes the write probe, not a checkpoint's temp file
    work = os.path.join(work, "d" * min(200, limit - 100 - len(work)))
  code, _, err = _cli([f"--config={GOOD}", f"--workdir={work}"], capsys)
  _one_error_line(code, err, f"--workdir is {len(work)} characters long", "PATH_MAX")
  assert os.listdir(work) == []


def _as_nobody(path):
  """(command prefix, env) that run a child as an unprivileged user owning
  `path`, so that permission bits stop it (root ignores them); as is, when
  not root."""
  env = dict(os.environ, PYTHONPATH=ROOT, HOME=str(path), MPLCONFIGDIR=str(path))
  if os.geteuid() != 0:
    return [], env
  if shutil.which("setpriv") is None:
    pytest.skip("needs setpriv(1) to drop root")
  os.chown(path, 65534, 65534)
  return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], env


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_real_full_disk_and_a_workdir_made_read_only_mid_run(tmp_path):
  """Slow (four processes). A real ENOSPC: the command on a 96 KiB tmpfs in a
  private mount namespace; then, with room made, the same command resumes. A
  real EACCES: the workdir made read-only (chmod -R a-w) while the command
  trains as an unprivileged user; then, made writable again, it resumes.
  Each fault ends in exit 2 and one line naming the path and the cause."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  cmd = " ".join(drill.command(str(mnt / "run"), 3000))
  script = f"""
mount -t tmpfs -o size=96k tmpfs {mnt} || exit 77
{cmd} > {tmp_path}/full.log 2>&1; echo "full=$?"
mount -o remount,size=64m {mnt}
{cmd} --config.train.steps=40 > {tmp_path}/resumed.log 2>&1; echo "resumed=$?"
"""
  unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
  p = subprocess.run(
    [*unshare, "sh", "-c", script],
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, PYTHONPATH=ROOT),
    cwd=ROOT,
  )
  if p.returncode == 77 or "Operation not permitted" in p.stderr:
    pytest.skip(f"no private tmpfs mount here: {p.stderr.strip()[:200]}")
  codes = dict(line.split("=") for line in p.stdout.split())
  full = (tmp_path / "full.log").read_text()
  assert codes["full"] == "2", full[-3000:]
  _one_error_line(2, full, "ckpt-", "No space left on device", "Nothing committed was lost")
  resumed = (tmp_path / "resumed.log").read_text()
  assert codes["resumed"] == "0" and "Resumed from" in resumed, resumed[-3000:]

  # Outside pytest's temporary directory, which only root may enter.
  home = tempfile.mkdtemp(prefix="safetrain-ro-")
  try:
    work = os.path.join(home, "run")
    prefix, env = _as_nobody(home)
    with open(tmp_path / "ro.log", "wb") as log:
      run = subprocess.Popen(
        [*prefix, *drill.command(work, 3000)], cwd=ROOT, env=env, stdout=log, stderr=log
      )
      assert drill.wait_for_progress(run, work, base=0)
      subprocess.run(["chmod", "-R", "a-w", work], check=True)
      code = run.wait(timeout=300)
    ro = (tmp_path / "ro.log").read_text()
    assert code == 2, ro[-3000:]
    _one_error_line(2, ro, work, "Permission denied", "Nothing committed was lost")
    subprocess.run(["chmod", "-R", "u+w", work], check=True)
    p = subprocess.run([*prefix, *drill.command(work, 40)], cwd=ROOT, env=env, capture_output=True)
    assert p.returncode == 0 and b"Resumed from" in p.stderr, p.stderr[-3000:]
  finally:
    subprocess.run(["chmod", "-R", "u+w", home])
    shutil.rmtree(home, ignore_errors=True)
