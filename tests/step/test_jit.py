"""train.jit_compile: compute_loss and its gradient compiled with XLA."""

import numpy as np
from common import TinyTrainer, tiny_config


def _xla_calls(trainer) -> int:
  """Function calls in the traced loop that XLA must compile."""
  graph = trainer.parts.compiled.loop.function._list_all_concrete_functions()[0].graph
  library = graph.as_graph_def().library.function
  return sum(
    1
    for f in library
    for node in f.node_def
    if node.attr.get("_XlaMustCompile") is not None and node.attr["_XlaMustCompile"].b
  )


def _fit(tmp_path, jit: bool):
  c = tiny_config(**{"train.steps": 30, "train.steps_per_loop": 5, "train.jit_compile": jit})
  c.drill.loss_steps = "13-15"  # a divergence: rollback and backoff, under XLA too
  t = TinyTrainer(c, str(tmp_path / str(jit)))
  return t, t.fit()


def test_xla_trains_the_same_weights_and_recovers_the_same_way(tmp_path):
  plain, r_plain = _fit(tmp_path, False)
  xla, r_xla = _fit(tmp_path, True)
  assert _xla_calls(plain) == 0 and _xla_calls(xla) >= 1
  assert (r_xla.step, r_xla.rollbacks, r_xla.lr_scale) == (30, 1, 0.5)
  assert [i["kind"] for i in r_xla.incidents] == [i["kind"] for i in r_plain.incidents]
  for a, b in zip(plain.model.get_weights(), xla.model.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert xla.parts.compiled.loop.function.experimental_get_tracing_count() == 1


def test_xla_drops_non_finite_examples_and_reruns_the_step_on_the_rest(tmp_path):
  """The rerun on the kept rows has a batch of another size: XLA compiles it
  for that shape, and the step trains on the rest of the batch."""
  c = tiny_config(**{"train.steps": 10, "train.jit_compile": True})
  c.drill.loss_steps, c.drill.loss_rows = "4,7", 3
  t = TinyTrainer(c, str(tmp_path))
  r = t.fit()
  assert r.step == 10 and r.rollbacks == 0 and r.skipped_steps == 0
  assert r.examples_dropped == 6
  assert all(np.isfinite(w).all() for w in t.model.get_weights())
