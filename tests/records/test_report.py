"""`safetrain report WORKDIR`: the picture, the data behind it, the summary."""

import os
import shutil
import sys

import pytest
from common import TinyTrainer, tiny_config

import safetrain
from safetrain.core import kinds
from safetrain.records import report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A real run with rows dropped (step 3), a rollback (bad steps 12-14, back
  to the checkpoint at 10) and an abort (bad steps from 21, budget spent)."""
  workdir = str(tmp_path_factory.mktemp("report") / "run")
  c = tiny_config(**{"train.steps": 30, "recovery.max_rollbacks": 1})
  c.drill.input_steps = "3"
  c.drill.loss_steps = "12-14,25-100"  # attempts; 25 is step 21 after the rollback
  with pytest.raises(safetrain.DivergenceError):
    TinyTrainer(c, workdir).fit()
  return workdir


def test_markers_sit_at_the_incidents_steps(run_dir):
  data = report.plot_data(run_dir)
  incidents = safetrain.read_jsonl(os.path.join(run_dir, "incidents.jsonl"))
  assert [(m["step"], m["kind"], m["action"]) for m in data["incidents"]] == [
    (i["step"], i["kind"], i["action"]) for i in incidents
  ]
  assert ("dropped_rows", 3) in [(m["action"], m["step"]) for m in data["incidents"]]
  assert data["rollbacks"] == [(12, 10)]
  assert data["aborts"] == [21]
  s = data["summary"]
  assert (s["rollbacks"], s["aborted"], s["lr_scale"], s["rows_dropped"]) == (1, True, 0.5, 1)
  assert s["kinds"] == {"nonfinite_inputs": 1, "nonfinite_loss": 6}


def test_series_follow_the_run_through_the_rollback(run_dir):
  s = report.plot_data(run_dir)["series"]
  loss = s["loss"]
  # Loops end at steps 5, 10, then one good step (11) before the rollback to
  # 10 undid it, then 15 and 20; the aborted last loop writes no record.
  assert loss["x"] == [5, 10, 11, 15, 20]
  assert loss["kept"] == [True, True, False, True, True]
  assert s["grad_norm"]["x"] == loss["x"] and s["grad_norm_max"]["x"] == loss["x"]
  lr = list(zip(s["lr_scale"]["x"], s["lr_scale"]["y"]))
  assert lr[0] == (0, 1.0) and (11, 1.0) in lr and (10, 0.5) in lr and lr[-1] == (20, 0.5)
  assert set(s["loss_scale"]["y"]) == {1.0}


def test_command_draws_the_picture_and_summarizes(run_dir, capsys):
  assert report.main([run_dir]) == 0
  out = capsys.readouterr().out
  png = os.path.join(run_dir, "report.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert f"picture: {png}" in out
  assert "1 rollback;" in out and "the run ABORTED" in out and "lr scale 0.5" in out
  assert "last abort (step 21)" in out and "1 rows dropped" in out


def test_missing_workdir_is_exit_2(tmp_path, capsys):
  assert report.main([str(tmp_path / "nope")]) == 2
  assert "no such workdir" in capsys.readouterr().err
  assert report.main([str(tmp_path)]) == 2
  assert "no metrics.jsonl" in capsys.readouterr().err


def test_lines_that_are_not_json_objects_are_skipped_with_a_warning(run_dir, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(run_dir, workdir)
  with open(workdir / "incidents.jsonl", "a") as f:
    f.write('42\n[1, 2]\n"text"\nnot json\n')
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write("null\n")
  assert report.main([str(workdir)]) == 0
  out, err = capsys.readouterr()
  warnings = [ln for ln in err.splitlines() if ln.startswith("safetrain report: warning:")]
  assert len(warnings) == 5, err
  assert "metrics.jsonl:" in warnings[0] and "not a JSON object (null)" in warnings[0]
  assert "incidents.jsonl:" in warnings[1] and "not a JSON object (42)" in warnings[1]
  assert "not JSON" in warnings[4]
  # The records around them are read as before.
  assert "1 rollback;" in out and "the run ABORTED" in out
  assert report.plot_data(str(workdir))["rollbacks"] == [(12, 10)]


def test_the_data_behind_the_picture_and_the_summary_need_no_matplotlib(run_dir, monkeypatch):
  for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
  data = report.plot_data(run_dir)
  # The rollback's arrow: from step 12 at the full learning rate back to
  # step 10 at half of it; the note under the plots tells why it stopped.
  assert data["arrows"] == [(12, 1.0, 10, 0.5)]
  assert data["note"].startswith("Why (the last abort, step 21): ")
  assert data["x_max"] == pytest.approx(21 * 1.1)  # where it stopped, not train.steps=30
  assert "last abort (step 21)" in report.summary_text(data, run_dir, None)


def test_every_incident_kind_has_its_colour_from_its_declaration(tmp_path):
  """The report draws each kind in the colour its piece or check declares,
  read from config.json (the report imports no TensorFlow)."""
  from safetrain.records import run_log
  from safetrain.recovery import health, precision
  from safetrain.step import registry

  run_log.write_config(str(tmp_path), safetrain.default_config(), "T", None)
  colours = report.kind_colours(str(tmp_path))
  expected = set(registry.KINDS) | {k.name for k in health.KINDS + precision.KINDS}
  assert set(colours) == expected and len(set(colours.values())) == len(expected)
  assert all(colours[k] == kinds.declared()[k].colour for k in expected)
