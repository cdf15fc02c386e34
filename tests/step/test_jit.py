"""train.jit_compile: the lean loop's whole replica step is one XLA program
(the guard, the classification, clipping, loss scaling and the update; the
iterator, the divergent batch's stash and the host stay outside); once a
rare path is built, compute_loss and its gradient are. Either way the run is
the run without XLA: the same incidents, rollbacks and scales, the same
weights up to XLA's float rounding."""

import numpy as np
import pytest
from common import DirtyTrainer, TinyTrainer, norm_model, tiny_config

import safetrain
from safetrain import trainer as trainer_lib


class NormTrainer(TinyTrainer):
  """State the forward pass writes: BatchNorm statistics. (Not dropout:
  XLA draws other random numbers than TensorFlow's kernels.)"""

  def build_model(self):
    return norm_model(dropout=0)


def _xla_functions(trainer) -> list[set]:
  """For each call in the traced loop that XLA must compile, the op types
  of the function it calls (and of the functions that one calls)."""
  graph = trainer.parts.compiled.loop.function._list_all_concrete_functions()[0].graph
  library = {f.signature.name: f for f in graph.as_graph_def().library.function}

  def ops(name, seen):
    if name in seen or name not in library:
      return set()
    seen.add(name)
    out = set()
    for node in library[name].node_def:
      out.add(node.op)
      for attr in node.attr.values():
        if attr.func.name:
          out |= ops(attr.func.name, seen)
    return out

  calls = [
    node
    for f in library.values()
    for node in f.node_def
    if "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b
  ]
  return [ops(node.attr["f"].func.name, set()) for node in calls]


def _fit(workdir, jit: bool, cls=TinyTrainer, **overrides):
  c = tiny_config(**{"train.steps": 30, "train.steps_per_loop": 5, "train.jit_compile": jit})
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  t = cls(c, str(workdir / str(jit)))
  return t, t.fit()


def _incidents(result):
  return [(i["step"], i["kind"], i["action"]) for i in result.incidents]


def test_the_whole_lean_step_is_one_xla_program(tmp_path):
  plain, _ = _fit(tmp_path, False, **{"train.steps": 5})
  xla, _ = _fit(tmp_path, True, **{"train.steps": 5})
  assert _xla_functions(plain) == []
  # One program (compute_loss is part of it, not compiled on its own).
  (step,) = _xla_functions(xla)
  assert xla.parts.compiled.loop.jit_step
  # The update (the weights, Adam's slots and iterations, the loss scale),
  # the finiteness checks and the norm are inside it.
  assert {"AssignVariableOp", "AssignAddVariableOp", "IsFinite", "Sqrt"} <= step, step
  # No data-dependent shape: a lean step drops no rows.
  assert "Where" not in step and "Unique" not in step
  assert xla.parts.compiled.loop.function.experimental_get_tracing_count() == 1


FAULTS = {
  "a divergence, rollback and backoff": (TinyTrainer, {"drill.loss_steps": "13-15"}),
  "NaN gradients skipped": (TinyTrainer, {"drill.grad_steps": "4,9"}),
  "float16 overflows and a NaN loss": (
    NormTrainer,
    {"precision.policy": "mixed_float16", "drill.loss_steps": "8"},
  ),
  "BatchNorm, NaN losses": (NormTrainer, {"drill.loss_steps": "6,17"}),
}


@pytest.mark.parametrize(
  "fault",
  # NaN gradients are a divergence like the first: under -m slow only.
  [
    pytest.param(f, marks=pytest.mark.slow) if f == "NaN gradients skipped" else f
    for f in sorted(FAULTS)
  ],
)
def test_xla_runs_the_run_without_xla(fault, tmp_path):
  cls, overrides = FAULTS[fault]
  plain, r_plain = _fit(tmp_path, False, cls=cls, **overrides)
  xla, r_xla = _fit(tmp_path, True, cls=cls, **overrides)
  assert xla.parts.compiled.loop.jit_step and xla.parts.compiled.loop.lean
  assert r_xla.incidents and _incidents(r_xla) == _incidents(r_plain)
  assert (r_xla.step, r_xla.rollbacks, r_xla.lr_scale, r_xla.loss_scale, r_xla.skipped_steps) == (
    r_plain.step,
    r_plain.rollbacks,
    r_plain.lr_scale,
    r_plain.loss_scale,
    r_plain.skipped_steps,
  )
  # float16's rounding inside XLA's fused kernels differs more.
  atol = 1e-4 if "precision.policy" in overrides else 1e-6
  for a, b in zip(plain.model.get_weights(), xla.model.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)
  assert int(xla.optimizer.iterations.numpy()) == int(plain.optimizer.iterations.numpy())


class Dirty(DirtyTrainer):
  NAN_ROWS = (100,)  # step 7
  HUGE_ROWS = (180, 181, 182)  # step 12


def test_a_rare_path_under_xla_compiles_compute_loss_only(tmp_path):
  """NaN input rows and non-finite examples in the data: the loop is traced
  again with its rare paths (dynamic shapes), compute_loss and its gradient
  under XLA."""
  # 15 steps: one pass over the 16 batches, each fault once.
  plain, r_plain = _fit(tmp_path, False, cls=Dirty, **{"train.steps": 15})
  xla, r_xla = _fit(tmp_path, True, cls=Dirty, **{"train.steps": 15})
  loop = xla.parts.compiled.loop
  assert not loop.lean and not loop.jit_step
  assert _xla_functions(xla), "compute_loss is compiled"
  assert all("AssignAddVariableOp" not in ops for ops in _xla_functions(xla))
  assert (
    _incidents(r_xla)
    == _incidents(r_plain)
    == [
      (7, "nonfinite_inputs", "dropped_rows"),
      (12, "nonfinite_loss", "dropped_examples"),
    ]
  )
  assert r_xla.examples_dropped == r_plain.examples_dropped == 3
  for a, b in zip(plain.model.get_weights(), xla.model.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_is_xla_with_a_gpu_only(monkeypatch):
  assert safetrain.default_config().train.jit_compile is None
  assert trainer_lib.jit_compile(True) is True and trainer_lib.jit_compile(False) is False
  monkeypatch.setattr(trainer_lib.tf.config, "list_logical_devices", lambda kind=None: [])
  assert trainer_lib.jit_compile(None) is False
  monkeypatch.setattr(trainer_lib.tf.config, "list_logical_devices", lambda kind=None: ["GPU:0"])
  assert trainer_lib.jit_compile(None) is True
