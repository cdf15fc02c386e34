"""The eager replay of one training step, with every Keras layer instrumented.

Forensics and preflight re-run `compute_loss` on a batch outside the compiled
loop and look at what each layer received and produced. They see the trainer
through a small `Context`, never through its private attributes. A replay
never changes a variable: non-trainable state (BatchNorm statistics, dropout
RNG) is put back afterwards.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from safetrain.core import boundary, compat
from safetrain.step import guard
from safetrain.step.loss_scale import DynamicLossScale
from safetrain.step.loss_watch import SpikeDetector


@dataclasses.dataclass(frozen=True)
class Context:
  """What forensics and preflight need to know about a built trainer.

  Attributes:
    model, optimizer: the live Keras objects.
    compute_loss: (model, batch, training) -> (float32 loss, metrics).
    fp16: whether the run computes in float16 (its gradients scaled).
    loss_scale: the dynamic loss scale.
    spike: the loss-spike detector (its running mean explains a spike).
    drill_active: whether config.drill injects faults.
    max_abs_input: `guard.preflight_max_abs_input`.
  """

  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  compute_loss: Callable
  fp16: bool
  loss_scale: DynamicLossScale
  spike: SpikeDetector
  drill_active: bool
  max_abs_input: float


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

  @property
  def failed(self) -> bool:
    """The step failed numerically: a non-finite layer output, loss or
    gradient. A replay that could not run (`error`) did not."""
    if self.error is not None:
      return False
    loss_bad = self.loss is not None and not np.isfinite(self.loss)
    return loss_bad or not self.grads_finite or any(not r.outputs.finite for r in self.layers)

  @property
  def finite(self) -> bool:
    """It ran, and its loss, every layer output and gradient are finite."""
    return self.error is None and self.loss is not None and not self.failed


def _layers_of(model) -> list:
  try:
    layers = compat.flatten_layers(model)
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
      compat.replace_call(layer, self._wrap(layer, layer.call))
    return self

  def __exit__(self, *exc):
    for layer in self.layers:
      compat.replace_call(layer, self._saved.get(id(layer)))
    return False


class _KeepState:
  """Puts back the model's non-trainable variables (BatchNorm statistics,
  dropout RNG state) after a replay in training mode, as a skipped step does."""

  def __init__(self, model):
    self.variables = list(model.non_trainable_variables)

  def __enter__(self):
    self.values = guard.snapshot(self.variables)
    return self

  def __exit__(self, *exc):
    guard.put_back(self.variables, self.values)
    return False


def replay(
  ctx: Context,
  batch,
  *,
  gradients: bool = True,
  check_numerics: bool = False,
  scale: float | None = None,
) -> Replay:
  """Re-runs `ctx.compute_loss` on `batch` eagerly, layer by layer.

  Args:
    ctx: the trainer's context; its model is left exactly as it was.
    batch: an undistributed batch.
    gradients: also compute the gradients of the trainable variables, of the
      loss times the loss scale under mixed_float16 and unscaled after, as
      the compiled step does.
    check_numerics: stop at the first op that produces a NaN or Inf; the
      error (naming the op) lands in `Replay.error`.
    scale: the loss scale to use under mixed_float16 instead of the live one.
  """
  model = ctx.model
  rep = Replay(instrumented=True)
  fp16 = ctx.fp16
  if fp16:
    rep.scale = float(ctx.loss_scale.scale.numpy()) if scale is None else float(scale)
  variables = list(model.trainable_variables)
  recorder = _Recorder(model, keep_tensors=not check_numerics)
  if check_numerics:
    tf.debugging.enable_check_numerics()
  try:
    with _KeepState(model), recorder, tf.GradientTape() as tape:
      loss, _ = ctx.compute_loss(model, batch, True)
      scaled = loss * rep.scale if fp16 else loss
    rep.loss = float(loss.numpy())
    if gradients and variables:
      grads = tape.gradient(scaled, variables)
      for var, g in zip(variables, grads):
        if g is None:
          continue
        g = guard.dense_float32(g) / rep.scale
        ok = bool(tf.reduce_all(tf.math.is_finite(g)).numpy())
        norm = float(tf.norm(tf.where(tf.math.is_finite(g), g, 0.0)).numpy())
        rep.grads.append((var_path(var), norm, ok))
  except Exception as e:  # noqa: BLE001 - a replay failure is reported, not raised
    # The op's own message, not the hook boundary's one line about it.
    rep.error = str(e.error if isinstance(e, boundary.HookError) and e.error else e)
    rep.error_layers = recorder.error_layers or []
  finally:
    if check_numerics:
      tf.debugging.disable_check_numerics()
  rep.layers = recorder.records
  rep.instrumented = any(not r.is_model for r in rep.layers)
  return rep


def var_path(v) -> str:
  return getattr(v, "path", None) or v.name
