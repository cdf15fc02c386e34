"""What a run reports between inner loops: the loop record (metrics.jsonl and
TensorBoard), the progress line, and config.json."""

from __future__ import annotations

import json
import os
import sys
import time

import ml_collections
import numpy as np
from absl import logging

from safetrain.core import boundary, kinds
from safetrain.records.summaries import Summaries
from safetrain.step.loop_state import LoopOutput
from safetrain.storage import files as storage
from safetrain.storage.jsonl import JsonlWriter


def loop_record(
  out: LoopOutput,
  *,
  step: int,
  attempts: int,
  lr_scale: float,
  loss_scale: float,
  seconds: float,
) -> dict:
  """The metrics.jsonl record of one inner loop (means over its good steps)."""
  applied = int(out.applied)

  def mean(total):
    return float(total) / applied if applied else None

  record = {
    "step": step,
    "attempts": attempts,
    "loss": mean(out.sums["loss"]),
    "last_loss": _finite_or_none(out.last_loss),
    "grad_norm": mean(out.sums["norm"]),
    "grad_norm_max": float(out.norm_max),
    "lr": float(out.lr),
    "lr_scale": lr_scale,
    "loss_scale": loss_scale,
    **{name: int(out.counts[c]) for c, name in _CLASS_FIELDS},
    "dropped_rows": int(out.sums["dropped_rows"]),
    "spikes": out.count("loss_spike"),
    "steps_per_sec": applied / seconds if seconds > 0 else None,
  }
  for name, total in out.metric_sums.items():
    record[name] = mean(total)
  return record


_CLASS_FIELDS = (
  (kinds.GOOD, "good"),
  (kinds.OVERFLOW, "overflow"),
  (kinds.DIVERGENCE, "divergence"),
  (kinds.SKIPPED_BATCH, "skipped_batches"),
)


def _finite_or_none(x) -> float | None:
  x = float(x)
  return x if np.isfinite(x) else None


class RunLog:
  """metrics.jsonl and the TensorBoard events of a run (the chief's only).

  Args:
    workdir: the run's workdir.
    enabled: False on non-chief workers.
  """

  def __init__(self, workdir: str, *, enabled: bool):
    self._jsonl = JsonlWriter(os.path.join(workdir, "metrics.jsonl"), enabled=enabled)
    self.summaries = Summaries(workdir, enabled=enabled)

  def write(self, record: dict, incidents: list[dict] = ()) -> None:
    """Appends `record`; writes its numbers and the loop's incidents to
    TensorBoard (see `summaries`)."""
    self._jsonl.write(record)
    self.summaries.loop(record)
    self.summaries.incidents(record["attempts"], list(incidents))

  def write_final_eval(self, step: int, eval_metrics: dict, attempts: int) -> None:
    self._jsonl.write(
      {"step": step, "final_eval": True, **{f"eval_{k}": v for k, v in eval_metrics.items()}}
    )
    self.summaries.eval(attempts, eval_metrics)

  def flush(self) -> None:
    self.summaries.flush()


def write_config(
  workdir: str,
  config: ml_collections.ConfigDict,
  trainer: str,
  resumed,
  experiment: dict | None = None,
) -> None:
  """Writes WORKDIR/config.json atomically: the resolved config of this start,
  and where the trainer comes from (`experiment`: its file and the
  experiment's :ARG), which `safetrain export` needs."""
  path = os.path.join(workdir, "config.json")
  data = {
    "config": config.to_dict(),
    "trainer": trainer,
    "experiment": experiment,
    "resumed_from": resumed,
    "time": time.time(),
    # Every incident kind, as the part that raises it declares it: the report
    # (which imports no TensorFlow) draws each in its colour.
    "kinds": {k.name: {"text": k.text, "colour": k.colour} for k in kinds.declared().values()},
  }
  # A failed write names no file at times: the boundary names this one.
  with boundary.working_on(path):
    storage.write(path, json.dumps(data, indent=2, default=str))


class Progress:
  """A one-line progress display on a terminal; periodic log lines otherwise."""

  def __init__(self, total: int, log_every: int):
    self.total = total
    self.log_every = log_every
    self.tty = sys.stderr.isatty()
    self.next_log = log_every
    self.ema = None

  def update(
    self,
    step: int,
    seconds: float,
    applied: int,
    loss: float | None,
    extra: dict | None = None,
  ) -> None:
    """Shows the step, the rate, the loop's loss and `extra` ({name: value}:
    the stateful metrics of the loop)."""
    if applied and seconds > 0:
      rate = applied / seconds
      self.ema = rate if self.ema is None else 0.7 * self.ema + 0.3 * rate
    rate = self.ema or 0.0
    eta = (self.total - step) / rate if rate else float("nan")
    shown = "None" if loss is None else format(loss, ".4g")
    text = f"step {step}/{self.total}  {rate:.1f} steps/s  loss {shown}"
    for name, value in (extra or {}).items():
      text += f"  {name} {'None' if value is None else format(value, '.4g')}"
    text += f"  ETA {_fmt_time(eta)}"
    if self.tty:
      sys.stderr.write("\r" + text.ljust(79))
      sys.stderr.flush()
    elif step >= self.next_log or step >= self.total:
      # The command prints it on the terminal without absl's prefix (logs.py).
      logging.info("%s", text, extra={"safetrain_terminal": True})
      while self.next_log <= step:
        self.next_log += self.log_every

  def close(self) -> None:
    if self.tty:
      sys.stderr.write("\n")


def _fmt_time(s: float) -> str:
  if not np.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
