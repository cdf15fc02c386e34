"""The promises on a store without rename or locks (issue 23).

`SAFETRAIN_STORE=objects` makes a local directory behave as an object store
(storage/files.py `LocalObjects`): a write is one atomic put, and safetrain
gets no rename, no append and no flock. The drills: a kill -9 of the real
command between its writes, then a bit-exact finish; a lost commit marker
(the checkpoint state file, rollback.json); two owners of the lease.
"""

import json
import os
import socket
import time
import traceback

import numpy as np
import pytest
from common import TinyTrainer, tiny_config, weights
from test_drills import _check_end_state, _reference_run, drill
from test_lose_nothing import GOOD, _cli, _one_error_line

import safetrain
from safetrain.storage import files as storage
from safetrain.storage import lock as lock_lib

STEPS = 100


@pytest.fixture
def objects(monkeypatch):
  """The rename-free test store for this test (and the processes it starts),
  with every rename safetrain's own code asks of the OS counted."""
  monkeypatch.setenv(storage.STORE_ENV, "objects")
  calls = []
  package = os.path.dirname(safetrain.__file__)
  store_module = os.path.join(package, "storage", "files.py")
  for name in ("rename", "replace"):
    real = getattr(os, name)

    def counted(src, dst, *args, _real=real, **kwargs):
      ours = [(f.filename, f.name) for f in traceback.extract_stack()[:-1]]
      ours = [f for f in ours if f[0].startswith(package)]
      # The test store's put (a private rename in Posix.write that emulates
      # an object store's atomic write) is the store, not a rename safetrain
      # asks for; any other, a move included, is counted.
      if ours and ours[-1] != (store_module, "write"):
        calls.append((os.fspath(src), ours[-1]))
      return _real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, name, counted)
  return calls


def test_the_test_store_refuses_rename_and_locks(objects, tmp_path):
  store = storage.store_for(str(tmp_path))
  assert store.name == "local-objects" and not store.renames and not store.locks
  with pytest.raises(OSError, match="no rename"):
    store.rename(str(tmp_path / "a"), str(tmp_path / "b"))
  # The counter sees a rename safetrain's code asks for (a POSIX move), and
  # not the test store's own put.
  (tmp_path / "a").write_text("x")
  storage.Posix().move(str(tmp_path / "a"), str(tmp_path / "b"))
  storage.write(str(tmp_path / "c"), "y")
  assert [src for src, _ in objects] == [str(tmp_path / "a")]
  objects.clear()
  assert lock_lib.WorkdirLock(str(tmp_path)).kind == "lease"
  with pytest.raises(safetrain.WorkdirError, match="storage.locking=flock needs a local"):
    lock_lib.WorkdirLock(str(tmp_path), mode="flock").acquire()


def test_a_run_resume_and_rollback_use_no_rename_and_a_lost_marker_is_rebuilt(objects, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"train.steps": 30, "drill.loss_steps": "14-16"})
  config.guard.rollback_after = 3
  assert TinyTrainer(tiny_config(**{"train.steps": 10}), workdir).fit().step == 10
  assert TinyTrainer(config, workdir).fit().rollbacks == 1
  assert objects == [], objects  # no rename asked of the store
  assert not os.path.exists(os.path.join(workdir, ".lock"))  # the lease was released
  # The commit marker lost: the state file is rebuilt from the files, and
  # the run goes on to the same weights as a run that lost nothing.
  ckpt = os.path.join(workdir, "checkpoints")
  intact = str(tmp_path / "intact")
  os.system(f"cp -r {workdir} {intact}")
  os.remove(os.path.join(ckpt, "checkpoint"))
  lost = TinyTrainer(tiny_config(**{"train.steps": 40}), workdir)
  kept = TinyTrainer(tiny_config(**{"train.steps": 40}), intact)
  assert lost.fit().step == kept.fit().step == 40
  for a, b in zip(weights(lost), weights(kept)):
    np.testing.assert_array_equal(a, b)
  assert objects == [], objects


def test_a_lost_rollback_marker_resumes_from_the_checkpoint(objects, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"train.steps": 20, "drill.loss_steps": "14-16"})
  config.guard.rollback_after = 3
  config.checkpoint.every_steps = 10
  TinyTrainer(config, workdir).fit()
  ckpt = os.path.join(workdir, "checkpoints")
  # A rollback committed after the last save would leave rollback.json; the
  # marker lost (never written, or deleted): its side state files are
  # removed as uncommitted, and the run resumes from the checkpoint.
  with open(os.path.join(ckpt, "rollback-9.index"), "wb") as f:
    f.write(b"uncommitted")
  result = TinyTrainer(tiny_config(**{"train.steps": 25}), workdir).fit()
  assert result.step == 25 and not os.path.exists(os.path.join(ckpt, "rollback-9.index"))
  assert objects == [], objects


def test_kill9_between_writes_on_the_test_store_then_a_bit_exact_finish(objects, tmp_path):
  """The real command on the rename-free store: killed within 20 ms of a
  save's files appearing (between its writes), then run to the end: the
  checkpoint and the records equal an uninterrupted run's, bit for bit."""
  reference = _reference_run(str(tmp_path / "reference"), STEPS)
  workdir, log_path = str(tmp_path / "run"), tmp_path / "log"
  with open(log_path, "wb") as log:
    report = drill.run_with_kills(workdir, STEPS, 1, seed=5, log=log, max_delay=1.0)
  text = log_path.read_text()
  assert report.kills == 1 and report.aimed_kills == 1 and report.final_exit_code == 0, text[-3000:]
  assert "Traceback" not in text
  _check_end_state(workdir, reference, STEPS)


# ------------------------------------------------------------- the lease


def _lease(path):
  return json.loads(open(os.path.join(path, ".lock")).read())


def test_a_live_lease_refuses_a_second_owner_naming_it(objects, tmp_path, capsys):
  holder = lock_lib.WorkdirLock(str(tmp_path), lease_seconds=30)
  holder.acquire()
  try:
    info = _lease(tmp_path)
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert 29 < info["expires"] - info["time"] <= 30
    with pytest.raises(lock_lib.WorkdirInUseError) as e:
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert f"pid {os.getpid()} on {socket.gethostname()} holds the lease" in str(e.value)
    assert e.value.holder == os.getpid()
    # The command: exit 2, one line naming the owner, nothing written.
    before = sorted(os.listdir(tmp_path))
    code, _, err = _cli([f"--config={GOOD}", f"--workdir={tmp_path}"], capsys)
    _one_error_line(code, err, "is in use by another safetrain run", f"pid {os.getpid()}")
    assert sorted(os.listdir(tmp_path)) == before
  finally:
    holder.release()
  assert not os.path.exists(tmp_path / ".lock")


def test_fit_takes_a_lease_under_storage_locking_lease(tmp_path, monkeypatch):
  """On a local directory (no test store), `storage.locking=lease` makes
  fit() take the lease: a live one refuses it, and it is released after."""
  holder = lock_lib.WorkdirLock(str(tmp_path), mode="lease")
  config = tiny_config(**{"train.steps": 5, "storage.locking": "lease"})
  with holder:
    with pytest.raises(lock_lib.WorkdirInUseError, match="holds the lease"):
      TinyTrainer(config, str(tmp_path)).fit()
  seen = []
  real = lock_lib._Lease.acquire
  monkeypatch.setattr(lock_lib._Lease, "acquire", lambda self: seen.append(1) or real(self))
  assert TinyTrainer(config, str(tmp_path)).fit().step == 5
  assert seen == [1] and not os.path.exists(tmp_path / ".lock")


def test_the_lease_is_renewed_and_a_renewal_that_finds_another_owner_marks_it_lost(
  objects, tmp_path
):
  holder = lock_lib.WorkdirLock(str(tmp_path), lease_seconds=1.0)
  holder.acquire()
  try:
    first = _lease(tmp_path)["time"]
    time.sleep(0.5)
    assert _lease(tmp_path)["time"] > first  # renewed every lease_seconds / 3
    other = dict(_lease(tmp_path), owner="someone-else", pid=1)
    storage.write(str(tmp_path / ".lock"), json.dumps(other))
    deadline = time.monotonic() + 5
    while not holder.lost and time.monotonic() < deadline:
      time.sleep(0.05)
    assert holder.lost and _lease(tmp_path)["owner"] == "someone-else"
  finally:
    holder.release()
  assert _lease(tmp_path)["owner"] == "someone-else"  # not ours: left alone


def test_two_runs_writing_the_lease_at_once_only_the_last_writer_goes_on(
  objects, tmp_path, monkeypatch
):
  """No conditional write: a run that writes its lease while the first one
  pauses before reading back wins; the first is refused."""
  real_sleep = time.sleep
  rival = {"owner": "rival", "pid": 424242, "host": "elsewhere", "time": time.time()}
  rival["expires"] = rival["time"] + 60

  def rival_writes(seconds):
    storage.write(str(tmp_path / ".lock"), json.dumps(rival))
    real_sleep(seconds)

  monkeypatch.setattr(lock_lib.time, "sleep", rival_writes)
  with pytest.raises(lock_lib.WorkdirInUseError, match="pid 424242 on elsewhere"):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  assert _lease(tmp_path)["owner"] == "rival"


@pytest.mark.parametrize("why", ["expired", "dead_pid"])
def test_a_lease_left_by_a_dead_run_is_taken_over_with_a_warning(objects, tmp_path, why, caplog):
  now = time.time()
  stale = {"owner": "gone", "pid": 2**22 + 7, "host": socket.gethostname(), "time": now}
  if why == "expired":
    stale.update(pid=1, host="another-host", expires=now - 1)
  else:  # on this host, its pid is gone: no need to wait for the expiry
    stale.update(expires=now + 600)
  storage.write(str(tmp_path / ".lock"), json.dumps(stale))
  lock = lock_lib.WorkdirLock(str(tmp_path))
  lock.acquire()
  try:
    assert _lease(tmp_path)["owner"] != "gone"
    assert "taking over the lease" in caplog.text
  finally:
    lock.release()


def test_a_ram_workdir_holds_a_lease(tmp_path):
  workdir = f"ram://lease-{os.getpid()}-{time.monotonic_ns()}/run"
  lock = lock_lib.WorkdirLock(workdir)
  assert lock.kind == "lease"
  with lock:
    with pytest.raises(lock_lib.WorkdirInUseError):
      lock_lib.WorkdirLock(workdir).acquire()
  assert not storage.exists(workdir + "/.lock")
