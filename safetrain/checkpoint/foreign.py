"""A workdir written for another model: told apart before a restore fails.

Resuming in a workdir that another experiment wrote would fail deep inside
TensorFlow with a shape error, or worse, restore into a model of the same
shapes without a word. `check` compares the checkpoint's model variables with
the model's before the restore and names both trainers (the one WORKDIR/
config.json records, and this one): a different model is a RefusedWorkdirError
(exit 2), the same model under another trainer name a warning.
"""

from __future__ import annotations

import json
import os
import re

from safetrain.checkpoint.repair import Notes
from safetrain.core.errors import RefusedWorkdirError
from safetrain.storage import files as storage

_MODEL_KEY = re.compile(r"^model_variables/\d+/\.ATTRIBUTES/VARIABLE_VALUE$")


def recorded_trainer(workdir: str) -> str | None:
  """The trainer named in WORKDIR/config.json by the run that wrote it."""
  try:
    owner = json.loads(storage.read_text(os.path.join(workdir, "config.json"))).get("trainer")
  except (OSError, ValueError, AttributeError):
    return None
  return owner if isinstance(owner, str) else None


def owner_note(workdir: str, owner: str | None) -> str:
  """' (it was written by A, this is B)' when the workdir's trainer differs
  from `owner`, else ''."""
  previous = recorded_trainer(workdir)
  if owner and previous and previous != owner:
    return f" (it was written by {previous}, this is {owner})"
  return ""


def check(
  path: str,
  saved: list[tuple[str, list[int]]],
  *,
  model,
  owner: str | None,
  workdir: str,
  notes: Notes,
) -> None:
  """Checks that the checkpoint at `path` holds `model`'s variables.

  Args:
    path: the checkpoint, for the message.
    saved: its (key, shape) list, as tf.train.list_variables returns it.
    model: the Keras model about to be restored.
    owner: the name of this trainer class.
    workdir: the run's workdir (its config.json names the trainer that wrote
      it).
    notes: where the warning about a renamed trainer goes.

  Raises:
    WorkdirError: the checkpoint was written for a model with other variable
      shapes, naming the trainers and a few of the shapes.
  """
  saved_shapes = sorted(tuple(shape) for key, shape in saved if _MODEL_KEY.match(key))
  if not saved_shapes:
    # Written before every model variable was saved by position: trainable
    # ones are reached through the optimizer, the rest through the model.
    saved_shapes = sorted(
      tuple(shape)
      for key, shape in saved
      if key.startswith(("model/", "optimizer/_trainable_variables/"))
      and key.endswith("/.ATTRIBUTES/VARIABLE_VALUE")
    )
  our_shapes = sorted(tuple(v.shape) for v in model.variables)
  note = owner_note(workdir, owner)
  if saved_shapes == our_shapes:
    if note:
      notes.add(
        f"the workdir {workdir} was written by another trainer{note}; its model has the same "
        "variable shapes, so resuming from it",
        warn=True,
      )
    return
  missing = _multiset_minus(our_shapes, saved_shapes)[:3]
  extra = _multiset_minus(saved_shapes, our_shapes)[:3]
  raise RefusedWorkdirError(
    f"the checkpoint {path} was written for a different model{note}: it holds "
    f"{len(saved_shapes)} model variables, this model has {len(our_shapes)}"
    f" (shapes only in this model: {missing}; only in the checkpoint: {extra})."
    " Use a new --workdir, or the experiment that wrote this one."
  )


def _multiset_minus(a: list, b: list) -> list:
  rest = list(b)
  out = []
  for x in a:
    if x in rest:
      rest.remove(x)
    else:
      out.append(list(x))
  return out
