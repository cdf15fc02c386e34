"""A workdir on TensorFlow's in-memory `ram://` filesystem, in one process:
a run, a resume, a rollback, evaluate(), `safetrain export` and
`safetrain report` (the object-store path of the storage layer: no rename,
no flock, a lease instead of the lock)."""

import json
import uuid

import keras
import numpy as np
import tensorflow as tf
from common import TinyTrainer, tiny_config, weights

from safetrain.cli import export as export_command
from safetrain.records import report
from safetrain.storage import files as storage
from safetrain.storage.jsonl import read_jsonl


class EvalTrainer(TinyTrainer):
  def build_eval_dataset(self):
    return self.build_train_dataset().take(2)


def _ram_workdir() -> str:
  return f"ram://safetrain-test-{uuid.uuid4().hex[:8]}/run"


def test_run_resume_rollback_evaluate_export_and_report_on_ram(capsys):
  workdir = _ram_workdir()
  first = TinyTrainer(tiny_config(**{"train.steps": 10}), workdir).fit()
  assert first.step == 10
  names = storage.listdir(workdir)
  for name in ("config.json", "metrics.jsonl", "checkpoints", "events", "export"):
    assert name in names, names
  assert ".lock" not in names  # the lease is released with the run
  assert storage.listdir(workdir + "/checkpoints")[:3] == [
    "checkpoint",
    "ckpt-0.data-00000-of-00001",
    "ckpt-0.index",
  ]

  # Resume to 30 steps; a NaN loss at attempts 14-16 forces a rollback.
  config = tiny_config(**{"train.steps": 30, "drill.loss_steps": "14-16"})
  config.guard.rollback_after = 3
  trainer = TinyTrainer(config, workdir)
  result = trainer.fit()
  assert result.step == 30 and result.rollbacks == 1
  records = read_jsonl(workdir + "/incidents.jsonl")
  assert [r["action"] for r in records if r["action"] == "rollback"] == ["rollback"]
  assert json.loads(storage.read_text(workdir + "/config.json"))["resumed_from"] is not None

  # restore() and evaluate() read the newest checkpoint, read-only.
  fresh = TinyTrainer(tiny_config(**{"train.steps": 30}), workdir)
  assert fresh.restore() == workdir + "/checkpoints/ckpt-30"
  for a, b in zip(weights(fresh), weights(trainer)):
    np.testing.assert_array_equal(a, b)
  evaluated = EvalTrainer(tiny_config(**{"train.steps": 30}), workdir).evaluate()
  assert evaluated["examples"] == 32 and np.isfinite(evaluated["loss"])

  # `safetrain export` and `safetrain report` take the ram:// workdir.
  out = workdir + "/export/again.keras"
  assert export_command.main([workdir, "--output", out]) == 0
  local = f"/tmp/{uuid.uuid4().hex}.keras"
  tf.io.gfile.copy(out, local)
  for a, b in zip(keras.saving.load_model(local).get_weights(), weights(trainer)):
    np.testing.assert_array_equal(a, b)
  capsys.readouterr()
  assert report.main([workdir]) == 0
  assert "steps: 30 applied of 36 attempted" in capsys.readouterr().out
  assert storage.read_bytes(workdir + "/report.png")[:8] == b"\x89PNG\r\n\x1a\n"
