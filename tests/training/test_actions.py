"""Actions and Keras callbacks between inner loops (safetrain/training/actions.py,
safetrain/training/callbacks.py), through the public API and the command."""

import csv
import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import ROOT, TinyTrainer, regression_data, tiny_config, weights

import safetrain
from safetrain.checkpoint import store as checkpointing
from safetrain.cli import main as cli

STOP_ACTION = os.path.join(ROOT, "tests", "fixtures", "configs", "stop_action.py")


def test_an_action_stops_the_command_at_its_step_with_a_checkpoint_and_exit_0(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  code = cli.main_with_exit_code(["safetrain", f"--config={STOP_ACTION}", f"--workdir={workdir}"])
  err = capsys.readouterr().err
  assert code == 0, err
  assert "stopped at step 10 of 30: reached step 10" in err
  # checkpoint.every_steps is 20: ckpt-10 is there because the run stopped there.
  assert checkpointing.scan(os.path.join(workdir, "checkpoints")).latest == 10
  assert [r["step"] for r in safetrain.read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [
    5,
    10,
  ]
  seen = safetrain.read_jsonl(os.path.join(workdir, "actions.jsonl"))
  assert [(r["step"], r["metric_step"], r["final"]) for r in seen] == [
    (5, 5, False),
    (10, 10, False),
  ]
  assert (
    # One NaN step the next batch trained past: a bad batch, quarantined.
    seen[0]["incidents"] == [["nonfinite_loss", "quarantined_batch", 2]]
    and not seen[1]["incidents"]
  )
  assert seen[0]["loss"] > 0 and seen[0]["eval_metrics"] is None
  assert seen[1]["eval_metrics"] == {}  # an evaluation point; the trainer has no eval data
  exported = keras.saving.load_model(os.path.join(workdir, "export", "model.keras"))
  ckpt = os.path.join(workdir, "checkpoints", "ckpt-10")
  for i, w in enumerate(exported.get_weights()):
    key = f"model_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"
    np.testing.assert_array_equal(w, tf.train.load_variable(ckpt, key))
  recorded = json.load(open(os.path.join(workdir, "config.json")))["experiment"]
  assert recorded == {"file": STOP_ACTION, "arg": None}
  # The same command trains on from there (and the action stops it again).
  code = cli.main_with_exit_code(["safetrain", f"--config={STOP_ACTION}", f"--workdir={workdir}"])
  assert code == 0 and "stopped at step 15 of 30" in capsys.readouterr().err
  assert [r["step"] for r in safetrain.read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [
    5,
    10,
    15,
  ]


class ScoreTrainer(TinyTrainer):
  """TinyTrainer with an eval set and a metric `score` that follows a table:
  SCORES[k] at step 5k, so each evaluation's score is known in advance."""

  SCORES = (9.0,)
  CALLBACKS = ()

  def build_eval_dataset(self):
    return tf.data.Dataset.from_tensor_slices(regression_data(64, seed=1)).batch(32)

  def compute_loss(self, model, batch, training):
    loss = super().compute_loss(model, batch, training)
    k = tf.minimum(self.optimizer.iterations // 5, len(self.SCORES) - 1)
    return loss, {"score": tf.gather(tf.constant(self.SCORES), k)}

  def callbacks(self):
    return list(self.CALLBACKS)


def _config(**overrides):
  base = {
    "train.steps_per_loop": 5,
    "eval.every_steps": 5,
    "checkpoint.every_steps": 5,
    "checkpoint.max_to_keep": 10,
  }
  return tiny_config(**{**base, **overrides})


class Recorder(keras.callbacks.Callback):
  def __init__(self):
    super().__init__()
    self.calls = []

  def on_train_begin(self, logs=None):
    self.calls.append(("train_begin",))

  def on_epoch_begin(self, epoch, logs=None):
    self.calls.append(("epoch_begin", epoch))

  def on_train_batch_begin(self, batch, logs=None):
    self.calls.append(("batch_begin", batch))

  def on_train_batch_end(self, batch, logs=None):
    self.calls.append(("batch_end", batch, logs["step"], logs["loss"] > 0))

  def on_epoch_end(self, epoch, logs=None):
    self.calls.append(("epoch_end", epoch, logs["step"], logs["val_score"], logs["val_examples"]))

  def on_train_end(self, logs=None):
    self.calls.append(("train_end",))


def _ckpt_weights(workdir, step, n):
  path = os.path.join(workdir, "checkpoints", f"ckpt-{step}")
  return [
    tf.train.load_variable(path, f"model_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE")
    for i in range(n)
  ]


def test_early_stopping_on_an_eval_metric_stops_at_the_right_evaluation(tmp_path):
  recorder = Recorder()
  best = str(tmp_path / "best.keras")

  class Trainer(ScoreTrainer):
    # val_score: 5, 3, 2 (best), 2.5, 2.25 (patience 2 spent), then 1.0 never reached
    SCORES = (9.0, 5.0, 3.0, 2.0, 2.5, 2.25, 1.0)
    CALLBACKS = (
      recorder,
      keras.callbacks.EarlyStopping(
        monitor="val_score", mode="min", patience=2, restore_best_weights=True
      ),
      keras.callbacks.ModelCheckpoint(best, monitor="val_score", mode="min", save_best_only=True),
    )

  workdir = str(tmp_path / "run")
  trainer = Trainer(_config(**{"train.steps": 50}), workdir)
  result = trainer.fit()
  assert (result.step, result.stopped) == (25, "action")
  assert result.stop_reason == "EarlyStopping set model.stop_training"
  assert [
    r["step"] for r in safetrain.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "good" in r
  ] == [5, 10, 15, 20, 25]
  assert checkpointing.scan(os.path.join(workdir, "checkpoints")).latest == 25
  # The documented mapping: one batch per loop, one epoch per evaluation (the
  # final evaluation at step 25 evaluates the state the last loop evaluated).
  expected = [("train_begin",)]
  for epoch, (step, score) in enumerate(zip((5, 10, 15, 20, 25), (5.0, 3.0, 2.0, 2.5, 2.25))):
    expected += [
      ("epoch_begin", epoch),
      ("batch_begin", step - 5),
      ("batch_end", step - 1, step, True),
      ("epoch_end", epoch, step, score, 64.0),
    ]
  assert recorder.calls == expected + [("train_end",)]
  # restore_best_weights: the live model and the export hold the best
  # evaluation's weights (step 15); the checkpoints keep the last state.
  best_weights = _ckpt_weights(workdir, 15, 4)
  exported = keras.saving.load_model(result.exported)
  for live, out, saved, want in zip(
    weights(trainer),
    exported.get_weights(),
    keras.saving.load_model(best).get_weights(),
    best_weights,
  ):
    np.testing.assert_array_equal(live, want)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(saved, want)
  assert not np.array_equal(_ckpt_weights(workdir, 25, 4)[0], best_weights[0])


def test_reduce_lr_on_plateau_composes_with_recovery_and_csv_logger_writes_each_evaluation(
  tmp_path,
):
  csv_path = str(tmp_path / "log.csv")

  class Trainer(ScoreTrainer):
    # val_score at steps 5..25: 5, 6 (plateau: x0.1), 4, 4 (plateau: x0.1), 3
    SCORES = (9.0, 5.0, 6.0, 4.0, 4.0, 3.0)
    CALLBACKS = (
      keras.callbacks.ReduceLROnPlateau(monitor="val_score", mode="min", factor=0.1, patience=1),
      keras.callbacks.CSVLogger(csv_path),
      keras.callbacks.TerminateOnNaN(),
      keras.callbacks.TensorBoard(str(tmp_path / "tb")),
    )

  workdir = str(tmp_path / "run")
  # NaN losses on attempts 3-5 (a rollback to step 0 before any plateau) and
  # 18-20 (a rollback to step 10, after the first plateau cut).
  config = _config(**{"train.steps": 25, "drill.loss_steps": "3-5,18-20"})
  trainer = Trainer(config, workdir)
  result = trainer.fit()
  # TerminateOnNaN never fired: six NaN losses, two rollbacks, a finished run.
  assert (result.stopped, result.step, result.rollbacks, result.lr_scale) == (
    "completed",
    25,
    2,
    0.25,
  )
  base = 0.01
  loops = [r for r in safetrain.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "good" in r]
  rate = {r["step"]: r["lr"] for r in loops if not r.get("rollback")}
  np.testing.assert_allclose(
    [rate[5], rate[10], rate[15], rate[20], rate[25]],
    # The rollback to step 10 kept the plateau's 0.1 and halved the scale; the
    # second plateau cut multiplied the base again, keeping the scale 0.25.
    [base * 0.5, base * 0.5, base * 0.1 * 0.25, base * 0.1 * 0.25, base * 0.01 * 0.25],
    rtol=1e-5,
  )
  np.testing.assert_allclose(float(trainer.optimizer.learning_rate), base * 0.01 * 0.25, rtol=1e-5)
  saved = tf.train.load_variable(
    os.path.join(workdir, "checkpoints", "ckpt-25"), "lr_factor/factor/.ATTRIBUTES/VARIABLE_VALUE"
  )
  np.testing.assert_allclose(saved, 0.01, rtol=1e-5)
  # CSVLogger: one row per evaluation, here one per loop that was kept, and
  # the final one, with the numbers of metrics.jsonl.
  rows = list(csv.DictReader(open(csv_path)))
  assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]
  assert [int(float(r["step"])) for r in rows] == [5, 10, 15, 20, 25]
  np.testing.assert_allclose([float(r["val_score"]) for r in rows], [5, 6, 4, 4, 3])
  np.testing.assert_allclose([float(r["lr"]) for r in rows], [rate[s] for s in (5, 10, 15, 20, 25)])
  # Keras's TensorBoard callback: epoch_* scalars by evaluation index.
  events = {}
  for run in ("train", "validation"):
    (path,) = glob.glob(str(tmp_path / "tb" / run / "events.out.tfevents.*"))
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        events.setdefault((run, value.tag), []).append(event.step)
  assert events[("validation", "epoch_score")] == [0, 1, 2, 3, 4]
  assert events[("train", "epoch_lr")] == [0, 1, 2, 3, 4]


def test_callbacks_and_actions_that_cannot_work_are_refused_before_training(tmp_path):
  cases = [
    (
      "callbacks",
      [keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))],
      "BackupAndRestore: safetrain checkpoints",
    ),
    ("callbacks", [keras.callbacks.ProgbarLogger()], "ProgbarLogger: safetrain prints"),
    ("callbacks", [lambda: None], "not a keras.callbacks.Callback"),
    ("actions", ["stop"], "list of callables"),
  ]
  for hook, value, message in cases:
    trainer_cls = type("Refused", (TinyTrainer,), {hook: lambda self, v=value: v})
    workdir = str(tmp_path / hook)
    with pytest.raises(safetrain.ConfigError, match=message):
      trainer_cls(tiny_config(), workdir).fit()
    assert set(os.listdir(workdir)) <= {".lock"}  # nothing written but the lock
