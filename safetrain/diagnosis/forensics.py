"""NaN forensics: what made a step diverge, in words a user understands.

When a divergence leads to a rollback or an abort, the trainer still holds the
state the offending step started from (a skipped step changes nothing) and a
copy of the offending batch. `diagnose` replays that step eagerly on that batch
with every Keras layer of the model instrumented, and names the first place a
non-finite value appears: an input feature, a layer (with the float16 range
when mixed precision overflowed), the loss function, or the gradients of
particular variables. The replay never changes a variable: non-trainable state
(BatchNorm statistics, dropout RNG) is put back afterwards.

The replay itself and the formatting helpers live in `safetrain.replay`,
shared with `safetrain.preflight`; both see the trainer through a small
`replay.Context`.
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf
from absl import logging

from safetrain.core import kinds
from safetrain.diagnosis.replay import (
  LayerRecord,
  Replay,
  fmt,
  input_problems,
  replay,
  stats,
  var_path,
)

FLOAT16_MAX = 65504.0


_FP16_ADVICE = (
  "normalize the inputs, use precision.policy=mixed_bfloat16, or keep {name} in "
  'float32 (dtype="float32" on that layer)'
)


def first_bad_op(ctx, batch, *, gradients: bool = False) -> str | None:
  """Where the first NaN/Inf is produced, e.g. "a Log op (-Inf) in the loss
  computation", found with tf.debugging.enable_check_numerics on a replay."""
  rep = replay(ctx, batch, gradients=gradients, check_numerics=True)
  if rep.error is None:
    return None
  m = re.search(r'op "([^"]+)"', rep.error)
  if not m:
    return None
  op = m.group(1)
  kinds = re.findall(r"# of (\+Inf|-Inf|NaN) elements: (\d+)", rep.error)
  what = "/".join(k for k, _ in kinds) or "NaN/Inf"
  model_done = any(r.is_model for r in rep.layers)
  if rep.error_layers:
    inner = rep.error_layers[-1]
    own = inner == ctx.model.name or any(r.name == inner and not r.leaf for r in rep.layers)
    where = f"in {inner}'s own call, between its layers" if own else f"inside layer {inner}"
  elif rep.loss is None and model_done:
    where = "in the loss computation, after the model"
  elif rep.loss is None:
    where = "in compute_loss, before the model"
  else:
    where = "in the backward pass"
  article = "an" if op[:1].upper() in "AEIOU" else "a"
  return f"{article} {op} op ({what}) {where}"


def _float32_max(record: LayerRecord) -> float | None:
  """The layer's output magnitude recomputed in float32 (for a float16 layer
  that overflowed), from a float32 copy of the layer on the same inputs."""
  layer = record.layer
  try:
    config = layer.get_config()
    config["dtype"] = "float32"
    clone = type(layer).from_config(config)

    def cast(t):
      if hasattr(t, "dtype") and tf.as_dtype(t.dtype).is_floating:
        return tf.cast(t, tf.float32)
      return t

    args = tf.nest.map_structure(cast, record.args)
    kwargs = {k: v for k, v in record.kwargs.items() if k != "training"}
    kwargs = tf.nest.map_structure(cast, kwargs)
    clone(*args, **kwargs)
    clone.set_weights([w.numpy() for w in layer.weights])
    s = stats(clone(*args, **kwargs))
  except Exception as e:  # noqa: BLE001 - an unusual layer: say less, not fail
    logging.info("forensics: no float32 recompute of %s: %s", record.name, e)
    return None
  return s.max_abs if s.finite else float("inf")


def _weights_max(layer) -> float:
  return stats([np.asarray(w.numpy()) for w in layer.weights]).max_abs


def _earlier(rep: Replay, index: int) -> str:
  """Max |activation| of the finite layers before record `index` (the last 3)."""
  prior = [r for r in rep.layers[:index] if r.outputs.finite and not r.is_model and r.leaf]
  if not prior:
    return ""
  parts = [f"{r.name} {fmt(r.outputs.max_abs)}" for r in prior[-3:]]
  return "; max |activation| of the layers before it: " + ", ".join(parts)


def forward_culprit(ctx, batch, rep: Replay, step: int) -> str | None:
  """Names the first layer whose output went non-finite in `rep`, or returns
  None when the forward pass was finite throughout."""
  index = next((i for i, r in enumerate(rep.layers) if not r.outputs.finite), None)
  if index is None:
    return None
  r = rep.layers[index]
  if not r.inputs.finite:
    if index == 0 or (r.is_model and all(x.is_model for x in rep.layers[:index])):
      return (
        f"the input to {r.name} was already non-finite ({r.inputs.bad_text()}) "
        "before any layer ran: it comes from the batch or from compute_loss"
      )
    op = first_bad_op(ctx, batch)
    return (
      f"the first non-finite value ({r.inputs.bad_text()} reaching layer {r.name}) comes from "
      + (op if op else "an op outside any layer")
      + _earlier(rep, index)
    )
  if r.outputs.dtype == "float16" and (r.outputs.posinf or r.outputs.neginf):
    v32 = _float32_max(r)
    if v32 is not None and np.isfinite(v32):
      size = f"max |activation| {fmt(v32)} (float16 holds at most 65504)"
    elif v32 is not None:
      size = "its output is Inf even in float32"
    else:
      size = "float16 holds at most 65504"
    return (
      f"{r.name} output overflowed float16 at step {step}: {size}"
      f"{_earlier(rep, index)}. Fix: " + _FP16_ADVICE.format(name=r.name)
    )
  op = first_bad_op(ctx, batch)
  if r.is_model or not r.leaf:
    return (
      f"the first non-finite value ({r.outputs.bad_text()}) appears in {r.name}'s own call "
      f"({r.cls}), whose layers were all finite" + (f": {op}" if op else "") + _earlier(rep, index)
    )
  text = (
    f"layer {r.name} ({r.cls}) is the first whose output is non-finite at step {step} "
    f"({r.outputs.bad_text()}), from finite inputs (max |input| {fmt(r.inputs.max_abs)}); "
    f"its largest weight is {fmt(_weights_max(r.layer))}"
  )
  if op:
    text += f"; the first bad op is {op}"
  return text + _earlier(rep, index)


# Activations above this are out of any sane range: their squares (1e30)
# overflow float32 once a loss sums a batch of them.
_HUGE_ACTIVATION = 1e15


def loss_culprit(ctx, batch, rep: Replay) -> str:
  """Why the loss is non-finite when every layer output is finite."""
  op = first_bad_op(ctx, batch)
  op_text = f" ({op})" if op else ""
  layers = [r for r in rep.layers if not r.is_model and r.leaf]
  top = max(layers, key=lambda r: r.outputs.max_abs) if layers else None
  if top is not None and top.outputs.max_abs > _HUGE_ACTIVATION:
    return (
      f"every layer output is finite, but {top.name} reaches |activation| "
      f"{fmt(top.outputs.max_abs)} (its largest weight is {fmt(_weights_max(top.layer))}), so "
      f"large that the loss overflows to {fmt(rep.loss)}{op_text}: the weights have grown "
      "out of range; lower the learning rate, clip gradients, or normalize the inputs"
    )
  where = (
    f"every layer output is finite (largest |activation| {fmt(top.outputs.max_abs)} in {top.name})"
    if top is not None
    else "the model output is finite"
  )
  return (
    f"{where}, but the loss is {fmt(rep.loss)}: the loss function is the culprit{op_text}. "
    "Typical causes: log(0) or log(1 - p) at p = 1, division by zero; compute the loss "
    "from logits (from_logits=True) or clip probabilities into [eps, 1 - eps]"
  )


def _top_grads(rep: Replay, k: int = 3) -> str:
  finite = sorted((g for g in rep.grads if g[2]), key=lambda g: -g[1])[:k]
  return ", ".join(f"{p} {fmt(n)}" for p, n, _ in finite)


def _bad_grads(rep: Replay) -> list[str]:
  return [p for p, _, ok in rep.grads if not ok]


# ---------------------------------------------------------------- diagnose


def diagnose(ctx, *, kind: str, batch, step: int) -> str:
  """Returns a diagnosis for a divergence incident of `kind` at `step`.

  `batch` is the offending batch (or None when it was not kept) and the
  model holds the pre-step state, since skipped steps change
  nothing. Never raises: on any failure it falls back to a generic sentence.
  """
  try:
    return _diagnose(ctx, kind=kind, batch=batch, step=step)
  except Exception as e:  # noqa: BLE001 - forensics must not hide the incident
    logging.warning("forensics failed: %s", e)
    return kinds.text(kind)


def reproduces(ctx, batch) -> bool:
  """Whether the eager replay of `batch` from the live state fails as the
  step did: a non-finite layer output, loss or gradient. The evidence that a
  failure belongs to this state and this batch, not to an injected or
  non-deterministic fault. False when the batch was not kept or the replay
  could not run: unknown is never taken for evidence. Never raises."""
  if batch is None:
    return False
  try:
    rep = replay(ctx, batch)
  except Exception as e:  # noqa: BLE001 - a failed replay is no evidence
    logging.warning("forensics replay failed: %s", e)
    return False
  return rep.failed


def _diagnose(ctx, *, kind: str, batch, step: int) -> str:
  base = kinds.text(kind)
  if kind == "nonfinite_params":
    return _diagnose_params(ctx, step)
  if batch is None:
    return (
      f"{base} The offending batch was not kept (it is kept only on a single "
      "replica), so the step could not be replayed."
    )
  nonfinite, unscaled = input_problems(batch, ctx.max_abs_input)
  rep = replay(ctx, batch)
  notes = []
  if nonfinite:
    notes.append("non-finite input features: " + "; ".join(nonfinite))
  if unscaled:
    notes.append("inputs are not normalized (" + "; ".join(unscaled) + ")")
  tail = (" Also: " + "; ".join(notes) + ".") if notes else ""
  if rep.error is not None:
    return f"{base} Replaying the step eagerly failed ({rep.error.splitlines()[0][:200]}).{tail}"
  culprit = forward_culprit(ctx, batch, rep, step)
  prefix = f"Step {step} ({kind}), replayed on the offending batch: "
  if culprit is not None:
    return prefix + culprit + "." + tail
  if rep.loss is not None and not np.isfinite(rep.loss):
    return prefix + loss_culprit(ctx, batch, rep) + "." + tail
  bad = _bad_grads(rep)
  if bad:
    names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    scale = (
      f" with the loss scale at {fmt(rep.scale)} (float16 gradients overflow above 65504)"
      if ctx.fp16
      else ""
    )
    op = first_bad_op(ctx, batch, gradients=True) if not ctx.fp16 else None
    top = _top_grads(rep)
    return (
      prefix + f"the forward pass and the loss ({fmt(rep.loss)}) are finite, but the gradients "
      f"of {len(bad)} variables are not{scale}: {names}"
      + (f"; the first bad op is {op}" if op else "")
      + (f"; the largest finite gradient norms: {top}" if top else "")
      + "."
      + tail
    )
  top = _top_grads(rep)
  grads = f"; the largest gradient norms: {top}" if top else ""
  if kind == "loss_spike":
    mean = float(ctx.spike.mean.numpy())
    ratio = rep.loss / mean if mean > 0 else float("inf")
    return (
      prefix + f"the loss is {fmt(rep.loss)}, {fmt(ratio)}x its running mean {fmt(mean)}"
      f"{grads}. A bad batch (outliers, wrong labels) or a learning rate on the edge of "
      "stability." + tail
    )
  if kind == "loss_growth" and ctx.spike.growth_factor > 0:
    best = float(ctx.spike.best.numpy())
    ratio = rep.loss / best if best > 0 else float("inf")
    if ratio > ctx.spike.growth_factor:  # else the replay does not show it: said below
      return (
        prefix + f"the loss is {fmt(rep.loss)}, finite but {fmt(ratio)}x the best running "
        f"mean {fmt(best)}{grads}: the weights are blowing up (a learning rate too high for "
        "this model and data, or unscaled inputs), caught before anything overflowed." + tail
      )
  why = (
    "injected by config.drill, or non-deterministic"
    if ctx.drill_active
    else "non-deterministic, or the state that produced it was not this one"
  )
  return (
    prefix + f"the replay of this batch is finite (loss {fmt(rep.loss)}{grads}): the fault "
    f"did not reproduce ({why})." + tail
  )


def _diagnose_params(ctx, step: int) -> str:
  bad = [
    var_path(v)
    for v in list(ctx.model.variables) + list(ctx.optimizer.variables)
    if tf.as_dtype(v.dtype).is_floating and not stats(np.asarray(v.numpy())).finite
  ]
  if not bad:
    return kinds.text("nonfinite_params")
  names = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
  return (
    f"After the update of step {step}, these variables are non-finite: {names}. The "
    "gradients were finite, so the update itself overflowed: lower "
    "optimizer.learning_rate, tighten clip.global_norm, or check the optimizer's epsilon."
  )


class Stash:
  """Variables that keep the last divergent batch, for the replay.

  The compiled step assigns the batch of a divergent attempt to them (one
  replica only: under several, each holds a shard and none the batch).
  """

  def __init__(self, element_spec):
    specs = tf.nest.flatten(element_spec)
    self.element_spec = element_spec
    self.variables = [
      None
      if s.dtype == tf.string
      else tf.Variable(
        tf.zeros([0] * len(s.shape), s.dtype),
        shape=tf.TensorShape([None] * len(s.shape)),
        trainable=False,
        name=f"stash_{i}",
      )
      for i, s in enumerate(specs)
    ]

  def batch(self):
    """The stashed batch, or None when there is none."""
    flat = [v.value() if v is not None else None for v in self.variables]
    if any(t is None for t in flat) or int(tf.shape(flat[0])[0]) == 0:
      return None
    return tf.nest.pack_sequence_as(self.element_spec, flat)


class Examiner:
  """Forensics on the stashed offending batch, as the host asks for it after
  a loop (the response, a rollback).

  Args:
    ctx: the replay context.
    stash: the stashed batch's variables, or None (several replicas).
  """

  def __init__(self, ctx, stash: Stash | None):
    self.ctx = ctx
    self.stash = stash

  def batch(self):
    """The last divergent batch of the loop, or None when none was kept."""
    return self.stash.batch() if self.stash is not None else None

  def diagnose(self, kind: str, step: int) -> str:
    """The diagnosis of a `kind` incident at `step` (never raises): the
    stashed batch is replayed, except for non-finite variables."""
    batch = self.batch() if kind != "nonfinite_params" else None
    return diagnose(self.ctx, kind=kind, batch=batch, step=step)

  def reproduces(self) -> bool:
    """Whether the stashed batch fails again from the live state."""
    return reproduces(self.ctx, self.batch())
