"""The recovery policy: which cause gets which action, in one pure function.

The evidence of one loop (are the variables finite, did an open run of
failures end it and was that run judged bad batches, are bad batches
frequent, is the run healthy) goes in; the decision comes out: carry on, or
roll back naming the kind and why. `Response.handle` gathers the evidence and
carries the decision out; nothing else decides. Bad batches that are not
frequent are quarantined by the records (no decision needed: the step was
already skipped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Evidence:
  """What one loop showed.

  Attributes:
    params_finite: every model and optimizer variable is finite.
    open_run: the loop ended on `guard.rollback_after` failures in a row.
    open_run_bad_batches: triage judged that run bad batches (not the state).
    frequent_bad_batches: bad batches came faster than `recovery.bad_batch_rate`.
    last_kind: the kind of the loop's last divergence.
  """

  params_finite: bool
  open_run: bool
  open_run_bad_batches: bool
  frequent_bad_batches: bool
  last_kind: str


@dataclasses.dataclass(frozen=True)
class Decision:
  """`rollback` True: roll back for `kind`, because of `cause` (`finding`:
  what the health check found, for cause not_learning)."""

  rollback: bool
  kind: str | None = None
  cause: str = "healthy"
  finding: object = None


CARRY_ON = Decision(rollback=False)


def decide(e: Evidence, *, unhealthy: Callable[[], object | None]) -> Decision:
  """The action the evidence calls for, in priority order.

  `unhealthy` (the stall and dead-unit checks, which cost a probe) is asked
  only when nothing else calls for a rollback; it returns a finding with a
  `kind`, or None.
  """
  if not e.params_finite:
    return Decision(True, "nonfinite_params", "nonfinite_params")
  if e.open_run and not e.open_run_bad_batches:
    return Decision(True, e.last_kind, "diverging_state")
  if e.frequent_bad_batches:
    return Decision(True, e.last_kind, "frequent_bad_batches")
  finding = unhealthy()
  if finding is not None:
    return Decision(True, finding.kind, "not_learning", finding)
  return CARRY_ON
