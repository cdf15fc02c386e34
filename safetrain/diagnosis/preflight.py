"""Preflight: a look at the first batch before step 1 (guard.preflight).

The checks catch, before any update, what would otherwise surface as a NaN
some steps later: non-finite or unnormalized input features, a non-finite
initial loss or gradient, and under mixed_float16 layer activations at or near
float16's largest value (65504) and an output layer whose softmax or sigmoid
computes in float16. Each finding is one sentence that names the feature or the
layer and says what to do. With guard.preflight=warn they are
logged and printed; with strict, any finding stops the run (exit code 2).
"""

from __future__ import annotations

import dataclasses
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from safetrain.core.errors import PreflightError
from safetrain.diagnosis import forensics
from safetrain.diagnosis import replay as replay_lib
from safetrain.step import guard


def audit(ctx: replay_lib.Context, batch, *, bad_inputs: str, fp16_margin: float) -> list[str]:
  """Returns findings (one sentence each) about `batch` and the initial model.

  Args:
    ctx: the built trainer's context (model, loss, loss scale...).
    batch: the first training batch, not distributed.
    bad_inputs: `guard.bad_inputs`, named in the advice about bad rows.
    fp16_margin: `guard.preflight_fp16_margin`.

  Returns:
    The findings; an empty list for a healthy set-up. Nothing is modified.
  """
  findings = []
  nonfinite, unscaled = replay_lib.input_problems(batch, ctx.max_abs_input)
  for where in nonfinite:
    findings.append(
      f"non-finite input in the first batch: {where}; guard.bad_inputs={bad_inputs} "
      "will handle such rows during training, but the data needs cleaning"
    )
  for where in unscaled:
    findings.append(
      f"normalize {where} (inputs above guard.preflight_max_abs_input="
      f"{replay_lib.fmt(ctx.max_abs_input)} make large activations and gradients; "
      "standardize to mean 0, std 1)"
    )
  clean = guard.finite_rows_only(batch)
  if clean is None:
    return findings
  # Under mixed_float16, gradients that overflow at the initial loss scale are
  # routine (the scale adapts); only gradients non-finite unscaled are news.
  rep = replay_lib.replay(ctx, clean, scale=1.0)
  if rep.error is not None:
    logging.warning("preflight: could not replay the first step eagerly: %s", rep.error)
    return findings
  culprit = forensics.forward_culprit(ctx, clean, rep, step=1)
  if rep.loss is not None and not np.isfinite(rep.loss):
    if culprit is None:
      culprit = forensics.loss_culprit(ctx, clean, rep)
    findings.append(f"the initial loss is {replay_lib.fmt(rep.loss)} on the first batch: {culprit}")
  elif culprit is not None:
    findings.append(f"a non-finite activation on the first batch: {culprit}")
  elif not rep.grads_finite:
    bad = [p for p, _, ok in rep.grads if not ok]
    findings.append(
      f"the initial gradients of {len(bad)} variables are non-finite on the first batch"
      + (" (in float16, even with loss scale 1)" if ctx.fp16 else "")
      + ": "
      + ", ".join(bad[:3])
      + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    )
  if ctx.fp16:
    findings += _fp16_output_findings(rep)
    findings += _fp16_findings(rep, fp16_margin)
  return findings


def _output_activation(layer) -> str | None:
  """The activation `layer` ends in when it is softmax or sigmoid, else None."""
  if isinstance(layer, keras.layers.Softmax):
    return "softmax"
  name = getattr(getattr(layer, "activation", None), "__name__", None)
  return name if name in ("softmax", "sigmoid") else None


def _fp16_output_findings(rep: replay_lib.Replay) -> list[str]:
  """Output layers that compute a softmax or sigmoid in float16.

  TensorFlow's mixed-precision guide keeps the model's final activation in
  float32: probabilities in float16 round coarsely, and the gradient of
  log(p) (about -1/p) overflows float16 once the model is confidently wrong.
  The output layers are the leaf layers whose output is the model's output.
  """
  model = next((r for r in reversed(rep.layers) if r.is_model), None)
  if model is None or model.output is None:
    return []
  outputs = [id(t) for t in tf.nest.flatten(model.output)]
  out, seen = [], set()
  for r in rep.layers:
    if r.is_model or not r.leaf or r.name in seen or r.outputs.dtype != "float16":
      continue
    if not any(id(t) in outputs for t in tf.nest.flatten(r.output)):
      continue
    activation = _output_activation(r.layer)
    if activation is None:
      continue
    seen.add(r.name)
    out.append(
      f"output layer {r.name} ({r.cls}) computes its {activation} in float16 under "
      "mixed_float16, where a cross-entropy's gradient through the rounded probabilities "
      "(-1/p) overflows once the model is confidently wrong and drives the loss scale to "
      "its floor; keep the output in float32, as TensorFlow's mixed-precision guide "
      f'advises: dtype="float32" on {r.name}, or {r.name} linear and '
      f'keras.layers.Activation("{activation}", dtype="float32") after it (the default '
      "compute_loss already recomputes it in float32 from its logits; a custom "
      "compute_loss and model.predict do not)"
    )
  return out


def _fp16_findings(rep: replay_lib.Replay, margin: float) -> list[str]:
  if not rep.instrumented:
    logging.info(
      "preflight: the model's layers could not be inspected one by one; "
      "the per-layer float16 range check is skipped"
    )
    return []
  out, seen = [], set()
  limit = margin * forensics.FLOAT16_MAX
  for r in rep.layers:
    if r.is_model or not r.leaf or r.outputs.dtype != "float16" or r.name in seen:
      continue
    if r.outputs.finite and r.outputs.max_abs >= limit:
      seen.add(r.name)
      out.append(
        f"layer {r.name} ({r.cls}) reaches max |activation| {replay_lib.fmt(r.outputs.max_abs)} "
        f"on the first batch, over {margin:.0%} of float16's max 65504 "
        "(guard.preflight_fp16_margin), and will overflow as the weights grow: "
        + forensics._FP16_ADVICE.format(name=r.name)
      )
  return out


def check(
  ctx: replay_lib.Context, batch, *, mode: str, bad_inputs: str, fp16_margin: float
) -> list[str]:
  """Runs `audit` as `guard.preflight` says: "off" does nothing, "warn" logs
  each finding (and prints it on a terminal), "strict" also raises
  PreflightError when there is any. Returns the findings."""
  if mode == "off":
    return []
  findings = audit(ctx, batch, bad_inputs=bad_inputs, fp16_margin=fp16_margin)
  for finding in findings:
    logging.warning("preflight: %s", finding)
    if sys.stderr.isatty():
      print(f"safetrain preflight: {finding}", file=sys.stderr)
  if findings and mode == "strict":
    raise PreflightError(
      "preflight found problems (guard.preflight=strict): " + "; ".join(findings)
    )
  return findings


@dataclasses.dataclass(frozen=True)
class Preflight:
  """The audit before step 1 as the config sets it (`guard.preflight`,
  `guard.bad_inputs`, `guard.preflight_fp16_margin`)."""

  mode: str
  bad_inputs: str
  fp16_margin: float

  @classmethod
  def from_config(cls, c) -> Preflight:
    g = c.guard
    return cls(mode=g.preflight, bad_inputs=g.bad_inputs, fp16_margin=g.preflight_fp16_margin)

  def __call__(self, ctx: replay_lib.Context, batch) -> list[str]:
    """`check` on `batch`: the findings, logged (PreflightError under strict)."""
    return check(
      ctx, batch, mode=self.mode, bad_inputs=self.bad_inputs, fp16_margin=self.fp16_margin
    )
