"""MultiWorkerMirroredStrategy: two worker processes on localhost.

Each worker is a `python -m safetrain` subprocess with its own TF_CONFIG (a
MultiWorkerMirroredStrategy must exist before any other TensorFlow op in its
process, and this one has run plenty). Both get the same --workdir, as on a
shared filesystem: the chief (worker 0) writes it; worker 1 takes part in each
collective checkpoint save through a scratch directory it deletes, and restores
the checkpoint the chief chose.

Run these alone with `pytest -m multiworker`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from common import ROOT

import safetrain

EXPERIMENT = os.path.join(ROOT, "tests", "fixtures", "mw_experiment.py")
TIMEOUT = 180


def free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:
      s.bind(("localhost", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def run_workers(workdir, tmp_path, *flags):
  """Runs the two workers to the end; returns [(returncode, stdout, stderr)]."""
  ports = free_ports(2)
  cluster = {"worker": [f"localhost:{p}" for p in ports]}
  procs = []
  for index in range(2):
    env = dict(
      os.environ,
      TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
      TF_CPP_MIN_LOG_LEVEL="2",
      MW_WEIGHTS_OUT=str(tmp_path / f"weights{index}.npz"),
    )
    cmd = [
      sys.executable,
      "-m",
      "safetrain",
      f"--config={EXPERIMENT}",
      f"--workdir={workdir}",
      *flags,
    ]
    procs.append(
      subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    )
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=TIMEOUT)
      out.append((p.returncode, stdout.decode(), stderr.decode()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return out


def weights(tmp_path, index):
  with np.load(tmp_path / f"weights{index}.npz") as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.multiworker
def test_two_workers_share_one_rollback_and_only_the_chief_writes(tmp_path):
  workdir = tmp_path / "run"
  (rc0, out0, err0), (rc1, out1, err1) = run_workers(str(workdir), tmp_path)
  assert rc0 == 0, err0[-3000:]
  assert rc1 == 0, err1[-3000:]
  # The drill poisoned only worker 1's replica; both saw the same divergence
  # and rolled back together.
  # The chief's full lines are in WORKDIR/log.txt (its terminal has the
  # short ones); worker 1 writes no log.txt and prints every line.
  chief_log = (workdir / "log.txt").read_text()
  assert "safetrain: step 5: nonfinite_loss -> rollback" in err0
  for err in (chief_log, err1):
    assert "incident at step 5: nonfinite_loss -> rollback" in err

  def summary(out):
    return [line for line in out.splitlines() if line.startswith("step ")][-1]

  assert summary(out0) == summary(out1)
  assert summary(out0).startswith("step 12: 2 incidents, 1 rollbacks, lr scale 0.5")
  # Only the chief exports the model.
  assert "model exported to" in out0 and "model exported to" not in out1
  # Both restored the chief's checkpoint: they end with identical weights.
  w0, w1 = weights(tmp_path, 0), weights(tmp_path, 1)
  assert len(w0) == len(w1) == 4
  for a, b in zip(w0, w1):
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))

  # One set of records and checkpoints, written by the chief.
  found = [
    os.path.relpath(os.path.join(d, f), workdir) for d, _, fs in os.walk(workdir) for f in fs
  ]
  assert sum(os.path.basename(f) == "incidents.jsonl" for f in found) == 1
  ckpts = sorted(f for f in os.listdir(workdir / "checkpoints") if f.endswith(".index"))
  assert ckpts == ["ckpt-0.index", "ckpt-12.index", "ckpt-4.index", "ckpt-8.index"]
  assert not [f for f in found if ".scratch" in f]
  incidents = safetrain.read_jsonl(str(workdir / "incidents.jsonl"))
  rollbacks = [i for i in incidents if i["action"] == "rollback"]
  assert len(rollbacks) == 1
  assert rollbacks[0]["restored_step"] == 4 and rollbacks[0]["checkpoint"] == "ckpt-4"
  assert rollbacks[0]["lr_scale_after"] == 0.5
  metrics = safetrain.read_jsonl(str(workdir / "metrics.jsonl"))
  assert metrics[-1]["step"] == 12 and metrics[-1]["lr_scale"] == 0.5


@pytest.mark.multiworker
@pytest.mark.slow
def test_two_workers_resume_from_the_chiefs_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  first = run_workers(workdir, tmp_path, "--config.train.steps=8")
  assert [rc for rc, _, _ in first] == [0, 0], first[1][2][-3000:]
  second = run_workers(workdir, tmp_path)
  assert [rc for rc, _, _ in second] == [0, 0], second[1][2][-3000:]
  for _, out, err in second:
    assert "Resumed from" in err and "ckpt-8" in err
    assert "step 12: " in out
  for a, b in zip(weights(tmp_path, 0), weights(tmp_path, 1)):
    np.testing.assert_array_equal(a, b)
  # The resumed pair ends where one uninterrupted pair does.
  straight = tmp_path / "straight"
  straight.mkdir()
  assert [rc for rc, _, _ in run_workers(str(straight / "run"), straight)] == [0, 0]
  for a, b in zip(weights(tmp_path, 0), weights(straight, 0)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
