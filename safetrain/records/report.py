"""`safetrain report WORKDIR`: a picture and a summary of a run.

Reads WORKDIR/metrics.jsonl (one record per compiled loop) and
WORKDIR/incidents.jsonl, writes WORKDIR/report.png and prints a short summary.
The picture's panels share the step axis: the loss, the pre-clip gradient
norm, the learning-rate scale recovery left in force and (under
mixed_float16) the loss scale, with every incident drawn at its step.

A rollback sends the step counter back, so the metrics records do not follow
one path: the records from the steps a rollback undid are drawn apart, faded,
as abandoned branches, and the solid line is the history of the final model.
`plot_data` computes everything drawn, so tests can check the data behind the
picture rather than pixels, without matplotlib; report_plot.py draws it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
from typing import Any

from safetrain.storage import files as storage
from safetrain.storage.jsonl import read_jsonl

SERIES = ("loss", "grad_norm", "grad_norm_max", "lr_scale", "loss_scale", "lr", "eval_loss")


def plot_data(workdir: str, skipped: list[str] | None = None) -> dict[str, Any]:
  """Everything the report draws, computed from the workdir's records.

  Returns:
    A dict with
      series: {key: {"x": [...], "y": [...], "kept": [...]}} for each of
        SERIES present in metrics.jsonl. x is the step the loop reached (for
        a loop that ended in a rollback, the step it reached before rolling
        back); kept is False for points a later rollback undid. lr_scale and
        loss_scale are placed where they took effect (after a rollback: the
        restored step) and start at the run's initial values.
      incidents: [{"step", "kind", "action", "restored_step", "count",
        "diagnosis"}] in file order: the marker positions.
      rollbacks: [(step, restored_step)]; aborts: [step].
      arrows: [(step, lr_scale_before, restored_step, lr_scale_after)] of
        each rollback: from where the run gave up, back and down.
      note: the diagnosis of the last rollback or abort, wrapped ("" if none).
      summary: numbers for the text summary.
      fp16: whether the run used mixed_float16; clip: clip.global_norm.
      log_steps: whether the step axis is logarithmic; x_max: its extent.
    Lines of the records that are not JSON objects are skipped (and described
    in `skipped`, when given).
  """
  metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"), skipped)
  incidents = read_jsonl(os.path.join(workdir, "incidents.jsonl"), skipped)
  config = _read_config(workdir)
  train = [r for r in metrics if not r.get("final_eval") and "step" in r]

  # x: where each loop got to; after: the step the run stood at afterwards.
  xs, after, prev = [], [], None
  for r in train:
    if r.get("rollback"):
      base = prev if prev is not None else 0
      xs.append(base + int(r.get("good", 0)))
    else:
      xs.append(int(r["step"]))
    after.append(int(r["step"]))
    prev = int(r["step"])
  kept = [True] * len(train)
  horizon = math.inf
  for i in range(len(train) - 1, -1, -1):
    if train[i].get("rollback"):
      horizon = min(horizon, after[i])
    kept[i] = xs[i] <= horizon

  series: dict[str, dict[str, list]] = {}
  for key in SERIES:
    if key in ("lr_scale", "loss_scale"):
      continue
    pts = [(x, r[key], k) for x, r, k in zip(xs, train, kept) if _num(r.get(key))]
    if key == "eval_loss":
      pts += [
        (int(r["step"]), r[key], True) for r in metrics if r.get("final_eval") and _num(r.get(key))
      ]
    if pts:
      series[key] = {
        "x": [p[0] for p in pts],
        "y": [p[1] for p in pts],
        "kept": [p[2] for p in pts],
      }
  # The learning-rate scale of a rollback is told by its incident: the scale
  # before stands at the step the loop reached, the lowered one takes effect
  # at the restored step. (A rollback record holds the scales the run goes on
  # with, those after the restore and the backoff; records written before
  # that held the ones from before: the incidents serve both.)
  scales = iter(
    (i.get("lr_scale_before"), i.get("lr_scale_after"))
    for i in incidents
    if i.get("action") == "rollback"
  )
  initial = {"lr_scale": 1.0, "loss_scale": _initial_loss_scale(config)}
  for key in ("lr_scale", "loss_scale"):
    pts = []
    for x, a, r in zip(xs, after, train):
      if not _num(r.get(key)):
        continue
      if r.get("rollback") and key == "lr_scale":
        before, lowered = next(scales, (None, None))
        pts.append((x, before if _num(before) else r[key]))
        if _num(lowered):
          pts.append((a, lowered))
      else:
        pts.append((a, r[key]))
    if pts:
      start = initial[key] if initial[key] is not None else pts[0][1]
      pts = [(0, start), *pts]
      series[key] = {"x": [p[0] for p in pts], "y": [p[1] for p in pts], "kept": [True] * len(pts)}

  marks = [
    {
      "step": int(i["step"]),
      "kind": i.get("kind", "?"),
      "action": i.get("action", "?"),
      "restored_step": i.get("restored_step"),
      "count": int(i.get("count", 1) or 1),
      "diagnosis": i.get("diagnosis", ""),
      "lr_scale_before": i.get("lr_scale_before"),
      "lr_scale_after": i.get("lr_scale_after"),
    }
    for i in incidents
    if "step" in i
  ]
  last = train[-1] if train else {}
  final_eval = next((r for r in reversed(metrics) if r.get("final_eval")), {})
  losses = [r["loss"] for r in train if _num(r.get("loss"))]
  kinds: dict[str, int] = {}
  for m in marks:
    if m["action"] in ("skipped_step", "dropped_rows", "skipped_batch"):
      kinds[m["kind"]] = kinds.get(m["kind"], 0) + m["count"]
    elif m["action"] == "abort" and not any(
      k["kind"] == m["kind"] and k["action"] == "skipped_step" for k in marks
    ):
      kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
  summary = {
    "step": int(last.get("step", 0)),
    "attempts": int(last.get("attempts", 0)),
    "final_loss": losses[-1] if losses else None,
    "eval": {k[5:]: v for k, v in final_eval.items() if k.startswith("eval_")},
    "incidents": len(marks),
    "kinds": kinds,
    "rollbacks": sum(m["action"] == "rollback" for m in marks),
    "aborted": any(m["action"] == "abort" for m in marks),
    "lr_scale": _final_lr_scale(train, incidents),
    "loss_scale": last.get("loss_scale", 1.0),
    "batches_skipped": sum(int(i.get("batches_skipped") or 0) for i in incidents),
    "rows_dropped": sum(int(r.get("dropped_rows") or 0) for r in train),
    # An aborted run writes no metrics record for its last loop: its skipped
    # steps are only in the incidents.
    "steps_skipped": max(
      sum(
        int(r.get("divergence", 0)) + int(r.get("overflow", 0)) + int(r.get("skipped_batches", 0))
        for r in train
      ),
      sum(m["count"] for m in marks if m["action"] in ("skipped_step", "skipped_batch")),
    ),
    "overflows": sum(int(r.get("overflow", 0)) for r in train),
  }
  policy = config.get("precision", {}).get("policy", "float32")
  fp16 = policy == "mixed_float16" or any(
    _num(r.get("loss_scale")) and r["loss_scale"] != 1.0 for r in train
  )
  right = max([int(r["step"]) for r in train] + [m["step"] for m in marks] + [0])
  early = [m["step"] for m in marks] + [x for x, k in zip(xs, kept) if not k]
  total_steps = config.get("train", {}).get("steps")
  reached = max([m["step"] for m in marks] + [x for d in series.values() for x in d["x"]] + [0])
  if summary["aborted"]:
    x_max = max(10, reached * 1.1)  # what happened before it stopped, not the plan
  else:
    x_max = max(total_steps or 0, reached) * 1.02
  x_max = max(x_max, 1)
  arrows = [
    (m["step"], m["lr_scale_before"], m["restored_step"], m["lr_scale_after"])
    for m in marks
    if m["action"] == "rollback"
    and m["restored_step"] is not None
    and _num(m["lr_scale_before"])
    and _num(m["lr_scale_after"])
  ]
  return {
    "log_steps": bool(early) and right >= 100 and max(early) <= 0.05 * right,
    "x_max": x_max,
    "series": series,
    "incidents": marks,
    "incident_groups": incident_groups(marks, x_max),
    "rollbacks": [(m["step"], m["restored_step"]) for m in marks if m["action"] == "rollback"],
    "aborts": [m["step"] for m in marks if m["action"] == "abort"],
    "arrows": arrows[-MAX_ARROWS:],
    "note": _note(marks),
    "summary": summary,
    "fp16": fp16,
    "clip": float(config.get("clip", {}).get("global_norm", 0.0) or 0.0),
    "total_steps": total_steps,
    "kind_colours": kind_colours(workdir),
  }


# Incidents drawn grouped: at most this many marks per kind and action, one
# per bin of the step axis (a long run's 150,000 incidents would otherwise
# be 150,000 vertical lines in every panel; a bin is narrower than a pixel).
MAX_MARKS = 1500
# Rollback arrows drawn at most (the last ones: what the run ended with).
MAX_ARROWS = 200


def incident_groups(marks: list[dict], x_max: float) -> list[dict]:
  """The incidents as drawn: one group per (kind, action), in order of first
  appearance, with its marks' steps (one per bin of width x_max/MAX_MARKS)
  and how many incidents (records, and the steps they count) it holds."""
  width = max(x_max, 1) / MAX_MARKS
  groups: dict[tuple[str, str], dict] = {}
  for m in marks:
    key = (m["kind"], m["action"])
    g = groups.get(key)
    if g is None:
      g = groups[key] = {"kind": key[0], "action": key[1], "bins": {}, "records": 0, "count": 0}
    g["records"] += 1
    g["count"] += m["count"]
    g["bins"].setdefault(int(m["step"] // width), m["step"])
  return [
    {
      "kind": g["kind"],
      "action": g["action"],
      "steps": sorted(g["bins"].values()),
      "records": g["records"],
      "count": g["count"],
    }
    for g in groups.values()
  ]


def _last_stop(marks: list[dict]) -> dict | None:
  """The incident of the last rollback or abort: the one whose why is told."""
  return next((m for m in reversed(marks) if m["action"] in ("rollback", "abort")), None)


def _note(marks: list[dict], width: int = 135, max_lines: int = 6) -> str:
  """The note under the plots: why the run last rolled back or stopped."""
  last = _last_stop(marks)
  if not last or not last["diagnosis"]:
    return ""
  text = last["diagnosis"]
  if last["action"] == "abort":
    # The abort's text wraps the forensics in a run summary the plots show
    # already; keep the forensics and the reason for stopping.
    m = re.match(r"Training diverged at step \d+ \([a-z_]+\): (.*?) Over this run:", text)
    why = re.search(r"Stopping because (.*?)\. The last healthy", text)
    if m:
      text = m.group(1) + (f" Stopped because {why.group(1)}." if why else "")
  head = f"Why (the last {last['action']}, step {last['step']}): "
  lines = textwrap.wrap(head + text, width)
  if len(lines) > max_lines:
    lines = lines[: max_lines - 1] + [lines[max_lines - 1][: width - 3] + "..."]
  return "\n".join(lines)


def _final_lr_scale(train: list, incidents: list) -> float:
  """The scale in force at the end: a rollback record still holds the scale
  from before its rollback, so the newest of the plain records' scale and the
  rollbacks' (or abort's) lr_scale_after wins."""
  events = [(r.get("time", 0), r["lr_scale"]) for r in train if not r.get("rollback")]
  events += [
    (i.get("time", 0), i["lr_scale_after"])
    for i in incidents
    if i.get("action") in ("rollback", "abort") and _num(i.get("lr_scale_after"))
  ]
  events = [e for e in events if _num(e[1])]
  return max(events, key=lambda e: e[0])[1] if events else 1.0


def _num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_config(workdir: str) -> dict:
  return _read_config_file(workdir).get("config", {})


def _read_config_file(workdir: str) -> dict:
  try:
    return json.loads(storage.read_text(os.path.join(workdir, "config.json")))
  except (OSError, ValueError):
    return {}


def kind_colours(workdir: str) -> dict[str, str]:
  """{kind: colour}, as the run's config.json lists its declared kinds."""
  return {k: v["colour"] for k, v in _read_config_file(workdir).get("kinds", {}).items()}


def _initial_loss_scale(config: dict) -> float | None:
  if config.get("precision", {}).get("policy") != "mixed_float16":
    return 1.0
  return config.get("loss_scale", {}).get("initial")


def _plural(n: int, word: str) -> str:
  return f"{n} {word}" + ("" if n == 1 else "s")


# -------------------------------------------------------------------- text


def summary_text(data: dict[str, Any], workdir: str, picture: str | None) -> str:
  """The few lines `safetrain report` prints."""
  s = data["summary"]
  lines = [f"safetrain report: {workdir}"]
  loss = "n/a (no step applied)" if s["final_loss"] is None else f"{s['final_loss']:.4g}"
  ev = ", ".join(f"eval {k} {v:.4g}" for k, v in s["eval"].items() if _num(v))
  lines.append(
    f"  steps: {s['step']} applied of {s['attempts']} attempted; final loss {loss}"
    + (f"; {ev}" if ev else "")
  )
  if s["incidents"]:
    kinds = ", ".join(f"{k} x{v}" for k, v in s["kinds"].items()) or "none"
    lines.append(
      f"  incidents: {s['incidents']} records ({kinds}); {_plural(s['rollbacks'], 'rollback')}"
      + ("; the run ABORTED" if s["aborted"] else "")
    )
  else:
    lines.append("  incidents: none")
  lines.append(
    f"  lr scale {s['lr_scale']:.4g}, loss scale {s['loss_scale']:.4g}; "
    f"{s['steps_skipped']} steps skipped ({s['overflows']} float16 overflows), "
    f"{s['batches_skipped']} batches skipped by rollbacks, {s['rows_dropped']} rows dropped"
  )
  diag = _last_stop(data["incidents"])
  if diag and diag["diagnosis"]:
    text = diag["diagnosis"]
    if len(text) > 400:
      text = text[:397] + "..."
    lines.append(f"  last {diag['action']} (step {diag['step']}): {text}")
  if picture:
    lines.append(f"  picture: {picture}")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  """`safetrain report WORKDIR [--output PATH]`; returns the exit code."""
  parser = argparse.ArgumentParser(
    prog="safetrain report",
    description="Draw WORKDIR/report.png and print a summary of a safetrain run.",
  )
  parser.add_argument("workdir")
  parser.add_argument("--output", default=None, help="PNG path (default WORKDIR/report.png)")
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:
    return 0 if e.code == 0 else 2
  workdir = args.workdir
  if not storage.isdir(workdir):
    print(f"safetrain report: error: no such workdir: {workdir}", file=sys.stderr)
    return 2
  if not storage.exists(os.path.join(workdir, "metrics.jsonl")):
    print(
      f"safetrain report: error: {workdir} has no metrics.jsonl: not a safetrain workdir, "
      "or the run stopped before its first loop",
      file=sys.stderr,
    )
    return 2
  skipped: list[str] = []
  data = plot_data(workdir, skipped)
  for note in skipped:
    print(f"safetrain report: warning: {note}", file=sys.stderr)
  path = args.output or os.path.join(workdir, "report.png")
  s = data["summary"]
  name = storage.basename(workdir if not storage.is_local(workdir) else os.path.abspath(workdir))
  loss = "" if s["final_loss"] is None else f", final loss {s['final_loss']:.4g}"
  if s["aborted"]:
    at = data["aborts"][-1]
    planned = f" of {data['total_steps']}" if data["total_steps"] else ""
    title = f"{name}: ABORTED at step {at}{planned}, {_plural(s['rollbacks'], 'rollback')}{loss}"
  else:
    title = f"{name}: {s['step']} steps, {_plural(s['rollbacks'], 'rollback')}{loss}"
  from safetrain.records import report_plot  # matplotlib: only to draw

  try:
    report_plot.draw(data, path, title)
  except OSError as e:
    print(f"safetrain report: error: cannot write {path}: {e}", file=sys.stderr)
    return 2
  print(summary_text(data, workdir, path))
  return 0
