"""Step classes, incident kinds, actions and causes: names, texts, colours.

The compiled step reports a class and a kind per attempt as small integers.
Classes are fixed here. Kinds are declared by the part that raises them (a
guard piece in `safetrain/step/`, a host check in `safetrain/recovery/`) with
`declare`, in one place each; their codes are derived from that declaration
(`step.registry`), never numbered by hand. The host turns codes back into the
names that incidents.jsonl, metrics.jsonl, the log and the report use.
"""

from __future__ import annotations

import dataclasses

# What an attempted step was. Only GOOD touches the model and optimizer.
GOOD, OVERFLOW, DIVERGENCE, SKIPPED_BATCH = range(4)
CLASSES = ("good", "overflow", "divergence", "skipped_batch")
NO_KIND = -1


@dataclasses.dataclass(frozen=True)
class Kind:
  """An incident kind, as the part that raises it declares it.

  Attributes:
    name: the `kind` of incidents.jsonl.
    text: the one-line explanation a record and the log give.
    colour: the report's colour for it.
    batch_bound: a step of this kind from a healthy state is a bad batch (the
      non-finite value comes from this batch: other batches from the same state
      train), so it is quarantined rather than rolled back.
    diverges: the kind is a divergence (its run of failures may call for
      recovery); False for inputs the guard handles by itself.
    before_update: the failing value is computed from the weights and the
      batch before any update (the forward or the backward pass), so on the
      run's first step, from the initial weights, no learning rate could
      have caused it or can avoid it (recovery stops at once).
  """

  name: str
  text: str
  colour: str
  batch_bound: bool = False
  diverges: bool = True
  before_update: bool = False


_DECLARED: dict[str, Kind] = {}


def declare(*declared: Kind) -> tuple[Kind, ...]:
  """Registers kinds (at import of the module that raises them)."""
  for kind in declared:
    if _DECLARED.get(kind.name, kind) != kind:
      raise ValueError(f"incident kind {kind.name!r} is declared twice, differently")
    _DECLARED[kind.name] = kind
  return declared


def declared() -> dict[str, Kind]:
  """Every kind declared so far, by name."""
  return dict(_DECLARED)


def text(kind: str) -> str:
  """The one-line explanation of an incident kind."""
  found = _DECLARED.get(kind)
  return found.text if found else "the step diverged."


# What was done about an incident.
ACTIONS = {
  "dropped_rows": "the rows with non-finite inputs were left out of the step",
  "skipped_batch": "the batch was skipped (its inputs were unusable)",
  "dropped_examples": "the examples whose loss was not finite were left out of the mean",
  "quarantined_batch": "a bad batch: skipped and recorded in quarantine.jsonl, no rollback",
  "skipped_step": "the step was skipped; the state is unchanged",
  "rollback": "a diverging state: rolled back to a healthy state with a lower learning rate",
  "abort": "recovery was spent: the run stopped with DivergenceError",
  "float32_layers": "the layers whose float16 output overflowed now compute in float32",
  "row_losses": "a scalar loss non-finite on some rows is now evaluated per row when it is "
  "not finite: those rows are dropped and the step trains on the rest",
}

# Why recovery chose its action (the incident's `cause`).
BAD_BATCH, DIVERGING_STATE = "bad_batch", "diverging_state"
# The run's first step fails before any update: the initial weights (or the
# model and loss as built) fail on the data, whatever the learning rate.
PRESENT_FROM_START = "present_from_start"
# A layer's float16 output overflows under mixed_float16: a precision
# failure, remedied by computing that layer in float32.
PRECISION = "precision"
# The run learned nothing (`not_learning`): its loss is no better than the
# trivial predictor's; the rate probe picks the scale it goes on with.
NOT_LEARNING = "not_learning"
