"""Step classes and incident kinds: their codes, names and one-line texts.

The compiled step reports a class and a kind per attempt as small integers
(the index into CLASSES and KINDS); the host turns them into the names that
incidents.jsonl, metrics.jsonl, the log and the report use.
"""

from __future__ import annotations

# What an attempted step was. Only GOOD touches the model and optimizer.
GOOD, OVERFLOW, DIVERGENCE, SKIPPED_BATCH = range(4)
CLASSES = ("good", "overflow", "divergence", "skipped_batch")

# Why a step was not (entirely) good. The index is the in-graph code; the
# last one is found by the host between loops, never inside the step.
KINDS = (
  "nonfinite_inputs",
  "nonfinite_loss",
  "nonfinite_grads",
  "loss_spike",
  "loss_scale_floor",
  "nonfinite_params",
)
NONFINITE_INPUTS, NONFINITE_LOSS, NONFINITE_GRADS, LOSS_SPIKE, LOSS_SCALE_FLOOR = range(5)
NONFINITE_PARAMS = 5
NO_KIND = -1

TEXT = {
  "nonfinite_inputs": "non-finite values in the input batch.",
  "nonfinite_loss": "the loss was not finite.",
  "nonfinite_grads": "the loss was finite but some gradients were not.",
  "loss_spike": "the loss jumped far above its running mean.",
  "loss_scale_floor": "float16 gradients overflowed with the loss scale at loss_scale.min_scale.",
  "nonfinite_params": "a model or optimizer variable became non-finite after an update.",
}


def text(kind: str) -> str:
  """The one-line explanation of an incident kind."""
  return TEXT.get(kind, "the step diverged.")
