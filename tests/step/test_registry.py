"""The guard pieces' declarations and what is derived from them: kind codes,
sums, the step's classification (table-driven, on tensors), config keys."""

import os
import re

import pytest
import tensorflow as tf
from common import ROOT

import safetrain
from safetrain.core import kinds
from safetrain.recovery import health
from safetrain.step import guard, piece, registry
from safetrain.step.clipping import GradientClip
from safetrain.step.loss_scale import DynamicLossScale, LossScalePiece
from safetrain.step.loss_watch import LossWatchPiece, SpikeDetector


def test_every_piece_is_found_in_its_own_module_and_declares_once():
  names = [p.name for p in registry.PIECES]
  assert {
    "inputs",
    "finite",
    "loss_scale",
    "per_example",
    "loss_watch",
    "clip",
    "bad_batches",
  } <= set(names)
  assert len(names) == len(set(names))
  orders = [p.order for p in registry.PIECES]
  assert orders == sorted(orders)
  # Codes are positions in the derived tuple, every kind once.
  assert len(registry.KINDS) == len(set(registry.KINDS))
  assert [registry.code(k) for k in registry.KINDS] == list(range(len(registry.KINDS)))
  # The input check's kinds first (its conditions rank first), then the loss's.
  assert registry.KINDS[:5] == (
    "nonfinite_inputs",
    "bad_labels",
    "bad_shapes",
    "nonfinite_loss",
    "nonfinite_grads",
  )
  assert not {"bad_labels", "bad_shapes"} & set(registry.DIVERGING + registry.BATCH_BOUND)
  assert {"nonfinite_loss", "nonfinite_grads"} <= set(registry.BATCH_BOUND)
  assert "nonfinite_inputs" not in registry.DIVERGING
  assert registry.SUMS[:2] == ("loss", "norm") and "dropped_rows" in registry.SUMS
  for kind in registry.KINDS:
    assert kind in kinds.declared() and registry.owner(kind).kinds


def test_a_kind_declared_twice_differently_is_refused():
  kinds.declare(kinds.declared()["nonfinite_loss"])  # the same declaration again is fine
  with pytest.raises(ValueError, match="declared twice"):
    kinds.declare(kinds.Kind("nonfinite_loss", "another text", "#000000"))


def test_every_config_key_a_piece_declares_exists():
  config = safetrain.default_config()
  for p in registry.PIECES:
    for key in p.config_keys:
      node = config
      for part in key.split("."):
        assert part in node, (p.name, key)
        node = node[part]


def _step(*, loss=1.0, grads_finite=True, skip=False, carried=None):
  s = piece.Step(batch=None, ctx=None, attempt=tf.constant(1, tf.int64), carried=carried or {})
  s.loss, s.grads_finite, s.skip = tf.constant(loss), tf.constant(grads_finite), tf.constant(skip)
  s.findings["inputs"] = None
  return s


class _Skip(piece.Piece):
  """The input check's condition alone (its hook needs a batch)."""

  name, order = "inputs", 10

  def conditions(self, step):
    return [piece.Condition(10, kinds.SKIPPED_BATCH, "nonfinite_inputs", step.skip)]


def _pieces(*, fp16=False, at_floor=False, spike_mean=None):
  ps = [_Skip(), guard.FinitePiece(fp16=fp16)]
  if fp16:
    scale = DynamicLossScale(initial=1.0 if at_floor else 2.0**15, min_scale=1.0)
    ps.append(LossScalePiece(scale))
  detector = SpikeDetector(enabled=True, warmup_steps=1, threshold=10.0, growth_factor=100.0)
  ps.append(LossWatchPiece(detector))
  stats = (
    tf.zeros([5])
    if spike_mean is None
    else tf.constant([spike_mean, 0.0, 5.0, spike_mean, spike_mean])
  )
  return registry.Pieces(ps), {"loss_watch": stats}


NAN, INF = float("nan"), float("inf")
TABLE = [
  # (case, fp16, at_floor, loss, grads finite, inputs skipped, spike mean) -> (class, kind)
  ("clean", False, False, 1.0, True, False, None, "good", None),
  ("inputs first", False, False, NAN, False, True, None, "skipped_batch", "nonfinite_inputs"),
  ("nan loss", False, False, NAN, False, False, None, "divergence", "nonfinite_loss"),
  ("inf loss", True, False, INF, False, False, None, "divergence", "nonfinite_loss"),
  ("grads", False, False, 1.0, False, False, None, "divergence", "nonfinite_grads"),
  ("fp16 overflow", True, False, 1.0, False, False, None, "overflow", None),
  ("fp16 floor", True, True, 1.0, False, False, None, "divergence", "loss_scale_floor"),
  ("spike", False, False, 50.0, True, False, 1.0, "divergence", "loss_spike"),
  ("a blow-up is a spike first", False, False, 500.0, True, False, 1.0, "divergence", "loss_spike"),
  ("below spike", False, False, 3.0, True, False, 1.0, "good", None),
]


@pytest.mark.parametrize("case", TABLE, ids=[t[0] for t in TABLE])
def test_the_first_condition_that_holds_classifies_the_step(case):
  _, fp16, at_floor, loss, finite, skip, mean, want_class, want_kind = case
  pieces, carried = _pieces(fp16=fp16, at_floor=at_floor, spike_mean=mean)
  step_class, kind = pieces.classify(
    _step(loss=loss, grads_finite=finite, skip=skip, carried=carried)
  )
  assert kinds.CLASSES[int(step_class)] == want_class
  assert (None if int(kind) == kinds.NO_KIND else registry.KINDS[int(kind)]) == want_kind


def test_growth_classifies_when_spike_detection_is_off():
  detector = SpikeDetector(enabled=False, growth_factor=100.0)
  pieces = registry.Pieces([guard.FinitePiece(fp16=False), LossWatchPiece(detector)])
  stats = tf.constant([1.0, 0.0, 5.0, 1.0, 1.0])
  _, kind = pieces.classify(_step(loss=500.0, carried={"loss_watch": stats}))
  assert registry.KINDS[int(kind)] == "loss_growth"


def test_pieces_the_config_turns_off_are_not_built():
  c = safetrain.default_config()
  c.guard.check_inputs = False
  c.guard.drop_examples = False
  ctx = piece.BuildContext(
    leaf_names=("x",),
    loss_scale=DynamicLossScale(enabled=False),
    spike=SpikeDetector(enabled=False, growth_factor=0.0),
    clip=GradientClip(mode="fixed", global_norm=0.0),
  )
  built = [p.name for p in registry.build(c, ctx)]
  assert built == ["finite", "bad_batches"]


def test_the_workdir_page_lists_every_kind_with_its_declared_text():
  """docs/workdir.md's table of kinds is the declaration's, kind for kind."""
  page = open(os.path.join(ROOT, "docs", "workdir.md")).read()
  rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", page, re.M))
  declared = set(registry.KINDS) | {k.name for k in health.KINDS}
  assert declared <= set(rows), declared - set(rows)
  for name in declared:
    assert rows[name].strip() == kinds.text(name), name
