"""Every place safetrain reaches into TensorFlow or Keras internals.

Each internal is wrapped in one function here, with why no public API does
the job, and a test in tests/core/test_compat.py that attacks exactly what
safetrain relies on, so that a TensorFlow or Keras upgrade that changes it
fails there, loudly and by name, instead of somewhere deep in a run.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint_management


def write_checkpoint_state(
  directory: str,
  paths: list[str],
  timestamps: list[float] | None = None,
  last_preserved_timestamp: float | None = None,
) -> None:
  """Rewrites `directory`'s `checkpoint` state file to list exactly `paths`.

  The state file is written as `tf.train.CheckpointManager` writes it: paths
  relative to `directory`, the last of `paths` the latest, one timestamp each,
  replaced atomically (TensorFlow writes a temporary file and renames it).

  Why an internal: the repair on start and a rollback's retirement must
  unlist chosen checkpoints and keep the others' save times (max_to_keep
  reads them). CheckpointManager has no call for that, and the public
  `tf.compat.v1.train.update_checkpoint_state` writes the paths as given,
  absolute, so a copied or moved workdir would point into the original one.
  `update_checkpoint_state_internal(save_relative_paths=True)` is what
  CheckpointManager itself calls (also exported as
  `tf.__internal__.train.update_checkpoint_state`).

  Args:
    directory: the checkpoint directory.
    paths: the checkpoints to list, oldest save first; not empty.
    timestamps: the save time of each of `paths` (seconds since the epoch),
      or None for none (CheckpointManager then takes the time it starts).
    last_preserved_timestamp: what CheckpointManager's
      keep_checkpoint_every_n_hours counts from, or None.
  """
  checkpoint_management.update_checkpoint_state_internal(
    directory,
    model_checkpoint_path=paths[-1],
    all_model_checkpoint_paths=paths,
    all_model_checkpoint_timestamps=timestamps,
    last_preserved_timestamp=last_preserved_timestamp,
    save_relative_paths=True,
  )


# ------------------------------------------------------------------ Keras


def learning_rate_schedule(optimizer):
  """The schedule (or learning-rate variable) a Keras 3 optimizer holds.

  Why an internal: the public `optimizer.learning_rate` evaluates the schedule
  at the current iteration; safetrain needs the schedule itself, to wrap it
  and to read the rate the last update used (`iterations - 1`).
  """
  return optimizer._learning_rate


def set_learning_rate_schedule(optimizer, schedule) -> None:
  """Makes `schedule` the optimizer's learning rate, in place.

  Why an internal: the public `learning_rate` setter untracks the optimizer's
  learning-rate variable in place, which breaks tf.train.Checkpoint's
  append-only tracking of `optimizer.variables` (a checkpoint written before
  would no longer restore).
  """
  optimizer._learning_rate = schedule


def leave_out_of_keras_saves(optimizer, unused) -> None:
  """Leaves one variable out of the optimizer's Keras save (`model.save`).

  Why an internal: Keras saves an optimizer's variables by position
  (`save_own_variables`), and `load_model` rebuilds one whose rate is a
  schedule without a rate variable; with the unused rate variable left in, the
  counts differ and Keras skips the whole optimizer state. Overriding the
  instance's `save_own_variables` lets a compiled model's slots load back.
  """

  def save_own_variables(store):
    for i, variable in enumerate(v for v in optimizer.variables if v is not unused):
      store[str(i)] = variable.numpy()

  optimizer.save_own_variables = save_own_variables


def activation_input(p: tf.Tensor):
  """`(logits, "Softmax"|"Sigmoid")` when `p` is a softmax or sigmoid output, else None.

  Why an internal: in a graph the producing op is read (`p.op`); eagerly there
  is no op, and Keras's own softmax and sigmoid leave their input on the output
  as `_keras_logits` (what Keras's cross-entropy reads to work from logits).
  The eager candidate is accepted only when it reproduces `p` exactly.
  """
  if hasattr(p, "op") and not isinstance(p, tf.__internal__.EagerTensor):
    if p.op.type in ("Softmax", "Sigmoid") and len(p.op.inputs) == 1:
      return p.op.inputs[0], p.op.type
    return None
  x = getattr(p, "_keras_logits", None)
  if x is None:
    return None
  for name, fn in (("Softmax", tf.nn.softmax), ("Sigmoid", tf.sigmoid)):
    if x.dtype == p.dtype and x.shape == p.shape and bool(tf.reduce_all(fn(x) == p)):
      return x, name
  return None


def disable_gradient_all_reduce(optimizer) -> bool:
  """Stops a Keras 3 optimizer from summing gradients over replicas.

  Why an internal: Keras's TensorFlow optimizer sums the gradients it gets in
  replica context over the replicas (`_all_reduce_sum_gradients`); the
  guarded step has reduced them already (every guard decision is taken on
  them), and no public option turns the second reduction off. Returns False,
  changing nothing, for an optimizer without that method.
  """
  if not callable(getattr(optimizer, "_all_reduce_sum_gradients", None)):
    return False
  optimizer._all_reduce_sum_gradients = list
  return True


def flatten_layers(model) -> list:
  """Every layer of `model`, nested ones included, the model first.

  Why an internal: `model.layers` lists the top level only; forensics must
  instrument the layers inside nested models and subclassed layers too.
  """
  return list(model._flatten_layers(include_self=True, recursive=True))


def replace_call(layer, call) -> None:
  """Makes `layer(...)` run `call` instead of the class's `call` (on this
  instance only), or, with `call=None`, the class's again.

  Why an internal: Keras's `Layer.__setattr__` tracks attributes (it would
  wrap the function), so forensics' instrumentation of each layer's call is
  set with `object.__setattr__`; Keras's `__call__` looks `call` up on the
  instance.
  """
  if call is None:
    if "call" in vars(layer):
      object.__delattr__(layer, "call")
  else:
    object.__setattr__(layer, "call", call)


# ------------------------------------------------------------- TensorFlow


def reserve_collective_keys(step: int = 100_000) -> None:
  """Moves MirroredStrategy's collective key base past the keys in use.

  Why an internal: collective group keys are process-wide and every
  MirroredStrategy starts them at the class's base, so a second strategy in
  one process (another trainer, or the user's own) would meet the first one's
  collectives ("Shape mismatch in the collective instance"). TensorFlow's own
  tests move `_collective_key_base` the same way.
  """
  tf.distribute.MirroredStrategy._collective_key_base += step


def iterator_state_error(iterator) -> str | None:
  """Why tf.train.Checkpoint cannot save a tf.data iterator, or None.

  Why an internal: there is no public "can this iterator be checkpointed"; a
  pipeline with state outside the graph fails only when saved. Serializing
  the fresh iterator (`_serialize_to_tensors`, what the checkpoint calls)
  tells at once and cheaply, before any batch was read.
  """
  try:
    iterator._serialize_to_tensors()
  except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError) as e:
    text = str(e).split("}}")[-1].strip().split(" [Op:")[0].rstrip(".")
    return text or "the pipeline holds state outside the graph"
  return None
