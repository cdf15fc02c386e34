"""The benchmarks run: each contender of each benchmark for a step or two, so
none of them rots when the library changes (their timings are not asserted)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import bench_distribute  # noqa: E402
import bench_fit  # noqa: E402
import bench_step  # noqa: E402


def test_bench_step_contenders_run(tmp_path):
  safe, _ = bench_step.safe_loop(2, str(tmp_path / "safe"))
  hand = bench_step.hand_loop(2)
  for run in (hand, safe, bench_step.keras_fit(2)):
    assert run() > 0 and bench_step.body_nodes(run.graph) > 0
  assert bench_step.body_nodes(hand.graph) < bench_step.body_nodes(safe.graph)


def test_bench_fit_contenders_run_and_count_loop_nodes():
  nodes = {}
  for name, fit in (
    ("hand", bench_fit.hand_fit),
    ("safe", bench_fit.safe_fit),
    ("keras", bench_fit.keras_fit),
  ):
    seconds, nodes[name] = fit(bench_fit.STEPS_PER_LOOP)
    assert seconds > 0
  # Each loop body has the model's forward and backward pass at least; the
  # guarded one has more than the hand loop.
  assert 0 < nodes["hand"] < nodes["safe"] and nodes["keras"] > 0


@pytest.mark.parametrize("strategy", ["mirrored"])
def test_bench_distribute_safe_loop_runs(strategy, tmp_path):
  run, _ = bench_distribute.safe_loop(strategy, 2, str(tmp_path))
  assert run() > 0
