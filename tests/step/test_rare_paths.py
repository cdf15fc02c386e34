"""The lean loop: the guard's rare paths (a dirty batch's rows dropped, the
forward and backward pass again on the examples kept) are traced only when a
batch first needs one. A clean run never traces them; a run that meets one
traces the loop again once, from that batch, and ends bit for bit where a
loop with every rare path built from the start ends. The faults are in the
data (a drill of bad rows builds the rare paths at once)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import logging
from common import DirtyTrainer, TinyTrainer, norm_model, tiny_config


class NormTrainer(DirtyTrainer):
  """State a forward pass writes (BatchNorm statistics, dropout's seed)."""

  def build_model(self):
    return norm_model()


def dirty(base=DirtyTrainer, nan=(), huge=()):
  """A trainer class whose data holds NaN features in rows `nan` and
  overflowing targets in rows `huge` (batch k: rows 16k..16k+15)."""
  return type("Dirty", (base,), {"NAN_ROWS": tuple(nan), "HUGE_ROWS": tuple(huge)})


class ClassTrainer(TinyTrainer):
  """Three classes, integer labels (the label check's sparse loss)."""

  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(3, activation="softmax"),
      ]
    )

  def build_train_dataset(self):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=(256,)).astype(np.int64)
    y[37] = 7  # out of range: a dirty batch at the third step
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)


def _class_config(**overrides):
  return tiny_config(**{"loss": "sparse_categorical_crossentropy", **overrides})


def run(workdir, *, built: bool, cls=TinyTrainer, config=None, **overrides):
  """fit() on a fresh trainer; `built`: every rare path traced from the start."""
  t = cls(config or tiny_config(**overrides), str(workdir))
  t.build()
  if built:
    assert t.parts.compiled.loop.build_rare_paths()
  return t, t.fit()


def everything(t) -> list:
  s = t.state["loss_scale"]
  variables = t.model.variables + t.optimizer.variables + [s.scale, s.good_steps]
  return [np.array(v.numpy()) for v in variables]


def records(workdir) -> list:
  """metrics.jsonl without its times."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if "time" not in k and "per_sec" not in k} for r in rows]


def without_time(incidents):
  return [{k: v for k, v in i.items() if k != "time"} for i in incidents]


FAULTS = {
  "rows with NaN inputs": dict(cls=dirty(nan=(100, 101))),
  "non-finite examples": dict(cls=dirty(huge=(50, 51, 200))),
  "a skipped batch": dict(cls=dirty(nan=(90,)), overrides={"guard.bad_inputs": "skip_batch"}),
  "the data's end": dict(cls=dirty(nan=(100, 250)), overrides={"train.repeat_data": False}),
  "examples under BatchNorm and dropout, select": dict(
    cls=dirty(NormTrainer, huge=(140, 141)), overrides={"train.skip_update": "select"}
  ),
  "examples under mixed_float16": dict(
    cls=dirty(NormTrainer, huge=(90,)),
    overrides={"precision.policy": "mixed_float16", "loss_scale.initial": 2.0**8},
  ),
  "a label out of range": dict(cls=ClassTrainer, config=_class_config),
}


# In make test: the five below; under -m slow also these two (NaN input rows
# are in make test through the stash test and tests/step/test_jit.py).
SLOW = ("a skipped batch", "rows with NaN inputs")


@pytest.mark.parametrize(
  "fault",
  [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in sorted(FAULTS)],
)
def test_a_rare_path_built_late_ends_bit_for_bit_as_built_early(fault, tmp_path, caplog):
  spec = FAULTS[fault]
  kwargs = dict(cls=spec["cls"])
  if "config" in spec:
    kwargs["config"] = spec["config"]()
  kwargs.update(spec.get("overrides", {}))
  caplog.set_level(logging.INFO)
  lean, lean_result = run(tmp_path / "lean", built=False, **kwargs)
  retraced = [r for r in caplog.records if "rare paths" in r.getMessage()]
  early, early_result = run(tmp_path / "early", built=True, **kwargs)
  # The lean run met the rare path once: traced again from that batch, once.
  assert len(retraced) == 1, [r.getMessage() for r in caplog.records]
  assert not lean.parts.compiled.loop.lean
  assert lean.parts.compiled.loop.function.experimental_get_tracing_count() == 1
  assert lean_result.incidents, "the fault must be seen"
  assert without_time(lean_result.incidents) == without_time(early_result.incidents)
  assert (lean_result.step, lean_result.loss_scale) == (early_result.step, early_result.loss_scale)
  assert lean.parts.feed.position() == early.parts.feed.position()
  assert int(lean.state["recovery"].attempts.numpy()) == int(
    early.state["recovery"].attempts.numpy()
  )
  for a, b in zip(everything(lean), everything(early)):
    np.testing.assert_array_equal(a, b)
  assert records(tmp_path / "lean") == records(tmp_path / "early")


def test_a_clean_run_never_traces_a_rare_path(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  t, result = run(tmp_path, built=False, **{"drill.loss_steps": "5"})  # a scalar NaN: no rare path
  assert result.step == 20 and result.incidents
  assert t.parts.compiled.loop.lean
  assert t.parts.compiled.loop.function.experimental_get_tracing_count() == 1
  assert not [r for r in caplog.records if "rare paths" in r.getMessage()]


def _ops(function) -> dict:
  """Op type -> count in a traced function and every function it calls."""
  graph = function._list_all_concrete_functions()[0].graph.as_graph_def()
  counts = {}
  for node in list(graph.node) + [n for f in graph.library.function for n in f.node_def]:
    counts[node.op] = counts.get(node.op, 0) + 1
  return counts


@pytest.mark.parametrize("mode", ("cond", "select"))
def test_the_lean_loop_has_no_second_pass_nor_row_drops(mode, tmp_path):
  """The lean graph holds the model's forward and backward pass once, fewer
  boolean masks and fewer branches than the loop built in full."""
  counts = {}
  for built in (False, True):
    t, _ = run(tmp_path / str(built), built=built, **{"train.steps": 5, "train.skip_update": mode})
    counts[built] = _ops(t.parts.compiled.loop.function)
  lean, full = counts[False], counts[True]
  # Two Dense layers: two MatMuls forward, two for each kernel's gradient
  # and one for the hidden activation's (the second pass doubles them).
  assert lean["MatMul"] == 5 and full["MatMul"] == 10
  # boolean_mask's indices (the kept rows; the lean graph names bad rows only)
  assert lean.get("Where", 0) < full.get("Where", 0)
  assert lean.get("If", 0) + lean.get("StatelessIf", 0) < full.get("If", 0) + full.get(
    "StatelessIf", 0
  )


@pytest.mark.parametrize("mode", (pytest.param("cond", marks=pytest.mark.slow), "select"))
def test_the_lean_loop_stashes_the_divergent_batch_as_the_built_one(mode, tmp_path):
  """The forensics stash holds the last divergent batch as the model saw it
  (under select the lean loop carries it by select and stashes it after
  the loop): the same bytes as the loop built whole stashes."""
  stashed = {}
  for built in (False, True):
    overrides = {"train.skip_update": mode, "drill.loss_steps": "6"}
    t, result = run(tmp_path / str(built), built=built, cls=dirty(nan=(120,)), **overrides)
    assert result.incidents
    stashed[built] = [v.numpy() for v in t.parts.compiled.loop.stash if v is not None]
  assert stashed[False][0].shape == (16, 4)
  for a, b in zip(stashed[False], stashed[True]):
    np.testing.assert_array_equal(a, b)


def test_a_drill_of_bad_rows_builds_the_rare_paths_at_once(tmp_path, caplog):
  """drill.input_steps, or drill.loss_steps with loss_rows: the fault is
  certain, so the loop is traced once, whole; a drill of whole losses
  (no row to drop) keeps the lean loop."""
  caplog.set_level(logging.INFO)
  for overrides, lean in (
    ({"drill.input_steps": "3"}, False),
    ({"drill.loss_steps": "3", "drill.loss_rows": 2}, False),
    ({"drill.loss_steps": "3"}, True),
  ):
    t = TinyTrainer(
      tiny_config(**{"train.steps": 5, **overrides}), str(tmp_path / str(len(overrides)))
    )
    t.build()
    assert t.parts.compiled.loop.lean is lean, overrides
  assert not [r for r in caplog.records if "rare paths" in r.getMessage()]
