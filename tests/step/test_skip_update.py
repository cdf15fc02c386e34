"""`train.skip_update`: the select form of apply-or-skip (the update always,
the old values kept with tf.where) behaves exactly as the cond form, and its
loop body has no branch around the optimizer's update."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from common import ROOT, TinyTrainer, norm_model, tiny_config

import safetrain
from safetrain import trainer as trainer_lib
from safetrain.core import config as config_lib
from safetrain.step import per_example

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_step  # noqa: E402

MODES = ("cond", "select")


class NormTrainer(TinyTrainer):
  """With state a forward pass writes: BatchNorm statistics and dropout's
  seed; trained without shuffling."""

  def build_model(self):
    return norm_model()


def everything(t) -> list:
  """Every model and optimizer variable and the loss scale's, as numpy."""
  s = t.state["loss_scale"]
  variables = t.model.variables + t.optimizer.variables + [s.scale, s.good_steps, s.hysteresis_left]
  return [np.array(v.numpy()) for v in variables]


def fit(mode, workdir, cls=TinyTrainer, **overrides):
  t = cls(tiny_config(**{"train.skip_update": mode, **overrides}), str(workdir))
  return t, t.fit()


def without_time(incidents):
  """Incident records without their time, nor the diagnosis (which names
  the layers, numbered anew in each model)."""
  return [{k: v for k, v in i.items() if k not in ("time", "diagnosis")} for i in incidents]


def assert_bitwise(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode", MODES)
def test_a_skipped_step_leaves_every_variable_bit_for_bit(mode, tmp_path):
  """A NaN loss at attempt 3 under mixed_float16 with BatchNorm, dropout and
  Adam: the weights, slots, iterations, statistics, seed and loss scale are
  what two good steps left, bit for bit (the select's update wrote NaN)."""
  c = tiny_config(
    **{
      "train.skip_update": mode,
      "precision.policy": "mixed_float16",
      "drill.loss_steps": "3",
      # Low enough that the first two steps do not overflow.
      "loss_scale.initial": 2.0**8,
      # The loop ends at the first divergent attempt: what it left is seen.
      "guard.rollback_after": 1,
    }
  )
  t = NormTrainer(c, str(tmp_path))
  t.build()
  assert t.parts.compiled.loop.skip_update == mode
  start = everything(t)
  t.parts.compiled.loop(t.parts.feed.iterator, 2)
  before = everything(t)
  moved = sum(not np.array_equal(a, b) for a, b in zip(start, before))
  # kernels, biases, gamma/beta, the statistics, the seed, slots, iterations
  # and the loss scale's good-step count: what a skip has to put back.
  assert moved >= len(t.model.trainable_variables) * 3 + 4
  t.parts.compiled.loop(t.parts.feed.iterator, 1)
  assert int(t.state["recovery"].attempts.numpy()) == 3 and int(t.state["run"].step.numpy()) == 2
  assert_bitwise(before, everything(t))
  assert int(t.optimizer.iterations.numpy()) == 2


def test_faults_rollbacks_and_the_lr_scale_are_the_same_under_both(tmp_path):
  """A rollback (three NaN losses), a NaN gradient and a bad input row (the
  per-example rerun): the same weights bit for bit, incidents, rollbacks
  and learning-rate scale."""
  drills = {
    "drill.loss_steps": "12-14",
    "drill.grad_steps": "4",
    "drill.input_steps": "7",
  }
  (a, ra), (b, rb) = (fit(m, tmp_path / m, NormTrainer, **drills) for m in MODES)
  assert ra.rollbacks == rb.rollbacks == 1 and ra.lr_scale == rb.lr_scale == 0.5
  assert (ra.step, ra.attempts, ra.skipped_steps) == (rb.step, rb.attempts, rb.skipped_steps)
  assert without_time(ra.incidents) == without_time(rb.incidents)
  assert_bitwise(everything(a), everything(b))


def test_the_loss_scale_moves_alike_under_both(tmp_path):
  """Overflows under mixed_float16: hysteresis spent, the scale dropped,
  regrown after growth_interval good steps, step by step the same."""
  overrides = {
    "precision.policy": "mixed_float16",
    "drill.grad_steps": "2-3,8,12-13",
    "drill.value": "inf",
    "loss_scale.growth_interval": 3,
    "train.steps": 10,
    "train.steps_per_loop": 1,
    "train.log_every_steps": 1,
  }
  runs = {m: fit(m, tmp_path / m, **overrides) for m in MODES}
  scales = {}
  for m in MODES:
    recs = safetrain.read_jsonl(str(tmp_path / m / "metrics.jsonl"))
    scales[m] = [x["loss_scale"] for x in recs]
  s = 2.0**15
  # By attempt: 2-3 overflow (hysteresis spent, then a drop), 4-6 good (it
  # grows back, hysteresis refilled), 8 overflows (hysteresis only), 9-11
  # good (it grows), 12-13 overflow (hysteresis, a drop). One value a step.
  assert scales["cond"] == [s, s / 2, s / 2, s, s, s, s, s * 2, s, s], scales
  assert scales["select"] == scales["cond"]
  (a, ra), (b, rb) = runs["cond"], runs["select"]
  assert ra.skipped_steps == rb.skipped_steps == 5 and ra.incidents == rb.incidents == []
  assert_bitwise(everything(a), everything(b))


def test_mirrored_select_matches_cond(tmp_path):
  """Two replicas (conftest's two logical CPUs), a NaN gradient on one
  replica's shard: the same run under both, every replica alike."""
  overrides = {
    "distribute.strategy": "mirrored",
    "distribute.cpu_replicas": 2,
    "drill.grad_steps": "3",
    "drill.replica": 1,
    "train.steps": 6,
  }
  (a, ra), (b, rb) = (fit(m, tmp_path / m, NormTrainer, **overrides) for m in MODES)
  assert ra.skipped_steps == rb.skipped_steps == 1
  assert without_time(ra.incidents) == without_time(rb.incidents)
  assert_bitwise(everything(a), everything(b))
  for v in b.model.variables + b.optimizer.variables:
    values = [x.numpy() for x in b.strategy.experimental_local_results(v.value)]
    assert len(values) == 2
    np.testing.assert_array_equal(values[0], values[1], err_msg=v.path)


# Ops whose branch functions run only when their predicate says so.
_BRANCHING = ("If", "StatelessIf", "Case", "StatelessCase")


def _update_ops(graph):
  """{function name: number of AssignSubVariableOp (Keras's SGD/Adam weight
  update)} of the loop body and everything in it, and the set of those
  functions that run inside a branch."""
  library = {f.signature.name: f for f in graph.as_graph_def().library.function}
  updates, branched = {}, set()

  def walk(name, in_branch):
    if name not in library or (name in updates and (not in_branch or name in branched)):
      return
    fn = library[name]
    updates[name] = sum(n.op == "AssignSubVariableOp" for n in fn.node_def)
    if in_branch:
      branched.add(name)
    for node in fn.node_def:
      for key, value in node.attr.items():
        subs = ([value.func.name] if value.HasField("func") else []) + [
          f.name for f in value.list.func
        ]
        branch = node.op in _BRANCHING and key in ("then_branch", "else_branch", "branches")
        for sub in subs:
          walk(sub, in_branch or branch)

  for name in library:
    if "while_body" in name:
      walk(name, False)
  return updates, branched


def test_the_select_loop_has_no_branch_around_the_update(tmp_path):
  graphs = {}
  for mode in MODES:
    t = TinyTrainer(tiny_config(**{"train.skip_update": mode}), str(tmp_path / mode))
    t.build()
    fn = t.parts.compiled.loop.function.get_concrete_function(
      t.parts.feed.iterator, tf.constant(5, tf.int64)
    )
    graphs[mode] = fn.graph
  branches = {m: bench_step.body_branches(g) for m, g in graphs.items()}
  assert branches["select"] < branches["cond"], branches
  kernels = len(t.model.trainable_variables)
  for mode, graph in graphs.items():
    updates, branched = _update_ops(graph)
    inside = sum(n for f, n in updates.items() if f in branched)
    outside = sum(n for f, n in updates.items() if f not in branched)
    if mode == "cond":
      assert (inside, outside) == (kernels, 0), (inside, outside)
    else:
      assert (inside, outside) == (0, kernels), (inside, outside)


def test_auto_is_the_select_with_a_gpu_or_xla_and_the_cond_on_a_cpu(monkeypatch):
  assert trainer_lib.skip_update("select", jit_compile=False) == "select"
  assert trainer_lib.skip_update("cond", jit_compile=True) == "cond"
  assert trainer_lib.skip_update("auto", jit_compile=False) == "cond"  # this CPU
  assert trainer_lib.skip_update("auto", jit_compile=True) == "select"
  monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: ["GPU:0"])
  assert trainer_lib.skip_update("auto", jit_compile=False) == "select"


def test_skip_update_is_validated():
  c = tiny_config(**{"train.skip_update": "where"})
  with pytest.raises(config_lib.ConfigError, match="train.skip_update"):
    config_lib.validate(c)


@pytest.mark.parametrize("bad_rows", [[], [0], [3, 17, 31], list(range(0, 40, 2))], ids=len)
def test_the_dropped_rows_are_named_alike_without_a_branch(bad_rows):
  bad = np.zeros(40, bool)
  bad[bad_rows] = True
  bad = tf.constant(bad)
  static = per_example._first_rows_static(bad).numpy().tolist()
  expected = (bad_rows[: per_example.MAX_ROWS] + [-1] * per_example.MAX_ROWS)[
    : per_example.MAX_ROWS
  ]
  assert static == expected == per_example._first_rows(bad).numpy().tolist()
