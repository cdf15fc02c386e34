"""Bad data that first appears mid-run, found by the input check before the
op fails (safetrain/step/guard.py InputPiece, step/batch_checks.py): class
labels outside [0, num_classes) for a sparse categorical loss are bad rows,
a batch of another feature width (an element spec with an unknown
dimension) is a bad batch; both handled by `guard.bad_inputs`.

The trainers are tests/fixtures/configs/bad_labels.py's: 5 classes, 30
steps, label 5 in rows 2, 7, 11 of batch 12 and -1 in rows 0, 5 of batch 21;
a 5-column batch 24 for the width cases.
"""

import json
import os

import numpy as np
import pytest
from common import ROOT, all_finite

import safetrain
from safetrain.cli import experiment
from safetrain.cli import main as cli

FILE = os.path.join(ROOT, "tests", "fixtures", "configs", "bad_labels.py")
fixture = experiment.load_module(FILE)


def _trainer(name, workdir, **overrides):
  config = fixture.get_config()
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return getattr(fixture, name)(config, str(workdir))


def _fit(name, workdir, **overrides):
  trainer = _trainer(name, workdir, **overrides)
  return trainer, trainer.fit()


def _records(workdir, name):
  with open(os.path.join(workdir, name), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _cli(capsys, workdir, *flags):
  code = cli.main_with_exit_code(["safetrain", f"--config={FILE}", f"--workdir={workdir}", *flags])
  _, err = capsys.readouterr()
  assert "Traceback" not in err, err[-3000:]
  lines = [ln for ln in err.splitlines() if ln.startswith("safetrain: error:")]
  assert len(lines) == 1, err[-3000:]
  return code, lines[0]


def _assert_label_drops(result):
  """Batch 12 (step 13) lost 3 rows, batch 21 (step 22) 2; nothing skipped."""
  assert result.step == 30 and result.attempts == 30 and result.skipped_steps == 0
  got = [(r["step"], r["kind"], r["action"]) for r in result.incidents]
  assert got == [(13, "bad_labels", "dropped_rows"), (22, "bad_labels", "dropped_rows")], got
  first, second = (r["diagnosis"] for r in result.incidents)
  assert "class labels y outside [0, 5) in 3 rows: the first, 5, in row 2" in first, first
  assert "3 rows dropped, 0 batches skipped" in first, first
  assert "in 2 rows: the first, -1, in row 0" in second and "2 rows dropped" in second, second


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
  """The same run on the batches without their bad rows."""
  trainer, result = _fit("Cleaned", tmp_path_factory.mktemp("cleaned") / "run")
  assert result.incidents == [] and result.step == 30
  return trainer


def test_bad_labels_mid_run_are_dropped_rows_and_train_as_the_cleaned_data(workdir, cleaned):
  trainer, result = _fit("Labels", workdir)
  _assert_label_drops(result)
  assert _records(workdir, "incidents.jsonl") == result.incidents
  assert sum(m.get("dropped_rows", 0) for m in _records(workdir, "metrics.jsonl")) == 5
  assert all_finite(trainer)
  # The step's mean is over the kept rows: the same updates as on the cleaned data.
  for a, b in zip(trainer.model.weights, cleaned.model.weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
  acc, clean_acc = fixture.accuracy(trainer.model), fixture.accuracy(cleaned.model)
  assert acc > 0.8 and abs(acc - clean_acc) < 0.01, (acc, clean_acc)


@pytest.mark.parametrize(
  "trainer,overrides",
  [("LabelsColumn", {}), ("LabelsLogits", {"loss": "softmax_cross_entropy"})],
  ids=["labels_b_by_1", "from_logits"],
)
def test_bad_labels_of_shape_b1_and_on_logits_are_dropped_too(workdir, trainer, overrides):
  t, result = _fit(trainer, workdir, **overrides)
  assert t.parts.compiled.loop.pieces.get("inputs").labels.num_classes == 5
  _assert_label_drops(result)
  assert all_finite(t) and fixture.accuracy(t.model) > 0.8


@pytest.mark.parametrize("trainer", ["FirstBatch", "FirstBatchSubclassed"])
def test_bad_labels_in_the_first_batch_are_dropped_at_step_1_not_a_build_error(workdir, trainer):
  """The build reads the first batch eagerly (the model's variables, the
  metrics, the not-learning reference); its bad labels do not stop it, and
  the step drops those rows like any other batch's."""
  t, result = _fit(trainer, workdir)
  got = [(r["step"], r["kind"], r["action"]) for r in result.incidents]
  assert got == [(1, "bad_labels", "dropped_rows")], got
  assert "in 2 rows: the first, 5, in row 1" in result.incidents[0]["diagnosis"]
  assert (result.step, result.stopped, result.skipped_steps) == (30, "completed", 0)
  assert fixture.accuracy(t.model) > 0.8  # 5 classes: chance is 0.2


def test_bad_labels_under_skip_batch_skip_their_batches(workdir):
  trainer, result = _fit("Labels", workdir, **{"guard.bad_inputs": "skip_batch"})
  assert result.step == 30 and result.attempts == 32 and result.skipped_steps == 2
  got = [(r["step"], r["kind"], r["action"]) for r in result.incidents]
  assert got == [(13, "bad_labels", "skipped_batch"), (21, "bad_labels", "skipped_batch")], got
  assert "0 rows dropped, 1 batches skipped" in result.incidents[0]["diagnosis"]
  assert all_finite(trainer)


def test_bad_labels_under_raise_exit_2_naming_the_value_position_and_row(tmp_path, capsys):
  workdir = tmp_path / "run"
  code, line = _cli(capsys, workdir, "--config.guard.bad_inputs=raise")
  assert code == 2, line
  assert "bad class labels at step 13: class labels y outside [0, 5) in 3 rows: " in line, line
  assert "the first, 5, in row 2; the batch at data position 12 (guard.bad_inputs=raise)" in line
  with open(workdir / "log.txt", encoding="utf-8") as f:
    assert line in f.read()
  (record,) = _records(workdir, "incidents.jsonl")
  assert (record["step"], record["kind"], record["action"]) == (13, "bad_labels", "skipped_batch")
  assert os.path.exists(workdir / "checkpoints" / "ckpt-12.index")  # the last healthy state


def test_a_wider_batch_of_an_unknown_dim_spec_is_skipped_unseen_under_drop_rows(workdir):
  trainer, result = _fit("Wider", workdir)
  inputs = trainer.parts.compiled.loop.pieces.get("inputs")
  assert inputs.shapes.expected == ((4,),) and inputs.shapes.names == ("x",)
  assert result.step == 30 and result.attempts == 31 and result.skipped_steps == 1
  (record,) = result.incidents
  assert (record["step"], record["kind"], record["action"]) == (25, "bad_shapes", "skipped_batch")
  assert "x has shape [B, 5] where the first batch's is [B, 4]" in record["diagnosis"]
  assert all_finite(trainer) and fixture.accuracy(trainer.model) > 0.8


def test_a_wider_batch_under_raise_exits_2_naming_expected_and_got_shapes(tmp_path, capsys):
  code, line = _cli(
    capsys, tmp_path / "run", "--config.trainer=Wider", "--config.guard.bad_inputs=raise"
  )
  assert code == 2, line
  assert "a batch of another shape at step 25: x has shape [B, 5] where the first " in line, line
  assert "batch's is [B, 4]; the batch at data position 24" in line, line


def test_a_healthy_run_has_no_incidents_and_a_static_spec_no_shape_check(workdir):
  trainer, result = _fit("Healthy", workdir)
  assert result.incidents == [] and result.step == 30 and result.attempts == 30
  inputs = trainer.parts.compiled.loop.pieces.get("inputs")
  assert inputs.labels is not None and inputs.shapes is None  # tf.data holds static shapes


def test_a_custom_compute_loss_gets_no_label_check(workdir):
  trainer = _trainer("CustomLoss", workdir)
  trainer.build()
  assert trainer.parts.compiled.loop.pieces.get("inputs").labels is None


def test_bad_labels_on_two_replicas_are_dropped_as_on_one(tmp_path):
  one, r1 = _fit("Labels", tmp_path / "one")
  two, r2 = _fit(
    "Labels",
    tmp_path / "two",
    **{"distribute.strategy": "mirrored", "distribute.cpu_replicas": 2},
  )
  assert two.strategy.num_replicas_in_sync == 2
  # Batch 12's bad rows sit on both shards (rows 2, 7 and 11 -> replica 1's row 3).
  _assert_label_drops(r2)
  assert [r["diagnosis"] for r in r2.incidents] == [r["diagnosis"] for r in r1.incidents]
  for a, b in zip(one.model.weights, two.model.weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_bad_labels_of_the_eval_set_are_left_out_and_counted(workdir):
  trainer, result = _fit("EvalLabels", workdir, **{"eval.every_steps": 30})
  ev = result.eval_metrics
  assert ev["examples"] == 61 and ev["dropped_rows"] == 3 and np.isfinite(ev["loss"]), ev
  # The same trained workdir evaluated under raise.
  trainer = _trainer("EvalLabels", workdir, **{"guard.bad_inputs": "raise"})
  with pytest.raises(safetrain.BadInputError, match=r"3 rows .* class labels outside \[0, 5\)"):
    trainer.evaluate()
