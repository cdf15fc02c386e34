"""`safetrain report` on a long run: 150,000 incident records draw grouped,
in seconds (they once took over 150 s: one vertical line per incident in
every panel)."""

import json
import os
import time

from safetrain.records import report

KINDS = ("nonfinite_loss", "nonfinite_inputs", "loss_spike")
ACTIONS = ("skipped_step", "dropped_rows", "quarantined_batch")


def make_long_run(workdir, incidents=150_000, loops=3_000):
  """A workdir as a long run leaves it: `loops` metrics records and
  `incidents` incident records (1 in 500 a rollback), written in one go."""
  os.makedirs(workdir)
  steps = loops * 100
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"config": {"train": {"steps": steps}}, "trainer": "T"}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(
      json.dumps(
        {
          "step": (i + 1) * 100,
          "loss": 1.0 / (i + 1),
          "grad_norm": 1.0,
          "lr": 0.01,
          "lr_scale": 1.0,
          "loss_scale": 1.0,
          "good": 100,
          "attempts": (i + 1) * 100,
        }
      )
      + "\n"
      for i in range(loops)
    )
  lines = []
  for i in range(incidents):
    step = i * steps // incidents + 1
    record = {
      "step": step,
      "kind": KINDS[i % 3],
      "action": ACTIONS[i % 3],
      "count": 1,
      "diagnosis": "",
      "lr_scale_before": 1.0,
      "lr_scale_after": 1.0,
    }
    if i % 500 == 499:
      record.update(action="rollback", restored_step=max(step - 50, 0), lr_scale_after=0.5)
    lines.append(json.dumps(record) + "\n")
  with open(os.path.join(workdir, "incidents.jsonl"), "w") as f:
    f.writelines(lines)


def test_a_report_of_150000_incidents_draws_grouped_in_seconds(tmp_path, capsys):
  workdir = str(tmp_path / "long")
  t0 = time.perf_counter()
  make_long_run(workdir)
  made = time.perf_counter() - t0
  data = report.plot_data(workdir)
  groups = data["incident_groups"]
  assert sum(g["records"] for g in groups) == 150_000
  assert {(g["kind"], g["action"]) for g in groups} >= {(k, a) for k, a in zip(KINDS, ACTIONS)}
  assert all(len(g["steps"]) <= report.MAX_MARKS for g in groups)
  assert len(data["arrows"]) <= report.MAX_ARROWS
  t0 = time.perf_counter()
  assert report.main([workdir]) == 0
  seconds = time.perf_counter() - t0
  assert os.path.getsize(os.path.join(workdir, "report.png")) > 10_000
  assert "150000 records" in capsys.readouterr().out
  # Measured here: ~5 s for the report, ~0.7 s to generate (a loaded machine); generous.
  assert made < 15 and seconds < 30, (made, seconds)
