"""Resume: the same command on the same workdir continues bit for bit."""

import json
import os

import numpy as np
import tensorflow as tf
from common import ROOT, TinyTrainer, regression_data, tiny_config, weights

import safetrain
from safetrain.cli import main as cli


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
  nxt = lambda t: next(t.parts.feed.iterator)[0].numpy()
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
  assert again.parts.compiled.loop.function.experimental_get_tracing_count() == 0
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
  # TensorBoard runs, as Keras's callback lays them out (DESIGN.md).
  assert sorted(os.listdir(tmp_path / "events")) == ["eval", "train"]
  events = os.listdir(tmp_path / "events" / "train")
  assert events and events[0].startswith("events.out.tfevents")


def test_the_command_on_a_finished_workdir_exits_0_and_shows_no_nan_loss(tmp_path, capsys):
  config = os.path.join(ROOT, "tests", "fixtures", "configs", "kill_drill.py")
  argv = ["safetrain", f"--config={config}", f"--workdir={tmp_path}", "--config.train.steps=10"]
  assert cli.main_with_exit_code(argv) == 0
  first = capsys.readouterr().out
  assert "step 10:" in first and "final loss" in first
  assert cli.main_with_exit_code(argv) == 0
  again = capsys.readouterr().out
  assert "step 10:" in again and "nan" not in again


# ------------------------------------------- resuming with something changed


def _messages(caplog, text):
  return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_resume_with_another_batch_size_recreates_the_iterator_at_the_same_examples(
  tmp_path, caplog
):
  workdir = str(tmp_path)
  TinyTrainer(tiny_config(**{"train.steps": 10}), workdir).fit()  # 10 batches of 16
  bigger = TinyTrainer(tiny_config(**{"train.steps": 20, "train.batch_size": 32}), workdir)
  result = bigger.fit()
  assert result.step == 20 and not result.incidents
  (said,) = _messages(caplog, "changed shape since the checkpoint")
  assert said.startswith("The data changed shape")
  assert "batches of 16 rows then, (float32[32, 4], float32[32, 1]) now" in said
  assert "at batch 5" in said
  # 160 examples were read in batches of 16: batch 5 of 32, then 10 more.
  assert int(bigger.state["data"].position.numpy()) == 5 + 10
  assert json.load(open(tmp_path / "config.json"))["config"]["train"]["batch_size"] == 32
  # The next resume keeps the new size without a word.
  caplog.clear()
  TinyTrainer(tiny_config(**{"train.steps": 25, "train.batch_size": 32}), workdir).fit()
  assert not _messages(caplog, "changed shape")


def test_a_float32_run_resumed_under_mixed_float16_starts_the_loss_scale_afresh(tmp_path, caplog):
  workdir = str(tmp_path)
  r1 = TinyTrainer(tiny_config(**{"train.steps": 10}), workdir).fit()
  assert r1.loss_scale == 1.0
  fp16 = tiny_config(**{"train.steps": 20, "precision.policy": "mixed_float16"})
  r2 = TinyTrainer(fp16, workdir).fit()
  assert r2.loss_scale == 2.0**15 and not r2.incidents
  (said,) = _messages(caplog, "loss scale starts afresh")
  assert "float32 checkpoint under precision.policy=mixed_float16" in said
  caplog.clear()
  fp16.train.steps = 25
  TinyTrainer(fp16, workdir).fit()  # the same policy again: the scale carries on
  assert not _messages(caplog, "starts afresh")


class FixedDataTrainer(TinyTrainer):
  """The same pipeline over changed data (fixed, re-exported...)."""

  def build_train_dataset(self):
    x, y = regression_data()
    ds = tf.data.Dataset.from_tensor_slices((x * 0.5, y))
    ds = ds.shuffle(256, seed=1, reshuffle_each_iteration=True)
    return ds.batch(self.config.train.batch_size, drop_remainder=True)


class NewPipelineTrainer(TinyTrainer):
  """The same data through a pipeline with one more stage."""

  def build_train_dataset(self):
    return super().build_train_dataset().map(lambda x, y: (x * 0.5, y))


def test_resuming_on_changed_data_says_once_where_the_old_data_still_comes_from(tmp_path, caplog):
  workdir = str(tmp_path)
  TinyTrainer(tiny_config(**{"train.steps": 10}), workdir).fit()
  TinyTrainer(tiny_config(**{"train.steps": 12}), workdir).fit()
  assert not _messages(caplog, "first training batch differs")  # same data: silent
  FixedDataTrainer(tiny_config(**{"train.steps": 14}), workdir).fit()
  (said,) = _messages(caplog, "first training batch differs")
  assert "still comes from the checkpointed iterator's buffers" in said
  caplog.clear()
  FixedDataTrainer(tiny_config(**{"train.steps": 16}), workdir).fit()
  assert not _messages(caplog, "first training batch differs")


def test_a_changed_pipeline_resumes_by_position_instead_of_failing(tmp_path, caplog):
  workdir = str(tmp_path)
  TinyTrainer(tiny_config(**{"train.steps": 10}), workdir).fit()
  trainer = NewPipelineTrainer(tiny_config(**{"train.steps": 14}), workdir)
  assert trainer.fit().step == 14
  (said,) = _messages(caplog, "definition changed since the checkpoint")
  assert "re-created from build_train_dataset() at batch 10" in said
  assert int(trainer.state["data"].position.numpy()) == 14
  caplog.clear()
  NewPipelineTrainer(tiny_config(**{"train.steps": 16}), workdir).fit()  # its own checkpoint
  assert not _messages(caplog, "re-created")
