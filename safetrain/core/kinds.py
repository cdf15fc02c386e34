"""Step classes, incident kinds, actions and causes: codes, names, texts.

The compiled step reports a class and a kind per attempt as small integers
(the index into CLASSES and KINDS); the host turns them into the names that
incidents.jsonl, metrics.jsonl, the log and the report use.
"""

from __future__ import annotations

# What an attempted step was. Only GOOD touches the model and optimizer.
GOOD, OVERFLOW, DIVERGENCE, SKIPPED_BATCH = range(4)
CLASSES = ("good", "overflow", "divergence", "skipped_batch")

# Why a step was not (entirely) good. The index is the in-graph code; the
# first IN_GRAPH kinds are found inside the step, the others by the host
# between loops, never inside the step.
KINDS = (
  "nonfinite_inputs",
  "nonfinite_loss",
  "nonfinite_grads",
  "loss_spike",
  "loss_scale_floor",
  "loss_growth",
  "nonfinite_params",
  "stalled",
  "dead_units",
)
NONFINITE_INPUTS, NONFINITE_LOSS, NONFINITE_GRADS, LOSS_SPIKE, LOSS_SCALE_FLOOR = range(5)
LOSS_GROWTH = 5
IN_GRAPH = 6
NONFINITE_PARAMS, STALLED, DEAD_UNITS = 6, 7, 8
NO_KIND = -1

# Kinds whose step is a bad batch when the state is healthy: the non-finite
# value comes from this batch, and other batches from the same state train.
BATCH_BOUND = (NONFINITE_LOSS, NONFINITE_GRADS)

TEXT = {
  "nonfinite_inputs": "non-finite values in the input batch.",
  "nonfinite_loss": "the loss was not finite.",
  "nonfinite_grads": "the loss was finite but some gradients were not.",
  "loss_spike": "the loss jumped far above its running mean.",
  "loss_scale_floor": "float16 gradients overflowed with the loss scale at loss_scale.min_scale.",
  "loss_growth": "the loss grew by orders of magnitude above its best (a finite blow-up).",
  "nonfinite_params": "a model or optimizer variable became non-finite after an update.",
  "stalled": "the run stopped learning: the loss stays far above its best.",
  "dead_units": "ReLU units died: a layer outputs zero for every example.",
}

# What was done about an incident.
ACTIONS = {
  "dropped_rows": "the rows with non-finite inputs were left out of the step",
  "skipped_batch": "the batch was skipped (its inputs were unusable)",
  "dropped_examples": "the examples whose loss was not finite were left out of the mean",
  "quarantined_batch": "a bad batch: skipped and recorded in quarantine.jsonl, no rollback",
  "skipped_step": "the step was skipped; the state is unchanged",
  "rollback": "a diverging state: rolled back to a healthy state with a lower learning rate",
  "abort": "recovery was spent: the run stopped with DivergenceError",
}

# Why recovery chose its action (the incident's `cause`).
BAD_BATCH, DIVERGING_STATE = "bad_batch", "diverging_state"


def text(kind: str) -> str:
  """The one-line explanation of an incident kind."""
  return TEXT.get(kind, "the step diverged.")
