"""What the command prints (short incident lines, each cause's diagnosis
once, the progress line) and WORKDIR/log.txt (every line, absl's format);
and the small truths: the final loss of the kept state, and a rollback
record whose fields belong to one moment."""

import os
import re
import subprocess
import sys

import pytest
from common import ROOT, TinyTrainer, tiny_config

import safetrain
from safetrain.cli import main as cli

ROLLBACKS = os.path.join(ROOT, "tests", "fixtures", "configs", "rollbacks.py")
ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \w+\.py:\d+\] ")


def test_the_terminal_shows_short_incident_lines_and_each_diagnosis_once(tmp_path, capfd):
  workdir = str(tmp_path / "run")
  code = cli.main_with_exit_code(["safetrain", f"--config={ROLLBACKS}", f"--workdir={workdir}"])
  out, err = capfd.readouterr()
  assert code == 0, err
  incidents = safetrain.read_jsonl(os.path.join(workdir, "incidents.jsonl"))
  rollbacks = [i for i in incidents if i["action"] == "rollback"]
  assert [(i["step"], i["restored_step"]) for i in rollbacks] == [(3, 0), (6, 5), (11, 10)]
  # The three rollbacks have one cause: their diagnoses differ in numbers only.
  assert len({i["diagnosis"] for i in rollbacks}) == 3
  assert [ln for ln in err.splitlines() if " -> " in ln] == [
    "safetrain: step 3: nonfinite_loss -> skipped_step, lr scale 1",
    "safetrain: step 3: nonfinite_loss -> rollback to step 0, lr scale 1 -> 0.5",
    "safetrain: step 6: nonfinite_loss -> skipped_step, lr scale 0.5 (diagnosis as above)",
    "safetrain: step 6: nonfinite_loss -> rollback to step 5, lr scale 0.5 -> 0.25 "
    "(diagnosis as above)",
    "safetrain: step 11: nonfinite_loss -> skipped_step, lr scale 0.25 (diagnosis as above)",
    "safetrain: step 11: nonfinite_loss -> rollback to step 10, lr scale 0.25 -> 0.125 "
    "(diagnosis as above)",
  ]
  # Each distinct diagnosis once, in full, under the first incident of its cause.
  assert f"\n  {rollbacks[0]['diagnosis']}\n" in err
  assert err.count("replayed on the offending batch") == 1
  assert err.count("the loss was not finite") == 1
  # The progress line, and none of the INFO lines (checkpoint saves) or absl prefixes.
  assert "safetrain: step 20/20" in err
  assert "Saved healthy checkpoint" not in err
  assert not [ln for ln in err.splitlines() if ABSL_PREFIX.match(ln) and "safetrain" in ln]
  assert out.startswith("step 20: 6 incidents, 3 rollbacks, lr scale 0.125")

  # log.txt holds every line in absl's format: the full incident lines too.
  with open(os.path.join(workdir, "log.txt")) as f:
    log = f.read().splitlines()
  assert log and all(ABSL_PREFIX.match(ln) for ln in log if not ln.startswith(" "))
  incident_lines = [ln for ln in log if "] incident at step" in ln]
  assert len(incident_lines) == 6
  for line, record in zip(incident_lines[1::2], rollbacks):
    assert line.endswith(
      f"incident at step {record['step']}: nonfinite_loss -> rollback. {record['diagnosis']}"
    )
  assert sum("Saved healthy checkpoint" in ln for ln in log) >= 4
  assert any("step 20/20" in ln for ln in log)

  # -v: every line on the terminal as absl prints it; log.txt is appended to.
  code = cli.main_with_exit_code(
    ["safetrain", f"--config={ROLLBACKS}", f"--workdir={workdir}", "--config.train.steps=25", "-v"]
  )
  out, err = capfd.readouterr()
  assert code == 0, err
  assert any(
    ABSL_PREFIX.match(ln) and "Saved healthy checkpoint" in ln for ln in err.splitlines()
  ), err
  assert "safetrain: step" not in err  # no short lines: the absl ones
  with open(os.path.join(workdir, "log.txt")) as f:
    again = f.read().splitlines()
  assert again[: len(log)] == log and any("ckpt-25" in ln for ln in again[len(log) :])


def test_sigterm_prints_the_loss_of_the_kept_state_and_rollback_records_are_one_moment(tmp_path):
  """The action sends SIGTERM right after the rollback at attempt 9: the
  command stops at the restored step 5 and prints the loss of the loop that
  ended there, not of the undone one."""
  workdir = str(tmp_path / "run")
  p = subprocess.run(
    [sys.executable, "-m", "safetrain", f"--config={ROLLBACKS}:sigterm", f"--workdir={workdir}"],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert p.returncode == 143, p.stderr[-3000:]
  # safetrain's own warning, without absl's prefix.
  assert "\nsafetrain: warning: Received signal 15" in p.stderr
  kept, undone = safetrain.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert p.stdout.startswith("step 5: 2 incidents, 1 rollbacks, lr scale 0.5")
  assert f"final loss {kept['loss']:.4g}" in p.stdout
  assert f"{undone['loss']:.4g}" not in p.stdout and kept["loss"] != undone["loss"]
  # The rollback record: the step after the restore with the scale after the backoff.
  (rollback,) = [
    i
    for i in safetrain.read_jsonl(os.path.join(workdir, "incidents.jsonl"))
    if i["action"] == "rollback"
  ]
  assert undone["rollback"] and undone["step"] == rollback["restored_step"] == 5
  assert undone["lr_scale"] == rollback["lr_scale_after"] == 0.5
  assert kept["lr_scale"] == rollback["lr_scale_before"] == 1.0


class StopAfterRollback(TinyTrainer):
  def actions(self):
    return [lambda record: record.stop("rolled back") if record.rolled_back else None]


@pytest.mark.parametrize("drill, restored", [("13-15", 10), ("3-5", 0)])
def test_fit_result_loss_is_the_loss_of_the_kept_state(drill, restored, tmp_path):
  config = tiny_config(**{"drill.loss_steps": drill})
  result = StopAfterRollback(config, str(tmp_path)).fit()
  assert result.stopped == "action" and result.step == restored and result.rollbacks == 1
  loops = safetrain.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  loops = [r for r in loops if "final_eval" not in r]
  assert loops[-1]["rollback"] and loops[-1]["loss"] != result.loss
  if restored:
    # The loop that ended at step 10, the state the run stopped with.
    (ended_there,) = [r for r in loops if r["step"] == restored and not r.get("rollback")]
    assert result.loss == ended_there["loss"]
  else:
    # The initial state: no loop ended there, no loss to show.
    assert result.loss != result.loss
