"""The recovery policy as a table: evidence in, decision out."""

import pytest

from safetrain.recovery import policy

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
    return health_kind

  d = policy.decide(evidence, unhealthy=unhealthy)
  assert (d.rollback, d.kind, d.cause) == (rollback, kind, cause)
  # The health probe costs a forward pass: asked only when nothing else decided.
  assert bool(calls) == asked
