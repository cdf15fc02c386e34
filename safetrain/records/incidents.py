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
from safetrain.step import bad_batches, registry
from safetrain.step import piece as piece_lib
from safetrain.step.loop_state import STOP_ROLLBACK, LoopOutput
from safetrain.storage import files as storage
from safetrain.storage.jsonl import JsonlWriter, read_jsonl

# What identifies an incident of a step: a replay after a resume writes the
# same (the time and the diagnosis's wording may differ).
KEY = ("step", "kind", "action", "count", "last_step", "restored_step")


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
    self._writer = JsonlWriter(path, enabled=enabled, key=KEY)

  def open(self) -> None:
    """At the start of fit(): see `JsonlWriter.open`."""
    self._writer.open()

  def expect_replay(self, after_step: int) -> int:
    """The run resumed at `after_step`: see `JsonlWriter.expect_replay`."""
    return self._writer.expect_replay(after_step)

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
    if action == "rollback":
      self._writer.diverge()
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
    pieces: registry.Pieces,
    lr_scale: float,
    open_bad_batch: bool = False,
    bad_batch_diagnosis: str = "",
  ) -> int:
    """One record per kind and action the compiled loop saw, with how often;
    each kind's action and diagnosis come from the piece that raised it, and
    each piece may add records of its own (dropped examples).

    Batch-bound kinds (non-finite losses and gradients) are bad batches
    (`quarantined_batch`) unless they belong to the open run of divergent
    attempts that ended the loop for recovery (`skipped_step`, then the
    rollback), or `open_bad_batch` says that run was bad batches too.
    Returns the quarantined batches.
    """
    common = dict(lr_scale_before=lr_scale, lr_scale_after=lr_scale)
    quarantined_total = 0
    for name in registry.KINDS:
      count = out.count(name)
      if not count:
        continue
      code = registry.code(name)
      first, last = int(out.kind_first[code]), int(out.kind_last[code])
      owner = pieces.get(registry.owner(name).name)
      if name in registry.BATCH_BOUND:
        open_k = self._add_bad_batches(
          out, owner, name, count, open_bad_batch, bad_batch_diagnosis, common
        )
        quarantined_total += count - open_k
        if not open_k:
          continue
        count, first = open_k, last
      self.add(
        step=first,
        kind=name,
        action=owner.action(name, out),
        count=count,
        last_step=last,
        diagnosis=owner.explain(name, out),
        **common,
      )
    for p in pieces:
      for record in p.records(out, bad_batch_diagnosis=bad_batch_diagnosis):
        self.add(**record, **common)
    return quarantined_total

  def _add_bad_batches(
    self, out, owner, name: str, count: int, open_bad_batch: bool, diagnosis: str, common: dict
  ) -> int:
    """Records the quarantined batches of a batch-bound kind; returns the
    attempts of the kind in the open run that ended the loop (not bad data)."""
    code = registry.code(name)
    stopped = int(out.stop) == STOP_ROLLBACK
    open_k = int(out.open_kinds[code]) if stopped and not open_bad_batch else 0
    quarantined = count - open_k
    if quarantined:
      first, last = int(out.kind_first[code]), int(out.kind_last[code])
      steps = [
        e.step
        for e in bad_batches.entries(out.pieces["bad_batches"])
        if e.skipped and e.kind == name and e.attempt <= int(out.last_good)
      ]
      self.add(
        step=first,
        kind=name,
        action="quarantined_batch",
        count=quarantined,
        last_step=max(steps, default=first) if open_k else last,
        diagnosis=self._bad_batch_text(owner, name, out, diagnosis),
        cause=kinds.BAD_BATCH,
        **common,
      )
    return open_k

  @staticmethod
  def _bad_batch_text(owner, name: str, out, replay: str) -> str:
    """A piece that explains its own kind says why; else the replay of the
    batch, or the kind's text."""
    if type(owner).explain is not piece_lib.Piece.explain:
      return owner.explain(name, out)
    return replay or f"{kinds.text(name)} Other batches from the same state trained: a bad batch."

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


def last_divergence(out: LoopOutput) -> str:
  """The kind of the loop's last divergence (inputs apart)."""
  seen = [(int(out.kind_last[registry.code(k)]), k) for k in registry.DIVERGING if out.count(k)]
  return max(seen)[1] if seen else "nonfinite_loss"
