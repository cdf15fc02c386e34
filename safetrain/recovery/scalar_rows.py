"""The bad-rows remedy for a compute_loss that returns a scalar.

A loss like the seed article's hand-written binary cross-entropy (a mean of
`log(1 - p)` over the batch) is NaN for the whole batch when one row
saturates; at a high rate soon every batch holds such a row, every batch is
quarantined, and the run ends as a "diverging state" although its model is
good. A per-example loss would have dropped the row (`guard.drop_examples`);
a scalar gives the step no rows to drop. This remedy gives it them: once a
batch's non-finite loss is shown bound to its rows (triage's row probe:
those rows alone non-finite, the others finite), the step evaluates a
non-finite scalar loss per row from then on and trains on the finite rows
(`PerExamplePiece.scalar_rows`; the loop is traced again once, logged), and
the incident says so. A resumed run turns it on again from its records.
"""

from __future__ import annotations

from absl import logging

from safetrain.core import kinds
from safetrain.recovery import triage
from safetrain.training.compiled import Compiled

ACTION = "row_losses"
# Row probes of isolated quarantined batches per process (each costs up to
# triage.PROBE_ROWS eager calls of compute_loss): a loss that is not bound to
# rows shows it in a few.
MAX_PROBES = 3


class ScalarRows:
  """Turns the per-row evaluation of a non-finite scalar loss on, once.

  Args:
    ctx: the replay context (the live model and compute_loss).
    piece: the run's `PerExamplePiece` (`guard.drop_examples`).
    compiled: the run's compiled functions (whether compute_loss returns a
      scalar, known once traced; the retrace the remedy needs).
    single_replica: the remedy works on one replica only.
    incidents: the incident log.
    lr_scale: recovery's learning-rate scale (recorded, unchanged).
  """

  def __init__(
    self,
    *,
    ctx,
    piece,
    compiled: Compiled,
    single_replica: bool,
    incidents,
    lr_scale,
  ):
    self.ctx = ctx
    self.piece = piece
    self.compiled = compiled
    self.single_replica = single_replica
    self.incidents = incidents
    self.lr_scale = lr_scale
    self._probes = 0

  @property
  def applicable(self) -> bool:
    return (
      self.piece is not None
      and not self.piece.scalar_rows
      and self.single_replica
      and bool(self.compiled.scalar_loss)
    )

  def resume(self, records: list[dict]) -> None:
    """Turns the remedy on again when the run's records say it was on."""
    if self.piece is not None and any(r.get("action") == ACTION for r in records):
      if self.piece.enable_scalar_rows():
        self.compiled.retrace()
        logging.info("The scalar loss is evaluated per row when it is not finite (resumed).")

  def __call__(self, batch, *, step: int, rows: list[int] | None = None) -> bool:
    """Turns the remedy on for `batch` (failed at `step`) when its failure
    is bound to rows: `rows` from triage, or found here by the row probe.
    Returns whether it was turned on now."""
    if batch is None or not self.applicable:
      return False
    if rows is None:
      if self._probes >= MAX_PROBES:
        return False
      self._probes += 1
      try:
        bad, probed = triage.bad_rows(self.ctx, batch)
      except Exception as e:  # noqa: BLE001 - a remedy that cannot be checked is not applied
        logging.warning("the row probe of a scalar loss failed: %s", e)
        return False
      rows = bad if 0 < len(bad) < probed else None
    if not rows:
      return False
    self.piece.enable_scalar_rows()
    self.compiled.retrace()
    lr = float(self.lr_scale.numpy())
    shown = ", ".join(str(r) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
    self.incidents.add(
      step=step,
      kind="nonfinite_loss",
      action=ACTION,
      lr_scale_before=lr,
      lr_scale_after=lr,
      diagnosis=(
        f"compute_loss returns a scalar that is non-finite on {'rows' if len(rows) > 1 else 'row'} "
        f"{shown} of this batch alone "
        "and finite on the others: from now on a non-finite loss is evaluated on each row "
        "alone and the step trains on the finite rows (at most guard.max_dropped_examples of a "
        "batch dropped), as a per-example loss would be; the compiled loop is traced again "
        "once. Returning per-example losses from compute_loss does this without the extra "
        "passes."
      ),
      cause=kinds.BAD_BATCH,
      rows=list(rows),
    )
    return True
