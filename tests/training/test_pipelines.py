"""Everyday input pipelines whose iterator cannot be checkpointed.

Random augmentation with `tf.random` in `map`, `tf.py_function` and
`Dataset.from_generator` hold state outside TensorFlow's graph: their
iterators fail in SerializeIterator. safetrain finds such a run's data again by
its position. Batch k carries its index k in column 0, and the `batch_index`
metric (one step per loop) says which batch each step trained on.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import ROOT, tiny_config

import safetrain
from safetrain.core import compat
from safetrain.storage.jsonl import read_jsonl

N = 10_000


def _rows(i, noise):
  """Batch i: 4 rows of [i, noise]; labels 0."""
  x = tf.concat([tf.fill([4, 1], tf.cast(i, tf.float32)), noise], axis=1)
  return x, tf.zeros([4, 1])


def random_map():
  return tf.data.Dataset.range(N).map(lambda i: _rows(i, tf.random.uniform([4, 1])))


def py_function():
  rng = np.random.default_rng(0)

  def noise(i):
    del i
    return rng.normal(size=(4, 1)).astype(np.float32)

  def rows(i):
    n = tf.py_function(noise, [i], tf.float32)
    return _rows(i, tf.reshape(n, [4, 1]))

  return tf.data.Dataset.range(N).map(rows)


def from_generator():
  def gen():
    rng = np.random.default_rng(0)
    for i in range(N):
      x = np.concatenate([np.full((4, 1), i), rng.normal(size=(4, 1))], 1)
      yield x.astype(np.float32), np.zeros((4, 1), np.float32)

  spec = (tf.TensorSpec([4, 2], tf.float32), tf.TensorSpec([4, 1], tf.float32))
  return tf.data.Dataset.from_generator(gen, output_signature=spec)


PIPELINES = {"random_map": random_map, "py_function": py_function, "from_generator": from_generator}


class PipelineTrainer(safetrain.Trainer):
  pipeline = "random_map"

  def build_model(self):
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])

  def build_train_dataset(self):
    return PIPELINES[self.pipeline]()

  def compute_loss(self, model, batch, training):
    x, y = batch
    pred = model(x[:, :1] * 0.0 + 1.0, training=training)
    return tf.reduce_mean(tf.square(pred - y)), {"batch_index": tf.reduce_mean(x[:, 0])}


def _trainer(pipeline, workdir, **overrides):
  cls = type(f"{pipeline}Trainer", (PipelineTrainer,), {"pipeline": pipeline})
  base = {"train.steps_per_loop": 1, "checkpoint.every_steps": 5, "checkpoint.max_to_keep": 10}
  return cls(tiny_config(**dict(base, **overrides)), workdir)


def _batches(workdir):
  """(step, batch index) of every loop record, in file order."""
  return [
    (r["step"], int(r["batch_index"]))
    for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if r.get("batch_index") is not None
  ]


def _kill_after_checkpoint(workdir, step):
  """What a kill -9 after `step` leaves: the newer checkpoints never written."""
  d = os.path.join(workdir, "checkpoints")
  state = tf.train.get_checkpoint_state(d)
  keep = [p for p in state.all_model_checkpoint_paths if int(p.rsplit("-", 1)[1]) <= step]
  for name in os.listdir(d):
    if name.startswith("ckpt-") and int(name.split(".")[0].split("-")[1]) > step:
      os.remove(os.path.join(d, name))
  compat.write_checkpoint_state(d, keep)


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_a_stateful_pipeline_trains_is_killed_and_resumes_at_its_data_position(
  pipeline, tmp_path, caplog
):
  workdir = str(tmp_path / "run")
  result = _trainer(pipeline, workdir, **{"train.steps": 13}).fit()
  assert result.step == 13
  said = [r for r in caplog.records if "cannot be checkpointed" in r.getMessage()]
  assert len(said) == 1 and "not bit-identical" in said[0].getMessage()
  saved = [k for k, _ in tf.train.list_variables(os.path.join(workdir, "checkpoints", "ckpt-10"))]
  assert not [k for k in saved if k.startswith("iterator")]

  _kill_after_checkpoint(workdir, 10)  # steps 11..13 were lost with the process
  resumed = _trainer(pipeline, workdir, **{"train.steps": 20})
  assert resumed.fit().step == 20
  assert os.path.basename(
    json.load(open(os.path.join(workdir, "config.json")))["resumed_from"]
  ) == ("ckpt-10")
  # Step s trains on batch s - 1, before the kill and after the resume.
  runs = _batches(workdir)
  assert runs[:13] == [(s, s - 1) for s in range(1, 14)]
  assert runs[13:] == [(s, s - 1) for s in range(11, 21)]
  assert int(resumed.state["data"].position.numpy()) == 20


@pytest.mark.parametrize("mode", ["skip", "replay"])
def test_recovery_data_modes_work_on_a_generator_pipeline(mode, tmp_path):
  workdir = str(tmp_path / "run")
  trainer = _trainer(
    "from_generator",
    workdir,
    **{"train.steps": 15, "drill.loss_steps": "12-14", "recovery.data": mode},
  )
  result = trainer.fit()
  assert result.rollbacks == 1 and result.step == 15
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  (back,) = [i for i, r in enumerate(records) if r.get("rollback")]
  # skip: back to the in-memory snapshot of step 11 (the end of the last loop);
  # replay re-creates the iterator, so it rolls back to ckpt-10 (no snapshots).
  assert records[back]["step"] == (10 if mode == "replay" else 11)
  before = [int(r["batch_index"]) for r in records[:back]]
  after = [int(r["batch_index"]) for r in records[back + 1 :]]
  assert before == list(range(11))  # batches 11..13 made the three NaN attempts
  if mode == "replay":
    assert after == [10, 11, 12, 13, 14] and result.batches_skipped == 0
  else:  # batches 11..13, read since the snapshot, are not seen again
    assert after == [14, 15, 16, 17] and result.batches_skipped == 3


class FailingOnce:
  """A generator that raises once, at batch `at` of its first pass."""

  def __init__(self, at):
    self.at = at
    self.failed = False

  def __call__(self):
    for i in range(N):
      if i == self.at and not self.failed:
        self.failed = True
        raise ValueError(f"corrupt record {i}")
      yield np.full((4, 2), i, np.float32), np.zeros((4, 1), np.float32)


@pytest.mark.parametrize("at", [0, 12])
def test_a_failing_pipeline_is_a_bad_input_error_and_the_checkpoint_is_kept(at, tmp_path):
  gen = FailingOnce(at)

  class Trainer(PipelineTrainer):
    def build_train_dataset(self):
      spec = (tf.TensorSpec([4, 2], tf.float32), tf.TensorSpec([4, 1], tf.float32))
      return tf.data.Dataset.from_generator(gen, output_signature=spec)

  workdir = str(tmp_path / "run")
  config = tiny_config(**{"train.steps_per_loop": 5, "checkpoint.every_steps": 5})
  with pytest.raises(safetrain.BadInputError) as e:
    Trainer(config, workdir).fit()
  assert "ValueError: corrupt record" in str(e.value)
  if at == 0:
    assert "fails on its first batch" in str(e.value)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  else:
    assert "failed after step 10" in str(e.value) and "ckpt-10" in str(e.value)
    state = tf.train.get_checkpoint_state(os.path.join(workdir, "checkpoints"))
    assert state.model_checkpoint_path.endswith("ckpt-10")
  shutil.rmtree(workdir, ignore_errors=True)


def test_kill9_mid_run_and_the_restart_trains_on_from_the_checkpoints_batch(tmp_path):
  """The real thing: the command on a generator + py_function + tf.random
  pipeline, killed with SIGKILL after step 12, restarted with the same command."""
  root = ROOT
  workdir = str(tmp_path / "run")
  cmd = [
    sys.executable,
    "-m",
    "safetrain",
    f"--config={os.path.join(root, 'tests', 'fixtures', 'configs', 'pipeline_drill.py')}",
    f"--workdir={workdir}",
  ]
  metrics = os.path.join(workdir, "metrics.jsonl")
  proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(read_jsonl(metrics)) >= 12:
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed = read_jsonl(metrics)
  assert 12 <= len(killed) < 40  # killed mid-run

  done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  resumed_from = json.load(open(os.path.join(workdir, "config.json")))["resumed_from"]
  start = int(resumed_from.rsplit("-", 1)[1])
  assert start % 5 == 0 and start <= len(killed)
  after = read_jsonl(metrics)[len(killed) :]
  # Step s trains on batch s - 1, before the kill and after the restart.
  assert [(r["step"], int(r["batch_index"])) for r in killed] == [
    (s, s - 1) for s in range(1, len(killed) + 1)
  ]
  assert [(r["step"], int(r["batch_index"])) for r in after] == [
    (s, s - 1) for s in range(start + 1, 41)
  ]
  assert "iterator cannot be checkpointed (" in done.stderr and "is stateful" in done.stderr


def test_the_command_exits_2_on_a_failing_generator_and_the_process_ends(tmp_path):
  """Through the real command: one line, no traceback, exit 2, the checkpoint
  before the failure kept, and the process gone (no teardown hang)."""
  root = ROOT
  workdir = str(tmp_path / "run")
  config = os.path.join(root, "tests", "fixtures", "configs", "failing_generator.py")
  cmd = [sys.executable, "-m", "safetrain", f"--config={config}", f"--workdir={workdir}"]
  done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=180)
  assert done.returncode == 2, done.stderr[-2000:]
  assert "Traceback" not in done.stderr
  assert "ValueError: corrupt record 12" in done.stderr and "failed after step 10" in done.stderr
  state = tf.train.get_checkpoint_state(os.path.join(workdir, "checkpoints"))
  assert state.model_checkpoint_path.endswith("ckpt-10")
