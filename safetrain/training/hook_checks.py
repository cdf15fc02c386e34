"""The hooks checked once, at build, for what would make a run silently useless.

A hook can return something that trains nothing and still exits 0: a loss
that is an integer tensor (no gradient), a loss of a shape that is neither a
scalar nor one value per example, a model with nothing trainable. An
optimizer with its own clipping (`clipnorm`, `global_clipnorm`,
`clipvalue`) would clip after safetrain's guard has judged the gradients.
Each is a `HookContractError` (exit 2) naming the hook.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from safetrain.core import boundary
from safetrain.training import losses


class HookContractError(boundary.HookError):
  """A hook returned something safetrain cannot train with (exit code 2)."""

  def __init__(self, hook: str, problem: str, *, trainer: str | None = None):
    where = f"{trainer}.{hook}()" if trainer else f"{hook}()"
    Exception.__init__(self, f"{where} {problem}")
    self.hook = hook
    self.error = None
    boundary.remember(self)


def check_model(model: keras.Model, *, trainer: str) -> None:
  """A model with no trainable variable would train nothing."""
  if not model.trainable_variables:
    raise HookContractError(
      "build_model",
      f"returned a model with no trainable variables ({len(model.variables)} variables, "
      "all frozen): nothing would train. Unfreeze a layer (layer.trainable = True).",
      trainer=trainer,
    )


_CLIPPING = ("clipnorm", "global_clipnorm", "clipvalue")


def check_optimizer(optimizer: keras.optimizers.Optimizer, *, trainer: str) -> None:
  """An optimizer that clips by itself: safetrain clips (`clip.global_norm`),
  after its guard judged the gradients; a second clip inside the optimizer
  changes the update the guard let through."""
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  set_ = [f"{k}={getattr(inner, k)}" for k in _CLIPPING if getattr(inner, k, None) is not None]
  if set_:
    raise HookContractError(
      "build_optimizer",
      f"returned an optimizer with {', '.join(set_)}: safetrain clips the gradients itself "
      "(config.clip.global_norm, config.clip.mode). Build it without clipping and set "
      "config.clip.global_norm instead.",
      trainer=trainer,
    )


def checking_loss(compute_loss: Callable, *, trainer: str) -> Callable:
  """`compute_loss` (a trainer's override) with its loss checked on every call:
  floating point, and a scalar or one value per example (shape [batch] or
  [batch, ...]). Eagerly (the first-batch try) the batch's rows are known;
  traced, the check uses the static shapes.

  Under a mixed policy the override is handed the model's float32 view
  (`losses.float32_view`), as Keras hands a loss float32 predictions. The
  override is converted by AutoGraph here, once: the compiled step is traced
  without it (safetrain's code needs none, and converting it was most of a
  cold start), but user code may rely on it as in any `tf.function`.
  """

  def user(model, batch, training):
    return compute_loss(model, batch, training)

  converted = tf.autograph.to_graph(user)

  def checked(model, batch, training):
    out = converted(losses.float32_view(model), batch, training)
    loss = out[0] if isinstance(out, (tuple, list)) else out
    check_loss(loss, batch, trainer=trainer)
    return out

  checked.__name__ = getattr(compute_loss, "__name__", "compute_loss")
  return checked


def check_loss(loss, batch, *, trainer: str) -> None:
  """Raises HookContractError when `loss` cannot be trained on."""
  if isinstance(loss, (int, float)) and not isinstance(loss, bool):
    loss = tf.constant(loss)
  dtype = getattr(loss, "dtype", None)
  if dtype is None:
    raise HookContractError(
      "compute_loss",
      f"returned {type(loss).__name__} as the loss, not a tensor",
      trainer=trainer,
    )
  dtype = tf.as_dtype(dtype)
  if not dtype.is_floating:
    raise HookContractError(
      "compute_loss",
      f"returned a loss of dtype {dtype.name}: no gradient flows through an integer or "
      "boolean loss, so nothing would train. Compute it in floating point.",
      trainer=trainer,
    )
  shape = loss.shape
  if shape.rank is None or shape.rank == 0:
    return
  rows = _rows(batch)
  if shape[0] is not None and rows is not None and shape[0] != rows:
    raise HookContractError(
      "compute_loss",
      f"returned a loss of shape {shape.as_list()} for a batch of {rows}: a loss is a "
      f"scalar (the mean) or one value per example (shape [{rows}] or [{rows}, ...]).",
      trainer=trainer,
    )


def _rows(batch) -> int | None:
  """The batch's static number of rows, or None when unknown."""
  dims = {t.shape[0] for t in tf.nest.flatten(batch) if getattr(t, "shape", None) and t.shape.rank}
  dims.discard(None)
  if len(dims) == 1:
    return int(next(iter(dims)))
  return None
