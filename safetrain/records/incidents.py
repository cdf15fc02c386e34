"""Incidents: the records of everything the guard and recovery did.

Each record goes to `WORKDIR/incidents.jsonl` (one JSON object a line, written
durably) and to the log. The fields are DESIGN.md's: `step`, `kind`, `action`,
`restored_step`, `lr_scale_before`, `lr_scale_after`, `batches_skipped`,
`diagnosis`, `time`, plus what a kind adds (`count`, `last_step`, ...).
"""

from __future__ import annotations

import collections
import time

import tensorflow as tf
from absl import logging

from safetrain.core import kinds
from safetrain.step import bad_batches
from safetrain.step.loop_state import STOP_ROLLBACK, LoopOutput
from safetrain.storage import files as storage
from safetrain.storage.jsonl import JsonlWriter, read_jsonl


class IncidentLog:
  """Writes incident records and keeps those of this process.

  Args:
    path: WORKDIR/incidents.jsonl.
    enabled: False on non-chief workers, which keep records in memory only.
    counter: a variable counting incidents over the run (checkpointed).
  """

  def __init__(self, path: str, *, enabled: bool, counter: tf.Variable):
    self.path = path
    self.enabled = enabled
    self.counter = counter
    self.records: list[dict] = []
    self._writer = JsonlWriter(path, enabled=enabled)

  def add(
    self,
    *,
    step: int,
    kind: str,
    action: str,
    restored_step: int | None = None,
    lr_scale_before: float | None = None,
    lr_scale_after: float | None = None,
    batches_skipped: int = 0,
    diagnosis: str = "",
    **extra,
  ) -> dict:
    """Records one incident (file, log, counter) and returns the record."""
    record = dict(
      step=step,
      kind=kind,
      action=action,
      restored_step=restored_step,
      lr_scale_before=lr_scale_before,
      lr_scale_after=lr_scale_after,
      batches_skipped=batches_skipped,
      diagnosis=diagnosis,
      time=time.time(),
      **extra,
    )
    self.records.append(record)
    self._writer.write(record)
    self.counter.assign_add(1)
    # The command shows it on the terminal in short (safetrain/records/logs.py).
    logging.warning(
      "incident at step %s: %s -> %s. %s",
      step,
      kind,
      action,
      diagnosis,
      extra={"safetrain_incident": record},
    )
    return record

  def add_loop(
    self,
    out: LoopOutput,
    *,
    leaf_names: list[str],
    bad_inputs: str,
    lr_scale: float,
    open_bad_batch: bool = False,
    bad_batch_diagnosis: str = "",
  ) -> int:
    """One record per kind and action the compiled loop saw, with how often.

    Non-finite losses and gradients are bad batches (`quarantined_batch`)
    unless they belong to the open run of divergent attempts that ended the
    loop for recovery (`skipped_step`, then the rollback), or `open_bad_batch`
    says that run was bad batches too. Returns the quarantined batches.
    """
    skipped_batches = int(out.counts[kinds.SKIPPED_BATCH])
    stopped = int(out.stop) == STOP_ROLLBACK
    entries = bad_batches.entries(out.quarantine)
    common = dict(lr_scale_before=lr_scale, lr_scale_after=lr_scale)
    quarantined_total = 0
    for k, name in enumerate(kinds.KINDS[: kinds.IN_GRAPH]):
      count = int(out.kind_counts[k])
      if not count:
        continue
      first, last = int(out.kind_first[k]), int(out.kind_last[k])
      if k == kinds.NONFINITE_INPUTS:
        dropped = bad_inputs == "drop_rows" and (int(out.dropped) or not skipped_batches)
        action = "dropped_rows" if dropped else "skipped_batch"
        diagnosis = (
          f"non-finite values in {bad_leaves(out, leaf_names)}; {int(out.dropped)} rows "
          f"dropped, {skipped_batches} batches skipped"
        )
      elif k in kinds.BATCH_BOUND:
        open_k = int(out.open_kinds[k]) if stopped and not open_bad_batch else 0
        quarantined = count - open_k
        quarantined_total += quarantined
        if quarantined:
          steps = [
            e.step
            for e in entries
            if e.skipped and e.kind == name and e.attempt <= int(out.last_good)
          ]
          self.add(
            step=first,
            kind=name,
            action="quarantined_batch",
            count=quarantined,
            last_step=max(steps, default=first) if open_k else last,
            diagnosis=bad_batch_diagnosis
            or f"{kinds.text(name)} Other batches from the same state trained: a bad batch.",
            cause=kinds.BAD_BATCH,
            **common,
          )
        if not open_k:
          continue
        count, first, action, diagnosis = open_k, last, "skipped_step", kinds.text(name)
      else:
        action, diagnosis = "skipped_step", kinds.text(name)
      self.add(
        step=first,
        kind=name,
        action=action,
        count=count,
        last_step=last,
        diagnosis=diagnosis,
        **common,
      )
    if int(out.dropped_examples):
      steps = int(out.dropped_example_steps)
      where = [e.step for e in entries if not e.skipped]
      self.add(
        step=min(where, default=-1),
        last_step=max(where, default=-1),
        kind="nonfinite_loss",
        action="dropped_examples",
        count=steps,
        examples=int(out.dropped_examples),
        diagnosis=f"{int(out.dropped_examples)} examples with a non-finite loss were left out "
        f"of the mean in {steps} steps (per-example loss); the rest of each batch trained."
        + (f" {bad_batch_diagnosis}" if bad_batch_diagnosis else ""),
        cause=kinds.BAD_BATCH,
        **common,
      )
    return quarantined_total

  def tally(self) -> str:
    """ "3x nonfinite_loss, 1x loss_spike": the divergences recorded so far."""
    counts = collections.Counter()
    for record in self.records:
      if record["action"] not in ("dropped_rows", "dropped_examples"):
        counts[record["kind"]] += record.get("count", 1)
    return ", ".join(f"{n}x {kind}" for kind, n in counts.items())

  def all(self) -> list[dict]:
    """Every record of the run: the file (resumes included) on the chief."""
    return read_jsonl(self.path) if self.enabled and storage.exists(self.path) else self.records


def bad_leaves(out: LoopOutput, leaf_names: list[str]) -> str:
  """Where the non-finite inputs of a loop were: "x[:, 1] (3 rows)"."""
  parts = []
  for name, bad, col in zip(leaf_names, out.leaf_bad, out.cols):
    if bad:
      where = f"{name}[:, {int(col)}]" if col >= 0 else name
      parts.append(f"{where} ({int(bad)} rows)")
  return ", ".join(parts) or "the inputs"


def last_divergence(out: LoopOutput) -> str:
  """The kind of the loop's last divergence (inputs apart)."""
  seen = [(int(out.kind_last[k]), k) for k in range(1, kinds.IN_GRAPH) if out.kind_counts[k]]
  return kinds.KINDS[max(seen)[1]] if seen else "nonfinite_loss"
