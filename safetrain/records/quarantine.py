"""Quarantine: where the bad data of a run was, for a user to inspect.

A *bad batch* is one whose loss (or gradient) is non-finite while the state is
healthy: other batches from the same state train. It is skipped, never
trained on, and recorded here with its data position; so are the examples
dropped from a per-example loss. The compiled loop keeps the last such
attempts of a loop in a small buffer (`step.bad_batches`); the host turns them
into `WORKDIR/quarantine.jsonl`, one JSON object a line:

  step        the update being attempted (applied steps + 1)
  attempt     the run's attempt number (what config.drill counts)
  position    the batch's position in the (repeated) training data, 0-based
  kind        nonfinite_loss or nonfinite_grads
  action      quarantined_batch (skipped) or dropped_examples (trained on the rest)
  rows        the dropped or non-finite rows (per-example losses, one replica),
              at most 16, or null when the loss is one number
  bad_examples  how many examples were non-finite, or null
  diagnosis   what the replay of a quarantined batch found, when it ran
"""

from __future__ import annotations

import os

from absl import logging

from safetrain.step import bad_batches
from safetrain.storage import files as storage
from safetrain.storage.jsonl import JsonlWriter

# What identifies a record: a replay after a resume writes the same.
KEY = ("step", "attempt", "position", "kind", "action")


class QuarantineLog:
  """WORKDIR/quarantine.jsonl (the chief's only).

  Args:
    path: the file.
    enabled: False on non-chief workers.
  """

  def __init__(self, path: str, *, enabled: bool):
    self.path = path
    self._writer = JsonlWriter(path, enabled=enabled, key=KEY)
    self.written = 0

  def open(self) -> None:
    """At the start of fit(): see `JsonlWriter.open`."""
    self._writer.open()

  def expect_replay(self, after_step: int) -> int:
    """The run resumed at `after_step`: see `JsonlWriter.expect_replay` (the
    attempt numbers, checkpointed, never repeat after a rollback)."""
    return self._writer.expect_replay(after_step)

  def write(self, record: dict) -> None:
    self._writer.write(record)
    self.written += 1

  def write_loop(
    self,
    out,
    before: tuple[int, int],
    *,
    stopped: bool,
    open_bad: bool,
    rows: list[int] | None,
    diagnosis: str,
  ) -> None:
    """One record per bad batch and per step that dropped examples of one
    loop, with its data position.

    Args:
      out: the loop's `loop_state.LoopOutput`.
      before: (data position, attempts) before the loop.
      stopped: the loop ended on `guard.rollback_after` failures in a row.
      open_bad: the open run of failures that ended the loop was judged bad
        batches (else its batches belong to a diverging state: not recorded).
      rows: the row probe's non-finite rows of the batch that ended the loop.
      diagnosis: what the replay of a quarantined batch found, or "".
    """
    position0, attempt0 = before
    found = bad_batches.entries(out.pieces["bad_batches"])
    for i, e in enumerate(found):
      in_open_run = stopped and e.attempt > int(out.last_good)
      if e.skipped and in_open_run and not open_bad:
        continue  # part of a diverging state: rolled back, not bad data
      e_rows = e.rows
      if e_rows is None and open_bad and i == len(found) - 1:
        e_rows = rows
      self.write(
        dict(
          step=e.step,
          attempt=e.attempt,
          position=position0 + e.attempt - attempt0 - 1,
          kind=e.kind,
          action="quarantined_batch" if e.skipped else "dropped_examples",
          rows=e_rows,
          bad_examples=e.bad_examples,
          diagnosis=diagnosis,
        )
      )
    if int(out.pieces["bad_batches"].n) > bad_batches.SLOTS:
      logging.info(
        "quarantine: %d entries this loop, the last %d recorded",
        int(out.pieces["bad_batches"].n),
        bad_batches.SLOTS,
      )

  @staticmethod
  def exists(workdir: str) -> bool:
    return storage.exists(os.path.join(workdir, "quarantine.jsonl"))
