"""TensorBoard: the `train` and `eval` runs of `WORKDIR/events/`, as Keras's
TensorBoard callback writes `train/` and `validation/`, so the curves overlay.

The horizontal axis of every summary is the run's attempt counter
(`FitResult.attempts`: steps attempted, skipped ones included), which no
rollback and no resume moves backwards, so the charts never fold back on
themselves. Where nothing was skipped it equals the step; the applied step
is a scalar of its own (`step`), which drops at a rollback.

The loop a rollback undid writes its measurements under `undone/<name>`
instead of `<name>` (its state fields, `step`, `lr_scale` and `loss_scale`,
are those after the restore and stay under their names): its losses
(often 1e30 and more) stay out of the default loss chart, whose scale stays
the one of the trajectory that was kept; a
`rollback` scalar (1) marks where it happened. Each incident is a text
summary (`incidents`) at the attempt of the loop that saw it, naming its
step, kind, action, learning-rate scale and diagnosis. With
`train.histogram_every_steps` N > 0, every N steps the train run also gets a
histogram of every trainable weight (`weights/<path>`) and the gradient norm
of every layer (`grad_norm/<layer>`), the latter computed on the first
training batch in inference mode, so the probe changes no state.

Scalars are written one event per call (`write_scalars`), not one op per
number:

`tf.summary.scalar` runs one eager op per value: for the dozen-odd numbers of
a loop record that is ~3.5 ms per inner loop on this CPU (~20 ms under load),
a few percent of a loop of 100 one-millisecond steps. `write_scalars` builds
the same `Summary` protobuf `tf.summary.scalar` writes (a float32 scalar
tensor under the "scalars" plugin's metadata) for all values at once and hands
it to the default writer with one `write_raw_pb` op (~0.5 ms). TensorBoard and
`tf.compat.v1.train.summary_iterator` read them back exactly as scalars
written one at a time; the values of one call share one event.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorflow.core.framework import types_pb2

from safetrain.storage import files as storage

# What tf.summary.scalar attaches to every value (display name and
# description unset), in TensorFlow's own proto class.
_SCALAR_METADATA = tf.compat.v1.SummaryMetadata.FromString(
  scalar_metadata.create_summary_metadata(None, None).SerializeToString()
)


def scalars_event(values: dict[str, float]) -> bytes:
  """The serialized `Summary` holding each `tag: value` as a float32 scalar.

  Each value is the proto `tf.make_tensor_proto(np.float32(value))` makes,
  filled in directly: make_tensor_proto costs ~30 us a value, a third of the
  host's TensorBoard time per loop.
  """
  summary = tf.compat.v1.Summary()
  for tag, value in values.items():
    entry = summary.value.add(tag=tag)
    entry.metadata.CopyFrom(_SCALAR_METADATA)
    entry.tensor.dtype = types_pb2.DT_FLOAT
    entry.tensor.tensor_shape.SetInParent()
    entry.tensor.float_val.append(float(np.float32(value)))
  return summary.SerializeToString()


def write_scalars(values: dict[str, float], step: int) -> None:
  """Writes `values` at `step` to the default summary writer, in one op.

  Runs eagerly (between inner loops); a no-op without a default writer or
  with no values, like `tf.summary.scalar`.
  """
  if values:
    tf.summary.experimental.write_raw_pb(scalars_event(values), step=step)


# A rollback record's fields that describe the state the run goes on from
# (after the restore and the backoff), not the undone loop: charted as usual.
_STATE = ("step", "lr_scale", "loss_scale")
# Record fields that are not numbers to chart.
_NOT_SCALARS = ("time", "attempts", "rollback", "final_eval")


class Summaries:
  """The event files of a run (the chief's only).

  Args:
    workdir: the run's workdir.
    enabled: False on non-chief workers: nothing is written.
  """

  def __init__(self, workdir: str, *, enabled: bool):
    events = os.path.join(workdir, "events")
    if enabled:
      # Created here, so a file or a link where a run's directory must be is
      # one line naming it (TensorFlow's own error names no path).
      for run in ("train", "eval"):
        storage.makedirs(os.path.join(events, run))
      self._train = tf.summary.create_file_writer(os.path.join(events, "train"))
      self._eval = tf.summary.create_file_writer(os.path.join(events, "eval"))
    else:
      self._train = self._eval = tf.summary.create_noop_writer()

  def loop(self, record: dict) -> None:
    """The scalars of one loop record (metrics.jsonl's) at its attempt; its
    `eval_*` fields go to the eval run under their plain names."""
    x = record["attempts"]
    undone = bool(record.get("rollback"))
    values = {
      (f"undone/{k}" if undone and k not in _STATE else k): v
      for k, v in record.items()
      if not k.startswith("eval_") and _is_number(v) and k not in _NOT_SCALARS
    }
    if undone:
      values["rollback"] = 1.0
    with self._train.as_default():
      write_scalars(values, x)
    self.eval(x, {k[5:]: v for k, v in record.items() if k.startswith("eval_")})

  def eval(self, x: int, metrics: dict) -> None:
    """An evaluation's results, in the eval run."""
    with self._eval.as_default():
      write_scalars({k: v for k, v in metrics.items() if _is_number(v)}, x)

  def incidents(self, x: int, records: list[dict]) -> None:
    """One text summary per incident record."""
    if not records:
      return
    with self._train.as_default(step=x):
      for r in records:
        tf.summary.text("incidents", incident_text(r))

  def histograms(self, x: int, model: keras.Model, compute_loss: Callable, batch) -> None:
    """Weight histograms and per-layer gradient norms (see the module doc)."""
    with self._train.as_default(step=x):
      for v in model.trainable_variables:
        tf.summary.histogram(f"weights/{v.path}", tf.convert_to_tensor(v))
      for layer, norm in layer_gradient_norms(model, compute_loss, batch).items():
        tf.summary.scalar(f"grad_norm/{layer}", norm)

  def flush(self) -> None:
    self._train.flush()
    self._eval.flush()


def incident_text(r: dict) -> str:
  """ "step 12: nonfinite_loss -> rollback (lr scale 1 -> 0.5). diagnosis" """
  before, after = r.get("lr_scale_before"), r.get("lr_scale_after")
  scale = ""
  if before is not None:
    scale = (
      f" (lr scale {before:.4g})"
      if after in (None, before)
      else (f" (lr scale {before:.4g} -> {after:.4g})")
    )
  restored = r.get("restored_step")
  to = f", restored step {restored}" if restored is not None else ""
  return f"step {r['step']}: {r['kind']} -> {r['action']}{to}{scale}. {r.get('diagnosis', '')}"


def layer_gradient_norms(model: keras.Model, compute_loss: Callable, batch) -> dict[str, float]:
  """{layer path: global norm of its weights' gradients} on `batch`,
  computed eagerly in inference mode (no BatchNorm or RNG state moves)."""
  variables = list(model.trainable_variables)
  with tf.GradientTape() as tape:
    loss = compute_loss(model, batch, False)[0]
  grads = tape.gradient(loss, variables)
  squares: dict[str, tf.Tensor] = {}
  for v, g in zip(variables, grads):
    if g is None:
      continue
    layer = v.path.rsplit("/", 1)[0]
    g = tf.convert_to_tensor(g, tf.float32)
    squares[layer] = squares.get(layer, 0.0) + tf.reduce_sum(tf.square(g))
  return {layer: float(tf.sqrt(s)) for layer, s in squares.items()}


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)
