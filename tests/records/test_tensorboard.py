"""TensorBoard: `events/train` and `events/eval` runs read back with
`tf.compat.v1.train.summary_iterator`; a monotone axis after a rollback, the
undone loop under `undone/`, incidents as text, optional histograms."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from common import TinyTrainer, tiny_config


def read_events(run_dir):
  """{tag: [(step, value)]} of every event file in `run_dir`, in file order."""
  out = {}
  for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        plugin = v.metadata.plugin_data.plugin_name
        if plugin == "text":
          value = tf.make_ndarray(v.tensor).item().decode()
        elif plugin == "histograms":
          value = tf.make_ndarray(v.tensor)
        else:
          value = float(tf.make_ndarray(v.tensor))
        out.setdefault(v.tag, []).append((event.step, value))
  return out


class EvalTinyTrainer(TinyTrainer):
  def build_eval_dataset(self):
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(16, 4)
    return tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(8)


@pytest.fixture(scope="module")
def rolled_back_run(tmp_path_factory):
  # Attempts 13-15 have NaN losses: the third in a row rolls back to ckpt-10.
  workdir = str(tmp_path_factory.mktemp("tb") / "run")
  config = tiny_config(**{"drill.loss_steps": "13-15", "eval.every_steps": 10})
  result = EvalTinyTrainer(config, workdir).fit()
  return workdir, result


def test_train_and_eval_runs_overlay_on_a_monotone_axis_after_a_rollback(rolled_back_run):
  workdir, result = rolled_back_run
  assert result.rollbacks == 1 and result.step == 20 and result.attempts == 25
  events = os.path.join(workdir, "events")
  assert sorted(os.listdir(events)) == ["eval", "train"]
  assert not glob.glob(os.path.join(events, "events.out.tfevents.*"))
  train, evals = read_events(f"{events}/train"), read_events(f"{events}/eval")
  with open(f"{workdir}/metrics.jsonl") as f:
    loops = [json.loads(line) for line in f if "final_eval" not in line]
  kept = [r for r in loops if not r.get("rollback")]
  undone = [r for r in loops if r.get("rollback")]
  # The default loss chart: the kept loops only, on a strictly rising axis.
  steps = [s for s, _ in train["loss"]]
  assert steps == [5, 10, 20, 25] and steps == sorted(set(steps))
  np.testing.assert_allclose([v for _, v in train["loss"]], [r["loss"] for r in kept], rtol=1e-6)
  # The loop the rollback undid is charted apart, where it happened.
  assert [s for s, _ in train["undone/loss"]] == [15]
  np.testing.assert_allclose(train["undone/loss"][0][1], undone[0]["loss"], rtol=1e-6)
  assert train["rollback"] == [(15, 1.0)] and "undone/lr_scale" not in train
  # The rollback's state fields are charted as usual: the lowered scale from 15 on.
  assert train["lr_scale"] == [(5, 1.0), (10, 1.0), (15, 0.5), (20, 0.5), (25, 0.5)]
  # The applied step is a curve of its own, which drops at the rollback.
  assert train["step"] == [(5, 5.0), (10, 10.0), (15, 10.0), (20, 15.0), (25, 20.0)]
  # The eval run uses the same names and axis, so `loss` overlays.
  assert [s for s, _ in evals["loss"]] == [10, 25]
  assert [s for s, _ in evals["examples"]] == [10, 25]
  np.testing.assert_allclose(evals["loss"][-1][1], result.eval_metrics["loss"], rtol=1e-6)
  # Histograms are off by default.
  assert not [t for t in train if t.startswith(("weights/", "grad_norm/"))]


def test_each_incident_is_a_text_summary_at_its_loop(rolled_back_run):
  workdir, result = rolled_back_run
  texts = read_events(f"{workdir}/events/train")["incidents"]
  assert [s for s, _ in texts] == [15] * len(result.incidents) == [15, 15]
  skipped, rollback = (t for _, t in texts)
  assert skipped.startswith("step 13: nonfinite_loss -> skipped_step (lr scale 1).")
  assert rollback.startswith(
    "step 13: nonfinite_loss -> rollback, restored step 10 (lr scale 1 -> 0.5)."
  )
  # The full diagnosis is there.
  assert result.incidents[1]["diagnosis"] and rollback.endswith(result.incidents[1]["diagnosis"])


def test_histograms_and_layer_gradient_norms_every_n_steps(tmp_path):
  config = tiny_config(**{"train.histogram_every_steps": 10})
  trainer = TinyTrainer(config, str(tmp_path))
  trainer.fit()
  train = read_events(f"{tmp_path}/events/train")
  paths = [v.path for v in trainer.model.trainable_variables]
  for path in paths:
    assert [s for s, _ in train[f"weights/{path}"]] == [10, 20]
  # The last histogram is of the final weights.
  kernel = trainer.model.trainable_variables[0]
  hist = train[f"weights/{kernel.path}"][-1][1]
  assert hist[:, 2].sum() == kernel.numpy().size
  assert hist[0, 0] == pytest.approx(kernel.numpy().min(), rel=1e-6)
  layers = sorted({p.rsplit("/", 1)[0] for p in paths})
  assert sorted(t[len("grad_norm/") :] for t in train if t.startswith("grad_norm/")) == layers
  # The norm of the first layer's gradient, on the first batch, in inference mode.
  x, y = trainer.parts.feed.source.first_batch
  first = [v for v in trainer.model.trainable_variables if v.path.startswith(layers[0] + "/")]
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(tf.square(trainer.model(x, training=False) - y))
  grads = tape.gradient(loss, first)
  expected = float(tf.linalg.global_norm(grads))
  assert train[f"grad_norm/{layers[0]}"][-1] == (20, pytest.approx(expected, rel=1e-5))
