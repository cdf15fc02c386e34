"""What a user pays end to end: `Trainer(config, workdir).fit()` against the
loop they would otherwise run, through the public API, start-up included.

Three contenders train the MLP of bench_step.py (64-256-256-1, batch 256,
Adam 1e-3, global-norm clipping at 1.0, float32, 100 steps per host sync):

  hand    a careful user's loop: build the model and optimizer, a
          tf.function running 100 steps (tf.clip_by_global_norm,
          apply_gradients), an eager Python loop calling it and reading the
          loss once per call;
  safe    `Trainer(config, workdir).fit()` at default settings (every guard
          on: input check, classification, NaN-safe clipping, spike
          detection; checkpoints, metrics.jsonl and TensorBoard summaries);
  keras   `model.compile(steps_per_execution=100)` + `model.fit` with
          `global_clipnorm=1.0` and `TerminateOnNaN`.

Each contender is built from scratch and run for two lengths (--short and
--long steps); the difference divided by the difference in steps is the
per-step cost with start-up cancelled; the short run is the start-up cost.
Rounds are interleaved in a rotating order, and the ratios are taken both of
the medians and as the median of each round's own ratio (less sensitive to a
load that drifts over minutes). The spread (min..max) is printed: on a shared
machine a 3% effect is only real when it is larger than the spread.

It also prints the number of graph nodes in each compiled loop's body, the
per-step op budget the guard adds.

  .venv/bin/python benchmarks/bench_fit.py [--rounds 3] [--short 200] [--long 8200] [--breakdown]
      [--select] [--xla] [--cold] [--clock cpu --threads 1]

--breakdown adds safetrain runs with one checkpoint only (at the end), then
also spike detection off, then also the input check off: the end-to-end cost
of each piece; and one with train.jit_compile (XLA) at defaults otherwise.
--xla adds safetrain with train.jit_compile forced on (the whole guarded
step one XLA program; auto's choice on a GPU) and forced off.
--select adds safetrain with train.skip_update=select (the branchless
apply-or-skip, auto's choice on a GPU) beside the default (auto: the cond on
a CPU), and prints their ratio.
"""

import argparse
import contextlib
import functools
import gc
import math
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402
from bench_step import (  # noqa: E402
  BenchTrainer,
  body_branches,
  body_nodes,
  keras_graph,
  make_dataset,
  make_model,
)

import safetrain  # noqa: E402
from safetrain import trainer as trainer_lib  # noqa: E402
from safetrain.checkpoint import store as checkpointing  # noqa: E402
from safetrain.step import loop as step_lib  # noqa: E402

STEPS_PER_LOOP = 100
# Wall time, or with --clock=cpu this process's CPU time (every thread:
# tf.data's included), which other processes on a shared machine disturb less.
clock = time.perf_counter


def spread(values, scale: float = 1.0, fmt: str = ".3f") -> str:
  return f"[{min(values) * scale:{fmt}}..{max(values) * scale:{fmt}}]"


def hand_fit(steps: int) -> tuple[float, int]:
  t = clock()
  model = make_model()
  opt = keras.optimizers.Adam(1e-3)
  opt.build(model.trainable_variables)
  it = iter(make_dataset())

  @tf.function
  def loop(n):
    loss = tf.constant(0.0)
    for _ in tf.range(n):
      x, y = next(it)
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
      grads = tape.gradient(loss, model.trainable_variables)
      grads, _ = tf.clip_by_global_norm(grads, 1.0)
      opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  n = tf.constant(STEPS_PER_LOOP)
  for _ in range(steps // STEPS_PER_LOOP):
    loss = float(loop(n).numpy())
  assert math.isfinite(loss)
  dt = clock() - t
  hand_fit.last_graph = loop.get_concrete_function(n).graph
  return dt, body_nodes(hand_fit.last_graph)


def keras_fit(steps: int) -> tuple[float, int]:
  t = clock()
  model = make_model()
  model.compile(
    optimizer=keras.optimizers.Adam(1e-3, global_clipnorm=1.0),
    loss="mse",
    steps_per_execution=STEPS_PER_LOOP,
  )
  model.fit(
    make_dataset(),
    epochs=1,
    steps_per_epoch=steps,
    verbose=0,
    callbacks=[keras.callbacks.TerminateOnNaN()],
  )
  dt = clock() - t
  graph = keras_fit.last_graph = keras_graph(model)
  return dt, body_nodes(graph) if graph is not None else 0


class Split:
  """Where a safetrain fit() spends its time: inside the calls of the
  compiled loop (its `.numpy()` of the report included), in checkpoint saves,
  and everything else (start-up, and the host's work between loops)."""

  def __init__(self):
    self.loop = self.save = 0.0
    self.loops = self.saves = 0

  @classmethod
  @contextlib.contextmanager
  def watching(cls):
    split = cls()
    call, save = step_lib.GuardedLoop.__call__, checkpointing.CheckpointStore.save

    def timed(fn, seconds: str, calls: str):
      def wrapper(obj, *args):
        t = clock()
        try:
          return fn(obj, *args)
        finally:
          setattr(split, seconds, getattr(split, seconds) + clock() - t)
          setattr(split, calls, getattr(split, calls) + 1)

      return wrapper

    step_lib.GuardedLoop.__call__ = timed(call, "loop", "loops")
    checkpointing.CheckpointStore.save = timed(save, "save", "saves")
    try:
      yield split
    finally:
      step_lib.GuardedLoop.__call__ = call
      checkpointing.CheckpointStore.save = save


def safe_fit(steps: int, **overrides) -> tuple[float, int]:
  config = safetrain.default_config()
  config.trainer = "BenchTrainer"
  config.train.steps = steps
  config.train.batch_size = 256
  config.train.steps_per_loop = STEPS_PER_LOOP
  config.guard.preflight = "off"  # an eager replay of step 1: start-up only
  config.optimizer.learning_rate = 1e-3
  for key, value in overrides.items():
    group, name = key.split(".")
    setattr(config[group], name, value(steps) if callable(value) else value)
  with tempfile.TemporaryDirectory() as workdir, Split.watching() as split:
    t = clock()
    trainer = BenchTrainer(config, workdir)
    result = trainer.fit()
    dt = clock() - t
  safe_fit.last_split = split
  assert result.step == steps and not result.incidents, result
  fn = trainer.parts.compiled.loop.function
  graph = safe_fit.last_graph = fn._list_all_concrete_functions()[0].graph
  return dt, body_nodes(graph)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--short", type=int, default=200)
  p.add_argument("--long", type=int, default=8200)
  p.add_argument(
    "--breakdown",
    action="store_true",
    help="also safetrain with one checkpoint (at the end), then spike detection, then the "
    "input check off: what each costs",
  )
  p.add_argument(
    "--xla",
    action="store_true",
    help="also safetrain with train.jit_compile forced on and off",
  )
  p.add_argument(
    "--select",
    action="store_true",
    help="also safetrain with train.skip_update=select (the branchless apply-or-skip)",
  )
  p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
  p.add_argument(
    "--cold",
    action="store_true",
    help="also time each contender's first fit() in a fresh process (bench_cold.py, MLP)",
  )
  p.add_argument("--threads", type=int, default=0, help="TF intra- and inter-op threads (0: TF's)")
  return p


def main():
  args = parser().parse_args()
  if args.threads:
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
  devices = ", ".join(
    f"{d.device_type}:{d.name.split(':')[-1]}" for d in tf.config.list_physical_devices()
  )
  skip = trainer_lib.skip_update("auto", jit_compile=safetrain.default_config().train.jit_compile)
  print(
    f"devices: {devices}; safetrain's train.jit_compile at its default, "
    f"train.skip_update=auto: {skip}"
  )
  measure(args)
  if args.cold:
    import bench_cold  # noqa: PLC0415 - only for --cold

    bench_cold.report("mlp", args.rounds)


def measure(args) -> None:
  """fit() end to end, as `args` (see `parser`) ask; prints the table."""
  global clock
  clock = time.process_time if args.clock == "cpu" else time.perf_counter
  logging.set_verbosity(logging.WARNING)
  runs = {"hand": hand_fit, "safe": safe_fit, "keras": keras_fit}
  if args.select:
    runs["safe select"] = functools.partial(safe_fit, **{"train.skip_update": "select"})
  if args.breakdown:
    # Each guard piece turned off in turn, to price it end to end.
    one_save = {"checkpoint.every_steps": lambda steps: steps}
    runs["-ckpt"] = functools.partial(safe_fit, **one_save)
    runs["-ckpt-spike"] = functools.partial(
      safe_fit, **one_save, **{"guard.spike_detection": False}
    )
    runs["-ckpt-spike-input"] = functools.partial(
      safe_fit, **one_save, **{"guard.spike_detection": False, "guard.check_inputs": False}
    )
  if args.breakdown or args.xla:
    # The whole guarded step as one XLA program, and without (auto is XLA
    # on a GPU and not on a CPU: both are measured wherever this runs).
    runs["+xla"] = functools.partial(safe_fit, **{"train.jit_compile": True})
  if args.xla:
    runs["-xla"] = functools.partial(safe_fit, **{"train.jit_compile": False})
  names = list(runs)
  per_step = {k: [] for k in names}
  startup = {k: [] for k in names}
  ops, graphs = {}, {}
  splits = []  # safetrain's (long - short seconds, long Split, short Split) per round
  for name in names:  # warm the process (imports, first traces), untimed
    runs[name](STEPS_PER_LOOP)
  for r in range(args.rounds):
    order = names[r % len(names) :] + names[: r % len(names)]
    for name in order:
      lengths = (args.short, args.long) if r % 2 == 0 else (args.long, args.short)
      t, split = {}, {}
      for n in lengths:
        gc.collect()
        t[n], ops[name] = runs[name](n)
        fit = getattr(runs[name], "func", runs[name])  # a partial's function
        graphs[name] = getattr(fit, "last_graph", None)
        split[n] = getattr(safe_fit, "last_split", None)
      per_step[name].append((t[args.long] - t[args.short]) / (args.long - args.short))
      if name == "safe":
        splits.append((t[args.long] - t[args.short], split[args.long], split[args.short]))
      startup[name].append(t[args.short])
  med = {k: statistics.median(v) for k, v in per_step.items()}
  print(
    f"MLP 64-256-256-1, batch 256, Adam, fp32, {STEPS_PER_LOOP} steps per loop; fit() of "
    f"{args.long} minus fit() of {args.short} steps, {args.rounds} interleaved rounds, "
    f"{args.clock} time" + (f", {args.threads} TF thread(s)" if args.threads else "")
  )
  print(
    f"  {'contender':18s}  ms/step [min..max]      start-up s ({args.short} steps)  body nodes"
    "  branches"
  )
  for k in names:
    graph = graphs.get(k)
    branches = body_branches(graph) if graph is not None else 0
    print(
      f"  {k:18s}  {med[k] * 1e3:8.3f} {spread(per_step[k], 1e3):18s}  "
      f"{statistics.median(startup[k]):6.2f} {spread(startup[k], 1, '.2f'):18s}  {ops[k]:5d}"
      f"  {branches:8d}"
    )
  print(
    "  (branches: data-dependent If/Case/Switch/While ops in the loop body, nested ones "
    "included: on a GPU each waits for its predicate on the host)"
  )
  for other, target in (("hand", 0.97), ("keras", 1.05)):
    paired = statistics.median(o / s for o, s in zip(per_step[other], per_step["safe"]))
    print(
      f"  safe fit / {other:5s} = {med[other] / med['safe']:.3f} (medians), {paired:.3f} "
      f"(median of per-round ratios)   target >= {target}"
    )
  if args.select:
    pairs = zip(per_step["safe select"], per_step["safe"])
    paired = statistics.median(sel / cond for sel, cond in pairs)
    print(
      f"  safe select / safe (time a step) = {med['safe select'] / med['safe']:.3f} (medians), "
      f"{paired:.3f} (median of per-round ratios)"
    )
  print_split(splits, args.long - args.short)
  print(
    f"  start-up safe / keras = "
    f"{statistics.median(startup['safe']) / statistics.median(startup['keras']):.2f}   "
    "target <= 1.2"
  )


def print_split(splits: list, steps: int) -> None:
  """Where safetrain's per-step time goes, long run minus short run, so
  start-up cancels: inside the compiled loop, in checkpoint saves, and on
  the host between loops (medians over rounds)."""
  loop, save, host, per_save, per_loop = [], [], [], [], []
  for total, long, short in splits:
    loops, saves = long.loops - short.loops, long.saves - short.saves
    in_loop, in_save = long.loop - short.loop, long.save - short.save
    in_host = total - in_loop - in_save
    loop.append(in_loop / steps)
    save.append(in_save / steps)
    host.append(in_host / steps)
    per_save.append(in_save / max(saves, 1))
    per_loop.append(in_host / max(loops, 1))
  med = statistics.median
  print(
    f"  safe's ms/step: compiled loop {med(loop) * 1e3:.3f}, checkpoint saves "
    f"{med(save) * 1e3:.3f} ({med(per_save) * 1e3:.0f} ms a save), host between loops "
    f"{med(host) * 1e3:.3f} ({med(per_loop) * 1e3:.1f} ms a loop)"
  )


if __name__ == "__main__":
  main()
