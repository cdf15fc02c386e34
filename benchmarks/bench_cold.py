"""Cold start as a user meets it: each contender's first `fit()` in a fresh
process, after the imports.

A user launches one run per process (and every resume is a new one), so the
first trace of the compiled loop, the first graph optimisation and the
first steps are paid every time; an in-process benchmark (bench_fit.py)
hides most of that behind caches warmed by the contender before it. Here
every run is its own `python` process; contenders alternate, and the
median of `--runs` is reported with the spread.

  safe    `Trainer(config, workdir).fit()` at default settings;
  keras   `model.compile(steps_per_execution=...)` + `model.fit` with
          `global_clipnorm=1.0` and `TerminateOnNaN`.

Models: the MLP of bench_step.py (64-256-256-1, batch 256, Adam, 100 steps
per loop, 200 steps) and keras.applications.MobileNetV2 at 32x32, 10
classes (batch 32, 10 steps per loop, 20 steps). For safetrain the child
also splits its time: build (hooks, model, optimizer, first batch), the
trace of the guarded loop, the first graph optimisation (the first loop
call less the trace and less a later loop call's run time), the loops'
run time, and the rest (checkpoints, summaries, the host between loops).

  .venv/bin/python benchmarks/bench_cold.py [--runs 3] [--model mlp|conv|both]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {
  # name: (steps, steps per loop, batch)
  "mlp": (200, 100, 256),
  "conv": (20, 10, 32),
}
TARGET = 1.3
DEVICES = (
  "import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'; import tensorflow as tf; "
  "print(', '.join(d.device_type for d in tf.config.list_physical_devices()))"
)


def child(contender: str, model: str) -> dict:
  """One cold fit() in this (fresh) process; the times, in seconds."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, HERE)
  import keras
  import tensorflow as tf
  from absl import logging
  from bench_step import (
    BenchTrainer,
    ConvTrainer,
    bench_config,
    conv_config,
    make_conv_dataset,
    make_conv_model,
    make_dataset,
    make_model,
  )

  from safetrain.step import loop as step_lib

  logging.set_verbosity(logging.WARNING)
  steps, per_loop, batch = MODELS[model]
  t0 = time.perf_counter()
  if contender == "keras":
    net = make_model() if model == "mlp" else make_conv_model()
    net.compile(
      optimizer=keras.optimizers.Adam(1e-3, global_clipnorm=1.0),
      loss="mse" if model == "mlp" else "sparse_categorical_crossentropy",
      steps_per_execution=per_loop,
    )
    data = make_dataset() if model == "mlp" else make_conv_dataset(batch)
    net.fit(
      data,
      epochs=1,
      steps_per_epoch=steps,
      verbose=0,
      callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    return {"total": time.perf_counter() - t0}

  times = {"trace": 0.0, "loops": []}
  call = step_lib.GuardedLoop.__call__

  def timed(loop, iterator, n):
    if not times["loops"]:
      t = time.perf_counter()
      loop.function.get_concrete_function(iterator, tf.constant(n, tf.int64))
      times["trace"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
      return call(loop, iterator, n)
    finally:
      times["loops"].append(time.perf_counter() - t)

  step_lib.GuardedLoop.__call__ = timed
  if model == "mlp":
    config, cls = bench_config(steps, per_loop, batch), BenchTrainer
  else:
    config, cls = conv_config(steps, per_loop, batch), ConvTrainer
  config.train.log_every_steps = 100  # the defaults, not the in-process bench's
  config.checkpoint.every_steps = 1000
  with tempfile.TemporaryDirectory() as workdir:
    trainer = cls(config, workdir)
    t = time.perf_counter()
    trainer.build()
    build = time.perf_counter() - t
    result = trainer.fit()
  total = time.perf_counter() - t0
  assert result.step == steps and not result.incidents, result
  loops = times["loops"]
  later = statistics.median(loops[1:]) if len(loops) > 1 else 0.0
  # The first call (after the trace) optimises the graph, then runs a loop
  # as long as a later call does.
  first_opt = max(loops[0] - later, 0.0)
  return {
    "total": total,
    "build": build,
    "trace": times["trace"],
    "first graph optimisation": first_opt,
    "loop runs": sum(loops) - first_opt,
    "rest": total - build - times["trace"] - sum(loops),
  }


def run_child(contender: str, model: str) -> dict:
  out = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--child", contender, "--model", model],
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def report(model: str, runs: int) -> float:
  """Runs and prints one model's cold starts; returns safe / keras."""
  got = {"safe": [], "keras": []}
  for r in range(runs):
    for contender in ("safe", "keras") if r % 2 == 0 else ("keras", "safe"):
      got[contender].append(run_child(contender, model))
  steps, per_loop, batch = MODELS[model]
  print(
    f"{model}: first fit() of {steps} steps ({per_loop} per loop, batch {batch}), fresh processes"
  )
  med = {}
  for contender, results in got.items():
    totals = [r["total"] for r in results]
    med[contender] = statistics.median(totals)
    print(f"  {contender:6s} {med[contender]:6.2f} s  [{min(totals):.2f}..{max(totals):.2f}]")
  for part in ("build", "trace", "first graph optimisation", "loop runs", "rest"):
    values = [r[part] for r in got["safe"]]
    print(f"    safe {part:26s} {statistics.median(values):6.2f} s")
  ratio = med["safe"] / med["keras"]
  print(f"  cold start safe / keras = {ratio:.2f}   target <= {TARGET}")
  return ratio


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--model", choices=("mlp", "conv", "both"), default="both")
  p.add_argument("--child", choices=("safe", "keras"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.model)))
    return
  devices = subprocess.run(
    [sys.executable, "-c", DEVICES], capture_output=True, text=True, check=True
  ).stdout.strip()
  print(f"devices: {devices}; safetrain's train.jit_compile at its default")
  for model in ("mlp", "conv") if args.model == "both" else (args.model,):
    report(model, args.runs)


if __name__ == "__main__":
  main()
