"""The recovery policy as a table: evidence in, decision out."""

import pytest

from safetrain.recovery import health, policy, rollback

E = policy.Evidence
TABLE = [
  # (case, evidence, health check's kind) -> (rollback, kind, cause, health asked)
  ("healthy", E(True, False, False, False, "nonfinite_loss"), None, (False, None, "healthy", True)),
  (
    "params first",
    E(False, True, False, True, "loss_spike"),
    "stalled",
    (True, "nonfinite_params", "nonfinite_params", False),
  ),
  (
    "diverging state",
    E(True, True, False, False, "loss_spike"),
    None,
    (True, "loss_spike", "diverging_state", False),
  ),
  (
    "bad-batch run",
    E(True, True, True, False, "nonfinite_loss"),
    None,
    (False, None, "healthy", True),
  ),
  (
    "frequent bad batches",
    E(True, False, False, True, "nonfinite_grads"),
    None,
    (True, "nonfinite_grads", "frequent_bad_batches", False),
  ),
  (
    "stalled",
    E(True, False, False, False, "nonfinite_loss"),
    "stalled",
    (True, "stalled", "not_learning", True),
  ),
  (
    "dead units",
    E(True, True, True, False, "nonfinite_loss"),
    "dead_units",
    (True, "dead_units", "not_learning", True),
  ),
]


@pytest.mark.parametrize("case", TABLE, ids=[t[0] for t in TABLE])
def test_each_cause_gets_its_action(case):
  _, evidence, health_kind, (rollback, kind, cause, asked) = case
  calls = []

  def unhealthy():
    calls.append(1)
    return None if health_kind is None else health.Finding(health_kind, "found")

  d = policy.decide(evidence, unhealthy=unhealthy)
  assert (d.rollback, d.kind, d.cause) == (rollback, kind, cause)
  assert (d.finding is not None) == (cause == "not_learning")
  # The health probe costs a forward pass: asked only when nothing else decided.
  assert bool(calls) == asked


def _ckpt(step):
  return rollback.Target(step, path=f"/w/checkpoints/ckpt-{step}")


TARGETS = [
  # (case, checkpoints, snapshots (step, slot), last restored) -> (step, in memory)
  ("none", [], [], -1, None),
  ("newest checkpoint", [10, 20], [], -1, (20, False)),
  ("a snapshot at the newest checkpoint's step is preferred", [10, 20], [(20, 3)], -1, (20, True)),
  ("a snapshot newer than every checkpoint", [10, 20], [(25, 1)], -1, (25, True)),
  ("a snapshot between checkpoints is left out", [10, 20], [(15, 0)], 20, (10, False)),
  ("the same state failed again: escalate to disk", [10, 20], [(20, 3)], 20, (10, False)),
  ("the oldest is all there is", [10], [], 10, (10, False)),
]


@pytest.mark.parametrize("case", TARGETS, ids=[t[0] for t in TARGETS])
def test_the_rollback_target(case):
  _, ckpts, snaps, last, want = case
  found = rollback.rollback_target(
    rollback.candidates([(s, _ckpt(s).path) for s in ckpts], snaps), last
  )
  assert (None if found is None else (found.step, found.in_memory)) == want
  if found is not None:
    assert found.name == (
      f"memory snapshot of step {found.step}" if found.in_memory else f"ckpt-{found.step}"
    )
