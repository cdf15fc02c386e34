"""Resume: the same command on the same workdir continues bit for bit."""

import json
import os

import numpy as np
from common import TinyTrainer, tiny_config, weights

import safetrain
from safetrain import cli


class DropoutTrainer(TinyTrainer):
  """Dropout makes the RNG state part of what a resume must restore."""

  def build_model(self):
    import keras

    return keras.Sequential(
      [
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dropout(0.3, seed=3),
        keras.layers.Dense(1),
      ]
    )


def _state(trainer):
  return weights(trainer) + [v.numpy() for v in trainer.optimizer.variables]


def test_resume_equals_an_uninterrupted_run_including_the_data_position(tmp_path):
  n = 12  # not a multiple of the 256/16 = 16 batches per epoch, nor of steps_per_loop
  cfg = lambda steps: tiny_config(**{"train.steps": steps, "checkpoint.every_steps": 4})
  first = DropoutTrainer(cfg(n), str(tmp_path / "resumed"))
  r1 = first.fit()
  assert r1.step == n
  resumed = DropoutTrainer(cfg(2 * n), str(tmp_path / "resumed"))
  r2 = resumed.fit()
  straight = DropoutTrainer(cfg(2 * n), str(tmp_path / "straight"))
  r3 = straight.fit()
  assert r2.step == r3.step == 2 * n
  for a, b in zip(_state(resumed), _state(straight)):
    np.testing.assert_array_equal(a, b)
  # The data position too: the next batch each would draw is the same.
  nxt = lambda t: next(t._iterator)[0].numpy()
  np.testing.assert_array_equal(nxt(resumed), nxt(straight))
  # Each start writes the resolved config; the resume says where it came from.
  cfg_json = json.load(open(tmp_path / "resumed" / "config.json"))
  assert cfg_json["resumed_from"].endswith(f"ckpt-{n}")
  assert cfg_json["config"]["train"]["steps"] == 2 * n


def test_a_finished_run_started_again_does_nothing_more(tmp_path):
  c = tiny_config(**{"train.steps": 10})
  TinyTrainer(c, str(tmp_path)).fit()
  lines = len(safetrain.read_jsonl(os.path.join(tmp_path, "metrics.jsonl")))
  again = TinyTrainer(c, str(tmp_path))
  r = again.fit()
  assert r.step == 10
  assert again._train_loop_fn.experimental_get_tracing_count() == 0
  assert len(safetrain.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))) == lines


def test_workdir_layout(tmp_path):
  c = tiny_config(**{"train.steps": 10})
  TinyTrainer(c, str(tmp_path)).fit()
  names = set(os.listdir(tmp_path))
  assert {"config.json", "checkpoints", "events", "metrics.jsonl"} <= names
  rec = safetrain.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))[0]
  for key in (
    "step",
    "loss",
    "grad_norm",
    "lr",
    "loss_scale",
    "good",
    "overflow",
    "divergence",
    "skipped_batches",
    "dropped_rows",
  ):
    assert key in rec
  events = os.listdir(tmp_path / "events")
  assert events and events[0].startswith("events.out.tfevents")


def test_the_command_on_a_finished_workdir_exits_0_and_shows_no_nan_loss(tmp_path, capsys):
  config = os.path.join(os.path.dirname(__file__), "fixtures", "configs", "kill_drill.py")
  argv = ["safetrain", f"--config={config}", f"--workdir={tmp_path}", "--config.train.steps=10"]
  assert cli.main_with_exit_code(argv) == 0
  first = capsys.readouterr().out
  assert "step 10:" in first and "final loss" in first
  assert cli.main_with_exit_code(argv) == 0
  again = capsys.readouterr().out
  assert "step 10:" in again and "nan" not in again
