"""The benchmarks run: each contender of each benchmark for a step or two, so
none of them rots when the library changes (their timings are not asserted)."""

import functools
import os
import sys

import pytest
from common import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_distribute  # noqa: E402
import bench_fit  # noqa: E402
import bench_models  # noqa: E402
import bench_step  # noqa: E402


def test_bench_step_contenders_run(tmp_path):
  safe, _ = bench_step.safe_loop(2, str(tmp_path / "safe"))
  hand = bench_step.hand_loop(2)
  floor = bench_step.floor_loop(2)
  for run in (hand, floor, safe, bench_step.keras_fit(2)):
    assert run() > 0 and bench_step.body_nodes(run.graph) > 0
  nodes = [bench_step.body_nodes(run.graph) for run in (hand, floor, safe)]
  assert nodes == sorted(nodes), nodes  # the floor guards more than hand, less than safe


def test_bench_step_prices_guard_pieces_with_valid_configs(tmp_path):
  """Each --pieces variant is a valid config whose loop runs, and turning all
  three pieces off leaves fewer nodes than the full guard."""
  nodes = {}
  for name in ["full"] + list(bench_step.PIECES):
    full = name == "full"
    config = bench_step.bench_config(10**6, 2) if full else bench_step.pieces_config(name, 2)
    run, _ = bench_step.safe_loop(2, str(tmp_path / str(len(nodes))), config=config)
    assert run() > 0
    nodes[name] = bench_step.body_nodes(run.graph)
  assert nodes["-all three"] < min(v for k, v in nodes.items() if k != "-all three")


# Data-dependent branches in safetrain's loop body (bench_fit's MLP at the
# defaults, a clean run: the lean loop, no rare path built), measured
# 2026-12-03. Under train.skip_update=select (auto's choice with a GPU or
# XLA), 0: the input check sanitises by select, the lean loop has no rerun,
# finite_and_norm and the naming of dropped rows select, the divergent batch
# is carried by select and stashed after the loop. The cond form (auto's
# choice on a CPU) has 6: the input check's stand-in, the apply-or-skip,
# finite_and_norm's non-finite-norm path and its rescaled norm, the naming
# of dropped rows, the stash. With the rare paths built (after a batch
# needed one) they are 7 and 11, as before the lean loop. Keras fit's body
# has 2, the hand loop 0. On a GPU each waits for its predicate on the host;
# the budgets keep new pieces from adding to them unseen.
SAFE_BRANCH_BUDGET = 6
SELECT_BRANCH_BUDGET = 0


def test_bench_fit_contenders_run_and_count_loop_nodes_and_branches():
  nodes, branches = {}, {}
  select = functools.partial(bench_fit.safe_fit, **{"train.skip_update": "select"})
  for name, fit in (
    ("hand", bench_fit.hand_fit),
    ("safe", bench_fit.safe_fit),
    ("keras", bench_fit.keras_fit),
    ("select", select),
  ):
    seconds, nodes[name] = fit(bench_fit.STEPS_PER_LOOP)
    assert seconds > 0
    branches[name] = bench_step.body_branches(getattr(fit, "func", fit).last_graph)
  # Each loop body has the model's forward and backward pass at least; the
  # guarded one has more than the hand loop.
  assert 0 < nodes["hand"] < nodes["safe"] and nodes["keras"] > 0
  assert branches["hand"] == 0  # a plain step: no data-dependent branch
  assert branches["keras"] >= 0
  assert 0 < branches["safe"] <= SAFE_BRANCH_BUDGET, branches
  assert branches["select"] < branches["safe"] and branches["select"] <= SELECT_BRANCH_BUDGET
  # A GPU's clean guarded step waits on nothing but the loop's own condition.
  assert branches["select"] == 0


def test_bench_fit_splits_safetrains_time_between_loop_saves_and_host(capsys):
  """The split counts every loop call and save of a fit(), and prints them."""
  steps = 3 * bench_fit.STEPS_PER_LOOP
  splits = []
  for n in (bench_fit.STEPS_PER_LOOP, steps):
    total, _ = bench_fit.safe_fit(n, **{"checkpoint.every_steps": bench_fit.STEPS_PER_LOOP})
    splits.append((total, bench_fit.safe_fit.last_split))
  (short_t, short), (long_t, long) = splits
  assert (short.loops, long.loops) == (1, 3)
  # The step-0 checkpoint, then one at every loop's end (the final save is
  # the same step: not written again).
  assert (short.saves, long.saves) == (2, 4)
  assert 0 < long.loop < long_t and 0 < long.save < long_t
  bench_fit.print_split([(long_t - short_t, long, short)], steps - bench_fit.STEPS_PER_LOOP)
  assert "compiled loop" in capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["mirrored"])
def test_bench_distribute_safe_loop_runs(strategy, tmp_path):
  run, _ = bench_distribute.safe_loop(strategy, 2, str(tmp_path))
  assert run() > 0


@pytest.mark.slow  # two fresh processes, ~17 s: the suite's 10 minutes
def test_bench_cold_runs_each_contender_in_a_fresh_process():
  """The cold-start benchmark's children: one fit() each, in a new process,
  with safetrain's time split into parts that add up to the total."""
  import bench_cold

  keras_run = bench_cold.run_child("keras", "mlp")
  safe = bench_cold.run_child("safe", "mlp")
  assert keras_run["total"] > 0
  parts = ("build", "trace", "first graph optimisation", "loop runs", "rest")
  assert all(safe[p] >= 0 for p in parts) and safe["trace"] > 0
  assert abs(sum(safe[p] for p in parts) - safe["total"]) < 1e-6


def test_bench_models_builds_each_model_on_its_data_and_refuses_unknown_names():
  """The GPU matrix's pieces, cheaply: each model takes its synthetic batch
  and gives the shape its loss expects (the fits themselves: the slow test)."""
  for model in bench_models.MODELS:
    net = bench_models.build(model, image=32)
    x, y = next(iter(bench_models.dataset(model, image=32, batch=2)))
    out = net(x)
    assert out.shape[0] == 2 and out.shape[-1] == (
      bench_models.VOCAB if model == "transformer" else 10
    )
    assert y.shape[:1] == (2,)
  with pytest.raises(SystemExit, match="resnet9"):
    bench_models.main(["--models", "resnet9"])


@pytest.mark.slow
def test_bench_models_runs_the_transformer_in_both_precisions():
  rows = bench_models.main(
    "--models transformer --short 2 --long 4 --batch 8 --steps-per-loop 2".split()
  )
  assert [(r["model"], r["precision"]) for r in rows] == [
    ("transformer", "float32"),
    ("transformer", "mixed_float16"),
  ]


def test_bench_fit_measures_xla_forced_on_and_off():
  """--xla adds the whole guarded step under XLA and the step without it,
  whatever auto chooses on the machine (a GPU's default is XLA)."""
  assert bench_fit.parser().parse_args(["--xla"]).xla
  assert not bench_fit.parser().parse_args([]).xla
