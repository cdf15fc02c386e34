"""The precision remedy: a layer whose float16 output overflows computes in
float32 (`recovery.float32_fallback`).

Under `mixed_float16` a layer computes in float16, whose largest value is
65504. When its output overflows (raw inputs in the thousands into a Dense,
a hand-written exp or log-sum-exp), the step fails from any state at any
learning rate: rolling back and lowering the rate cannot help, and skipping
steps only collapses the loss scale. What does help is what Keras's guide
tells a user to do by hand: keep that layer in float32
(`dtype="float32"`). This module finds the layers and checks the remedy
before it is applied: on the offending batch, from the live state, it
switches the first leaf layer whose float16 output is non-finite (from
finite inputs) to float32 and replays the step eagerly, and again for the
next such layer, until the replay is finite. Only then are the switches
kept; otherwise every layer is put back and recovery goes on as before.
The compiled loop and the evaluation step are then traced again (their
graphs fixed the old dtypes); weights, optimizer state and step are
untouched (the failing steps were skipped), and the exported model keeps
the layers' float32 policy, so it computes what was trained.
"""

from __future__ import annotations

import dataclasses

from absl import logging

from safetrain.core import kinds
from safetrain.diagnosis import replay as replay_lib

KINDS = kinds.declare(
  kinds.Kind(
    "float16_overflow",
    "a layer's float16 output overflowed under mixed_float16 (it now computes in float32).",
    "#fb9a99",
    diverges=False,
  ),
)

# Layers switched at most per finding: a model whose float16 range fails
# everywhere wants `precision.policy=float32` (or mixed_bfloat16), not this.
MAX_LAYERS = 8


@dataclasses.dataclass(frozen=True)
class Fallback:
  """Layers switched to float32, and the replayed loss once they were."""

  layers: tuple[str, ...]
  loss: float


def _overflowing_float16_layer(rep: replay_lib.Replay):
  """The first leaf layer (in forward order) whose float16 output is not
  finite although its inputs are, or None."""
  for r in rep.layers:
    if r.is_model or not r.leaf or r.outputs.finite:
      continue
    if r.outputs.dtype == "float16" and r.inputs.finite:
      return r.layer
    return None  # the first bad output is not a float16 overflow
  return None


def try_float32(ctx: replay_lib.Context, batch) -> Fallback | None:
  """Switches the float16 layers that overflow on `batch` to float32, when
  the replay shows that makes the step finite; None (nothing changed)
  otherwise. Never raises."""
  if not ctx.fp16 or batch is None:
    return None
  switched = []  # (layer, its policy before)
  try:
    for _ in range(MAX_LAYERS):
      rep = replay_lib.replay(ctx, batch)
      if rep.finite:
        break
      layer = _overflowing_float16_layer(rep)
      if layer is None:
        break
      switched.append((layer, layer.dtype_policy))
      layer.dtype_policy = "float32"
    else:
      rep = replay_lib.replay(ctx, batch)
    if switched and rep.finite:
      return Fallback(tuple(layer.name for layer, _ in switched), float(rep.loss))
  except Exception as e:  # noqa: BLE001 - a remedy that cannot be checked is not applied
    logging.warning("the float32 fallback could not be checked: %s", e)
  for layer, policy in reversed(switched):
    layer.dtype_policy = policy
  return None


def describe(fallback: Fallback) -> str:
  names = ", ".join(fallback.layers)
  return (
    f"under mixed_float16 the output of {names} overflowed float16 (max 65504) on this batch; "
    f"computing {'it' if len(fallback.layers) == 1 else 'them'} in float32 makes the replay "
    f"of the step finite (loss {fallback.loss:.4g}), so {names} now "
    f"{'computes' if len(fallback.layers) == 1 else 'compute'} in float32 (recovery."
    "float32_fallback): no rollback, no learning-rate cut. To make it permanent, build "
    f'{"that layer" if len(fallback.layers) == 1 else "those layers"} with dtype="float32", '
    "or normalize the inputs that feed it."
  )


class Float32Fallback:
  """Applies `try_float32` for the run and records it.

  Args:
    ctx: the replay context (the live model, loss scale, compute_loss).
    incidents: the incident log.
    loss_scale: the dynamic loss scale, reset after a fallback (it was
      halved for an overflow no scale could fix).
    compiled: the run's compiled functions, retraced after a switch (their
      graphs fixed the old dtypes).
    lr_scale: recovery's learning-rate scale variable (recorded, unchanged).
  """

  def __init__(self, *, ctx, incidents, loss_scale, compiled, lr_scale):
    self.ctx = ctx
    self.incidents = incidents
    self.loss_scale = loss_scale
    self.compiled = compiled
    self.lr_scale = lr_scale

  def __call__(self, batch, *, step: int) -> bool:
    """True when layers were switched to float32 for `batch` (at `step`)."""
    found = try_float32(self.ctx, batch)
    if found is None:
      return False
    self.loss_scale.reset()
    self.compiled.retrace()
    lr = float(self.lr_scale.numpy())
    self.incidents.add(
      step=step,
      kind="float16_overflow",
      action="float32_layers",
      lr_scale_before=lr,
      lr_scale_after=lr,
      diagnosis=describe(found),
      cause=kinds.PRECISION,
      layers=list(found.layers),
    )
    return True
