"""One policy for every failure (safetrain/core/boundary.py), through the
command in-process: every user hook failing, an op error inside the
compiled loop, an OSError with and without a path, a bug in safetrain, and
every exit code of docs/errors.md.

Each case asserts the exit code, the one line on the terminal (no
traceback there) and the traceback in WORKDIR/log.txt.
"""

import errno
import os
import re

import pytest
from common import ROOT

import safetrain
from safetrain.cli import main as cli
from safetrain.core import boundary

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "configs")
HOOKS_FILE = os.path.join(FIXTURES, "failing_hooks.py")


def _cli(capsys, workdir, *flags, config=HOOKS_FILE):
  code = cli.main_with_exit_code(
    ["safetrain", f"--config={config}", f"--workdir={workdir}", *flags]
  )
  out, err = capsys.readouterr()
  return code, out, err


def _one_line(err, prefix="safetrain: error:"):
  assert "Traceback" not in err, err[-3000:]
  lines = [ln for ln in err.splitlines() if ln.startswith(prefix)]
  assert len(lines) == 1, err[-3000:]
  return lines[0]


def _log(workdir):
  with open(os.path.join(workdir, "log.txt"), encoding="utf-8") as f:
    return f.read()


@pytest.mark.parametrize("hook", boundary.HOOKS)
def test_every_user_hook_that_raises_exits_2_naming_it_with_the_traceback_in_log_txt(
  tmp_path, capsys, hook
):
  workdir = str(tmp_path / "run")
  code, _, err = _cli(capsys, workdir, f"--config.trainer=Raises_{hook}")
  assert code == 2, err[-3000:]
  line = _one_line(err)
  assert f"Raises_{hook}.{hook}() raised RuntimeError: {hook} broke" in line, line
  log = _log(workdir)
  assert "Traceback (most recent call last)" in log
  assert f"RuntimeError: {hook} broke" in log
  assert line in log  # the terminal's line heads the traceback


def test_compute_loss_that_is_not_graph_safe_exits_2_naming_it_when_traced(tmp_path, capsys):
  """.numpy() works when compute_loss is tried eagerly on the first batch,
  and fails only when the compiled step traces it."""
  workdir = str(tmp_path / "run")
  code, _, err = _cli(capsys, workdir, "--config.trainer=NumpyInLoss")
  assert code == 2, err[-3000:]
  line = _one_line(err)
  assert "NumpyInLoss.compute_loss() raised" in line and "numpy" in line, line
  assert "Traceback (most recent call last)" in _log(workdir)


def test_an_op_error_inside_the_loop_exits_2_with_the_steps_position_and_intact_checkpoint(
  tmp_path, capsys
):
  """A class label out of range in batch 3 (the first batch is fine): the
  op's message, the steps and data position of the loop, the last
  checkpoint intact; the files are those of a run stopped before step 1."""
  workdir = str(tmp_path / "run")
  code, _, err = _cli(capsys, workdir, "--config.trainer=LabelOutOfRange")
  assert code == 2, err[-3000:]
  line = _one_line(err)
  assert "a TensorFlow op failed in the training loop (steps 1-5" in line, line
  assert "data position 0" in line and "7 is not in [0, 3)" in line, line
  assert "the last checkpoint (step 0) is intact" in line, line
  assert "InvalidArgumentError" in _log(workdir)
  ckpts = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert [n for n in ckpts if n.startswith("ckpt-") and n.endswith(".index")] == ["ckpt-0.index"]
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_an_oserror_without_a_path_names_the_file_safetrain_was_writing(
  tmp_path, capsys, monkeypatch
):
  """A write that fails without naming its file (a flush at close, on a full
  disk): exit 2 naming the file being written."""
  from safetrain.records import run_log

  real = run_log.storage.write

  def write(path, data):
    if not path.endswith("config.json"):
      return real(path, data)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  # config.json is written through the storage layer (one atomic write).
  monkeypatch.setattr(run_log.storage, "write", write)
  workdir = str(tmp_path / "run")
  code, _, err = _cli(capsys, workdir)
  assert code == 2, err[-3000:]
  line = _one_line(err)
  assert f"I/O error on {workdir}/config.json: No space left on device" in line, line
  assert "OSError" in _log(workdir)


def test_an_oserror_of_any_errno_in_a_checkpoint_save_exits_2_naming_the_checkpoint(
  tmp_path, capsys, monkeypatch
):
  """EEXIST, not among the errnos once recognised: exit 2, not a traceback."""
  import tensorflow as tf

  real = tf.train.CheckpointManager.save

  def save(self, checkpoint_number=None, **kwargs):
    if checkpoint_number:
      raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
    return real(self, checkpoint_number=checkpoint_number, **kwargs)

  monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
  workdir = str(tmp_path / "run")
  code, _, err = _cli(capsys, workdir)
  assert code == 2, err[-3000:]
  line = _one_line(err)
  assert f"cannot write checkpoint {workdir}/checkpoints/ckpt-5: File exists" in line, line
  assert f"({workdir}/checkpoints/ckpt-0) is intact" in line, line
  assert "FileExistsError" in _log(workdir)


def test_a_bug_in_safetrain_exits_1_saying_so_and_where_the_traceback_is(
  tmp_path, capsys, monkeypatch
):
  from safetrain.records import run_log

  def broken(*args, **kwargs):
    raise KeyError("lost")

  monkeypatch.setattr(run_log, "loop_record", broken)
  workdir = str(tmp_path / "run")
  code, _, err = _cli(capsys, workdir)
  assert code == 1, err[-3000:]
  line = _one_line(err, "safetrain: internal error:")
  assert "a bug in safetrain: KeyError: 'lost'" in line, line
  assert f"traceback is in {workdir}/log.txt" in line, line
  log = _log(workdir)
  assert "Traceback (most recent call last)" in log and "loop_record" in log


def test_every_exit_code_of_docs_errors_md(tmp_path, capsys, monkeypatch):
  """0, 1, 2, 3 and 143, each from a real run of the command, and the table
  of docs/errors.md lists exactly these."""
  with open(os.path.join(ROOT, "docs", "errors.md"), encoding="utf-8") as f:
    doc = f.read()
  section = doc.split("## Exit codes of the command")[1].split("\n## ")[0]
  table = {int(m) for m in re.findall(r"^\| `(\d+)` \|", section, re.M)}
  assert table == {0, 1, 2, 3, 143}

  seen = {}
  code, _, err = _cli(capsys, tmp_path / "ok")
  seen[0] = code
  code, _, err = _cli(capsys, tmp_path / "hook", "--config.trainer=Raises_build_model")
  seen[2] = code
  rollbacks = os.path.join(FIXTURES, "rollbacks.py")
  code, _, err = _cli(
    capsys, tmp_path / "diverged", "--config.recovery.max_rollbacks=0", config=rollbacks
  )
  seen[3] = code
  assert _one_line(err, "safetrain: diverged:")

  # An action of the fixture sends SIGTERM to this process after a rollback.
  code, _, err = _cli(capsys, tmp_path / "preempted", config=rollbacks + ":sigterm")
  seen[143] = code

  from safetrain.records import run_log

  monkeypatch.setattr(run_log, "loop_record", lambda *a, **k: 1 / 0)
  code, _, err = _cli(capsys, tmp_path / "bug")
  seen[1] = code
  assert seen == {c: c for c in table}, seen


def test_hook_error_keeps_safetrains_own_errors_as_they_are():
  def own():
    raise safetrain.ConfigError("optimizer.name", "x", "one of adam")

  with pytest.raises(safetrain.ConfigError):
    boundary.call("build_optimizer", own)
  with pytest.raises(boundary.HookError, match=r"build_model\(\) raised ValueError: bad"):
    boundary.call("build_model", lambda: (_ for _ in ()).throw(ValueError("bad\nmore")))


def _inventory(directory):
  """{relative path: (sha256, mtime_ns)} of every file under `directory`."""
  import hashlib

  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, directory)] = (digest, os.stat(path).st_mtime_ns)
  return out


def test_a_workdir_of_another_experiment_is_refused_and_not_written(tmp_path, capsys):
  """No log.txt line, no event file, no record: every file byte-identical,
  but the lock's own record (which pid holds the workdir: the refused run
  held it while it looked)."""
  workdir = str(tmp_path / "run")
  code, _, err = _cli(capsys, workdir)
  assert code == 0, err[-3000:]
  before = _inventory(workdir)
  code, _, err = _cli(capsys, workdir, "--config.trainer=LabelOutOfRange")
  line = _one_line(err)
  assert code == 2 and "was written for a different model" in line, line
  after = _inventory(workdir)
  assert after.pop(".lock") and before.pop(".lock")
  assert after == before


def test_a_workdir_another_run_holds_is_refused_and_not_written(tmp_path, capsys):
  from safetrain.storage import lock

  workdir = str(tmp_path / "run")
  code, _, err = _cli(capsys, workdir)
  assert code == 0, err[-3000:]
  held = lock.WorkdirLock(workdir)
  held.acquire()
  try:
    before = _inventory(workdir)
    code, _, err = _cli(capsys, workdir, "--config.train.steps=20")
    line = _one_line(err)
    assert code == 2 and "is in use by another safetrain run" in line, line
    assert _inventory(workdir) == before
  finally:
    held.release()


# What would make a run silently useless, each refused at build naming the hook.
CONTRACT_CASES = {
  "IntegerLoss": "IntegerLoss.compute_loss() returned a loss of dtype int32",
  "VectorLossOfThree": "VectorLossOfThree.compute_loss() returned a loss of shape [3] for a "
  "batch of 8",
  "NothingTrainable": "NothingTrainable.build_model() returned a model with no trainable",
  "ClipnormOptimizer": "ClipnormOptimizer.build_optimizer() returned an optimizer with "
  "clipnorm=1.0",
}


@pytest.mark.parametrize("trainer", sorted(CONTRACT_CASES))
def test_a_hook_that_would_train_nothing_is_refused_at_build_naming_it(tmp_path, capsys, trainer):
  workdir = str(tmp_path / "run")
  code, _, err = _cli(capsys, workdir, f"--config.trainer={trainer}")
  assert code == 2, err[-3000:]
  assert CONTRACT_CASES[trainer] in _one_line(err)
  assert not os.path.exists(os.path.join(workdir, "checkpoints")), "refused before step 0"
  assert not os.path.exists(os.path.join(workdir, "export"))
