"""NaN forensics: what made a step diverge, in words a user understands.

When a divergence leads to a rollback or an abort, the trainer still holds the
state the offending step started from (a skipped step changes nothing) and a
copy of the offending batch. `diagnose` replays that step eagerly on that batch
with every Keras layer of the model instrumented, and names the first place a
non-finite value appears: an input feature, a layer (with the float16 range
when mixed precision overflowed), the loss function, or the gradients of
particular variables. The replay never changes a variable: non-trainable state
(BatchNorm statistics, dropout RNG) is put back afterwards.

`replay` and the formatting helpers are shared with `safetrain.preflight`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from safetrain import guard, kinds

FLOAT16_MAX = 65504.0


_FP16_ADVICE = (
  "normalize the inputs, use precision.policy=mixed_bfloat16, or keep {name} in "
  'float32 (dtype="float32" on that layer)'
)


# ------------------------------------------------------------------ stats


@dataclasses.dataclass
class Stats:
  """What a tensor (or a nest of them) holds, non-finite values apart."""

  max_abs: float = 0.0  # over the finite entries
  nan: int = 0
  posinf: int = 0
  neginf: int = 0
  dtype: str = ""

  @property
  def finite(self) -> bool:
    return not (self.nan or self.posinf or self.neginf)

  def bad_text(self) -> str:
    parts = [
      f"{n} {name}"
      for n, name in ((self.nan, "NaN"), (self.posinf, "+Inf"), (self.neginf, "-Inf"))
      if n
    ]
    return ", ".join(parts)


def stats(structure) -> Stats:
  """Stats over every floating-point tensor in `structure`."""
  s = Stats()
  for t in tf.nest.flatten(structure):
    if not (isinstance(t, (tf.Tensor, tf.Variable, np.ndarray)) or hasattr(t, "dtype")):
      continue
    try:
      t = tf.convert_to_tensor(t)
    except (TypeError, ValueError):
      continue
    if not t.dtype.is_floating:
      continue
    s.dtype = s.dtype or t.dtype.name
    a = np.asarray(t.numpy(), dtype=np.float64) if t.dtype != tf.bfloat16 else None
    if a is None:
      a = tf.cast(t, tf.float32).numpy().astype(np.float64)
    finite = np.isfinite(a)
    if finite.any():
      s.max_abs = max(s.max_abs, float(np.max(np.abs(a[finite]))))
    s.nan += int(np.isnan(a).sum())
    s.posinf += int(np.isposinf(a).sum())
    s.neginf += int(np.isneginf(a).sum())
  return s


def fmt(x: float) -> str:
  """A short number: 7.1e4, 0.003, 1234."""
  if x is None:
    return "?"
  x = float(x)
  if not np.isfinite(x):
    return str(x).replace("inf", "Inf").replace("nan", "NaN")
  if x == 0 or 1e-3 <= abs(x) < 1e4:
    return f"{x:.4g}"
  text = f"{x:.2g}"
  return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", text)


def input_problems(batch, max_abs: float | None = None) -> tuple[list[str], list[str]]:
  """Non-finite features and (if max_abs is given) features out of scale.

  Returns:
    (nonfinite, unscaled): phrases like "x[:, 0] (3 of 32 rows)" and
    "x[:, 0]: range 1000..4000".
  """
  nonfinite, unscaled = [], []
  for name, t in guard.float_leaves(batch):
    a = tf.cast(t, tf.float32).numpy() if t.dtype == tf.bfloat16 else np.asarray(t.numpy())
    a = a.astype(np.float64)
    rows = a.shape[0] if a.ndim else 1
    flat = a.reshape(rows, -1) if a.ndim else a.reshape(1, 1)
    bad = ~np.isfinite(flat)
    if bad.any():
      n_rows = int(bad.any(axis=1).sum())
      if a.ndim == 2:
        cols = np.flatnonzero(bad.any(axis=0))
        where = ", ".join(f"{name}[:, {c}]" for c in cols[:3])
        if len(cols) > 3:
          where += f" and {len(cols) - 3} more columns"
      else:
        where = name
      kinds = []
      if np.isnan(flat).any():
        kinds.append("NaN")
      if np.isinf(flat).any():
        kinds.append("Inf")
      nonfinite.append(f"{where} ({'/'.join(kinds)} in {n_rows} of {rows} rows)")
    if max_abs is None:
      continue
    if a.ndim == 2:
      columns = [(f"{name}[:, {c}]", a[:, c]) for c in range(a.shape[1])]
    else:
      columns = [(name, a)]
    over = []
    for where, col in columns:
      col = col[np.isfinite(col)]
      if col.size and float(np.max(np.abs(col))) > max_abs:
        over.append(f"{where}: range {fmt(col.min())}..{fmt(col.max())}")
    if over:
      more = len(over) - 3
      unscaled.append(
        ", ".join(over[:3]) + (f" and {more} more column{'s' * (more > 1)}" if more > 0 else "")
      )
  return nonfinite, unscaled


# ------------------------------------------------------------------ replay


@dataclasses.dataclass
class LayerRecord:
  """One layer call seen during a replay, in completion order."""

  layer: Any
  name: str
  cls: str
  inputs: Stats
  outputs: Stats
  args: tuple
  kwargs: dict
  output: Any
  is_model: bool
  leaf: bool


@dataclasses.dataclass
class Replay:
  """An eager re-run of one training step, with what each layer produced."""

  loss: float | None = None
  layers: list = dataclasses.field(default_factory=list)
  # (variable path, gradient norm, finite) for every trainable variable.
  grads: list = dataclasses.field(default_factory=list)
  error: str | None = None
  error_layers: list = dataclasses.field(default_factory=list)
  instrumented: bool = False
  scale: float = 1.0

  @property
  def grads_finite(self) -> bool:
    return all(ok for _, _, ok in self.grads)


def _layers_of(model) -> list:
  try:
    layers = list(model._flatten_layers(include_self=True, recursive=True))
  except (AttributeError, TypeError):
    layers = [model, *getattr(model, "layers", [])]
  return [layer for layer in layers if not isinstance(layer, keras.layers.InputLayer)]


class _Recorder:
  """Wraps each layer's `call` on the instance, for the duration of a replay,
  to see what each layer was given and produced. Works for Sequential,
  functional and subclassed models alike, since all call their sublayers."""

  def __init__(self, model, *, keep_tensors: bool):
    self.model = model
    self.layers = _layers_of(model)
    self.keep_tensors = keep_tensors
    self.records: list[LayerRecord] = []
    self.stack: list = []
    self.error_layers: list | None = None
    self._saved: dict[int, Any] = {}

  def _wrap(self, layer, original):
    is_model = layer is self.model
    leaf = not any(sub is not layer for sub in _layers_of(layer)) if not is_model else False

    def call(*args, **kwargs):
      self.stack.append(layer)
      try:
        out = original(*args, **kwargs)
      except Exception:
        if self.error_layers is None:
          self.error_layers = [getattr(x, "name", "?") for x in self.stack]
        raise
      finally:
        self.stack.pop()
      inputs = args[0] if args else next(iter(kwargs.values()), None)
      self.records.append(
        LayerRecord(
          layer=layer,
          name=getattr(layer, "name", type(layer).__name__),
          cls=type(layer).__name__,
          inputs=stats(inputs),
          outputs=stats(out),
          args=args if self.keep_tensors else (),
          kwargs=kwargs if self.keep_tensors else {},
          output=out if self.keep_tensors else None,
          is_model=is_model,
          leaf=leaf,
        )
      )
      return out

    return call

  def __enter__(self):
    for layer in self.layers:
      if "call" in vars(layer):
        self._saved[id(layer)] = vars(layer)["call"]
      # object.__setattr__: Keras's own __setattr__ would try to track it.
      object.__setattr__(layer, "call", self._wrap(layer, layer.call))
    return self

  def __exit__(self, *exc):
    for layer in self.layers:
      if id(layer) in self._saved:
        object.__setattr__(layer, "call", self._saved[id(layer)])
      elif "call" in vars(layer):
        object.__delattr__(layer, "call")
    return False


class _KeepState:
  """Puts back the model's non-trainable variables (BatchNorm statistics,
  dropout RNG state) after a replay in training mode."""

  def __init__(self, model):
    self.variables = list(model.non_trainable_variables)

  def __enter__(self):
    self.values = [tf.identity(v) for v in self.variables]
    return self

  def __exit__(self, *exc):
    for var, value in zip(self.variables, self.values):
      var.assign(value)
    return False


def replay(
  trainer,
  batch,
  *,
  gradients: bool = True,
  check_numerics: bool = False,
  scale: float | None = None,
) -> Replay:
  """Re-runs `trainer.compute_loss` on `batch` eagerly, layer by layer.

  Args:
    trainer: a built Trainer; its model is left exactly as it was.
    batch: an undistributed batch.
    gradients: also compute the gradients of the trainable variables, of the
      loss times the loss scale under mixed_float16 and unscaled after, as
      the compiled step does.
    check_numerics: stop at the first op that produces a NaN or Inf; the
      error (naming the op) lands in `Replay.error`.
    scale: the loss scale to use under mixed_float16 instead of the live one.
  """
  model = trainer.model
  rep = Replay(instrumented=True)
  fp16 = bool(trainer._fp16)
  if fp16:
    rep.scale = float(trainer._loss_scale.scale.numpy()) if scale is None else float(scale)
  variables = list(model.trainable_variables)
  recorder = _Recorder(model, keep_tensors=not check_numerics)
  if check_numerics:
    tf.debugging.enable_check_numerics()
  try:
    with _KeepState(model), recorder, tf.GradientTape() as tape:
      loss, _ = trainer._call_compute_loss(model, batch, training=True)
      scaled = loss * rep.scale if fp16 else loss
    rep.loss = float(loss.numpy())
    if gradients and variables:
      grads = tape.gradient(scaled, variables)
      for var, g in zip(variables, grads):
        if g is None:
          continue
        if isinstance(g, tf.IndexedSlices):
          g = tf.convert_to_tensor(g)
        g = tf.cast(g, tf.float32) / rep.scale
        ok = bool(tf.reduce_all(tf.math.is_finite(g)).numpy())
        norm = float(tf.norm(tf.where(tf.math.is_finite(g), g, 0.0)).numpy())
        rep.grads.append((_var_path(var), norm, ok))
  except Exception as e:  # noqa: BLE001 - a replay failure is reported, not raised
    rep.error = str(e)
    rep.error_layers = recorder.error_layers or []
  finally:
    if check_numerics:
      tf.debugging.disable_check_numerics()
  rep.layers = recorder.records
  rep.instrumented = any(not r.is_model for r in rep.layers)
  return rep


def _var_path(v) -> str:
  return getattr(v, "path", None) or v.name


def first_bad_op(trainer, batch, *, gradients: bool = False) -> str | None:
  """Where the first NaN/Inf is produced, e.g. "a Log op (-Inf) in the loss
  computation", found with tf.debugging.enable_check_numerics on a replay."""
  rep = replay(trainer, batch, gradients=gradients, check_numerics=True)
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
    own = inner == trainer.model.name or any(r.name == inner and not r.leaf for r in rep.layers)
    where = f"in {inner}'s own call, between its layers" if own else f"inside layer {inner}"
  elif rep.loss is None and model_done:
    where = "in the loss computation, after the model"
  elif rep.loss is None:
    where = "in compute_loss, before the model"
  else:
    where = "in the backward pass"
  article = "an" if op[:1].upper() in "AEIOU" else "a"
  return f"{article} {op} op ({what}) {where}"


def _forward_finite(rep: Replay) -> bool:
  return all(r.outputs.finite for r in rep.layers)


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


def forward_culprit(trainer, batch, rep: Replay, step: int) -> str | None:
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
    op = first_bad_op(trainer, batch)
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
  op = first_bad_op(trainer, batch)
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


def loss_culprit(trainer, batch, rep: Replay) -> str:
  """Why the loss is non-finite when every layer output is finite."""
  op = first_bad_op(trainer, batch)
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


def diagnose(trainer, *, kind: str, batch, step: int) -> str:
  """Returns a diagnosis for a divergence incident of `kind` at `step`.

  `batch` is the offending batch (or None when it was not kept) and the
  trainer's model holds the pre-step state, since skipped steps change
  nothing. Never raises: on any failure it falls back to a generic sentence.
  """
  try:
    return _diagnose(trainer, kind=kind, batch=batch, step=step)
  except Exception as e:  # noqa: BLE001 - forensics must not hide the incident
    logging.warning("forensics failed: %s", e)
    return kinds.text(kind)


def _diagnose(trainer, *, kind: str, batch, step: int) -> str:
  base = kinds.text(kind)
  if kind == "nonfinite_params":
    return _diagnose_params(trainer, step)
  if batch is None:
    return (
      f"{base} The offending batch was not kept (it is kept only on a single "
      "replica), so the step could not be replayed."
    )
  nonfinite, unscaled = input_problems(batch, trainer.config.guard.preflight_max_abs_input)
  rep = replay(trainer, batch)
  notes = []
  if nonfinite:
    notes.append("non-finite input features: " + "; ".join(nonfinite))
  if unscaled:
    notes.append("inputs are not normalized (" + "; ".join(unscaled) + ")")
  tail = (" Also: " + "; ".join(notes) + ".") if notes else ""
  if rep.error is not None:
    return f"{base} Replaying the step eagerly failed ({rep.error.splitlines()[0][:200]}).{tail}"
  culprit = forward_culprit(trainer, batch, rep, step)
  prefix = f"Step {step} ({kind}), replayed on the offending batch: "
  if culprit is not None:
    return prefix + culprit + "." + tail
  if rep.loss is not None and not np.isfinite(rep.loss):
    return prefix + loss_culprit(trainer, batch, rep) + "." + tail
  bad = _bad_grads(rep)
  if bad:
    names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    scale = (
      f" with the loss scale at {fmt(rep.scale)} (float16 gradients overflow above 65504)"
      if trainer._fp16
      else ""
    )
    op = first_bad_op(trainer, batch, gradients=True) if not trainer._fp16 else None
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
    mean = float(trainer._spike.mean.numpy())
    ratio = rep.loss / mean if mean > 0 else float("inf")
    return (
      prefix + f"the loss is {fmt(rep.loss)}, {fmt(ratio)}x its running mean {fmt(mean)}"
      f"{grads}. A bad batch (outliers, wrong labels) or a learning rate on the edge of "
      "stability." + tail
    )
  why = (
    "injected by config.drill, or non-deterministic"
    if trainer._drill.active
    else "non-deterministic, or the state that produced it was not this one"
  )
  return (
    prefix + f"the replay of this batch is finite (loss {fmt(rep.loss)}{grads}): the fault "
    f"did not reproduce ({why})." + tail
  )


def _diagnose_params(trainer, step: int) -> str:
  bad = [
    _var_path(v)
    for v in list(trainer.model.variables) + list(trainer.optimizer.variables)
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
