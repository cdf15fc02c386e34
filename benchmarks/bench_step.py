"""Speed of the guarded step against the loops users would otherwise run.

Loops on the same model, the same data, the same initial weights and the
same number of steps per host sync (steps_per_loop), run interleaved for many
rounds on this machine; medians, spread, ratios and the graph nodes in
each loop's body (nested branches included) are printed:

  hand    the loop a careful user writes: steps_per_loop steps in one
          tf.function, tf.clip_by_global_norm, apply_gradients, nothing else;
  floor   (MLP) the hand loop with the least any guard does: the update
          skipped when an input, the loss or the gradient norm is not finite,
          the skips counted; the floor under a guard's cost;
  safe    safetrain's compiled inner loop with every guard on (input check,
          finiteness classification, NaN-safe clipping, spike detection);
  keras   model.fit with steps_per_execution=steps_per_loop,
          global_clipnorm=1.0 and TerminateOnNaN.

Two models: an MLP (64-256-256-1, batch 256), where a step costs about a
millisecond and the guard's fixed cost shows (with --only fit, or by default,
also `Trainer(config, workdir).fit()` end to end against the hand loop and
Keras fit: benchmarks/bench_fit.py), and a real convolutional model,
keras.applications.MobileNetV2 at 32x32 with 10 classes (batch 64, softmax
cross-entropy), where a step costs ~100 ms. For the MLP it also prints achieved
FLOP/s against a measured large-matmul peak, and the cost of recovery: fit()
with 3 injected divergences (3 rollbacks) against a clean fit() of the same
steps. --pieces adds safetrain's loop with one guard piece off at a time (the
spike and growth watch, the input check, per-example drops), then all three,
and prints what each saves a step. For MobileNetV2 it also measures end to
end through the public API: `Trainer(config, workdir).fit()` of two run
lengths, the difference divided by the difference in steps, so start-up
(build, tracing, checkpoints) cancels; Keras fit() likewise, on one compiled
model.

  .venv/bin/python benchmarks/bench_step.py [--rounds 15] [--steps_per_loop 100] [--pieces]
  .venv/bin/python benchmarks/bench_step.py --only fit [--fit_rounds 3] [--fit_steps 200,8200]
  .venv/bin/python benchmarks/bench_step.py --only conv [--conv_rounds 7] [--conv_fit_rounds 3]

On a machine other processes load, wall times swing by 2x from round to round;
--clock=cpu --threads=1 times each loop by this process's CPU time on one
TensorFlow thread, which measures the work a loop does rather than the share
of the cores it got.
"""

import argparse
import functools
import gc
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import safetrain  # noqa: E402

FEATURES, HIDDEN, BATCH = 64, 256, 256

# What the loops are timed with: wall time, or with --clock=cpu this
# process's CPU time, which other processes on a shared machine disturb less.
clock = time.perf_counter


def make_model(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential(
    [
      keras.Input((FEATURES,)),
      keras.layers.Dense(HIDDEN, activation="relu"),
      keras.layers.Dense(HIDDEN, activation="relu"),
      keras.layers.Dense(1),
    ]
  )


def make_dataset():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH * 64, FEATURES)).astype(np.float32)
  y = (x[:, :1] * 0.5 + rng.normal(size=(BATCH * 64, 1)) * 0.1).astype(np.float32)
  ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(BATCH, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


class BenchTrainer(safetrain.Trainer):
  def build_model(self):
    return make_model()

  def build_train_dataset(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * 64, FEATURES)).astype(np.float32)
    y = (x[:, :1] * 0.5 + rng.normal(size=(BATCH * 64, 1)) * 0.1).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)
    return ds


def bench_config(steps, steps_per_loop, batch=BATCH):
  c = safetrain.default_config()
  c.trainer = "BenchTrainer"
  c.train.steps = steps
  c.train.batch_size = batch
  c.train.steps_per_loop = steps_per_loop
  c.train.log_every_steps = steps
  c.checkpoint.every_steps = steps
  c.guard.preflight = "off"
  c.optimizer.learning_rate = 1e-3
  return c


# MobileNetV2 at 32x32: a real convolutional model whose step costs ~100 ms.


def make_conv_model(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)


def conv_arrays(batch):
  rng = np.random.default_rng(0)
  # MobileNetV2's preprocess_input maps pixels to [-1, 1].
  x = rng.uniform(-1.0, 1.0, size=(batch * 16, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, size=batch * 16).astype(np.int64)
  return x, y


def make_conv_dataset(batch):
  ds = tf.data.Dataset.from_tensor_slices(conv_arrays(batch))
  return ds.repeat().batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


class ConvTrainer(safetrain.Trainer):
  def build_model(self):
    return make_conv_model()

  def build_train_dataset(self):
    return make_conv_dataset(self.config.train.batch_size)


def conv_config(steps, steps_per_loop, batch):
  c = bench_config(steps, steps_per_loop, batch)
  c.trainer = "ConvTrainer"
  c.loss = "sparse_categorical_crossentropy"  # on MobileNetV2's softmax head
  return c


def hand_loop(steps_per_loop, model_fn=make_model, dataset_fn=make_dataset, loss="mse"):
  model = model_fn()
  opt = keras.optimizers.Adam(1e-3)
  opt.build(model.trainable_variables)
  loss_fn = keras.losses.get(loss)
  it = iter(dataset_fn())

  @tf.function
  def loop(n):
    for _ in tf.range(n):
      x, y = next(it)
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
      grads = tape.gradient(loss, model.trainable_variables)
      grads, _ = tf.clip_by_global_norm(grads, 1.0)
      opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  n = tf.constant(steps_per_loop)
  loop(n).numpy()  # trace and warm up

  def run():
    t = clock()
    loop(n).numpy()
    return clock() - t

  run.graph = loop.get_concrete_function(n).graph
  return run


def floor_loop(steps_per_loop, model_fn=make_model, dataset_fn=make_dataset, loss="mse"):
  """The hand loop with the least any per-step guard does: the update is
  skipped when an input, the loss or the gradient norm is not finite, and
  the skips are counted. No spike watch, no incident kinds, no per-example
  drops, no quarantine: what a guard costs at the very least in TensorFlow's
  executor, the floor under safetrain's cost."""
  model = model_fn()
  opt = keras.optimizers.Adam(1e-3)
  opt.build(model.trainable_variables)
  loss_fn = keras.losses.get(loss)
  it = iter(dataset_fn())

  def step(x, y):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    norm = tf.linalg.global_norm(grads)
    ok = tf.math.is_finite(loss) & tf.math.is_finite(norm)
    for t in (x, y):
      if t.dtype.is_floating:
        ok = ok & tf.reduce_all(tf.math.is_finite(t))
    factor = tf.minimum(1.0, 1.0 / tf.maximum(norm, 1e-30))

    def apply():
      opt.apply_gradients(zip([g * factor for g in grads], model.trainable_variables))
      return tf.constant(0)

    tf.cond(ok, apply, lambda: tf.constant(0))
    return loss, ok

  @tf.function
  def loop(n):
    loss, skipped = tf.constant(0.0), tf.constant(0)
    for _ in tf.range(n):
      x, y = next(it)
      loss, ok = step(x, y)
      skipped += 1 - tf.cast(ok, tf.int32)
    return loss, skipped

  n = tf.constant(steps_per_loop)
  loop(n)[0].numpy()  # trace and warm up

  def run():
    t = clock()
    _, skipped = loop(n)
    assert int(skipped.numpy()) == 0
    return clock() - t

  run.graph = loop.get_concrete_function(n).graph
  return run


def body_nodes(graph: tf.Graph) -> int:
  """Nodes in the largest `while` body of a traced loop, nested branches
  included: what one step executes at most."""
  library = {f.signature.name: f for f in graph.as_graph_def().library.function}

  def nodes(name, seen):
    if name in seen or name not in library:
      return 0
    seen.add(name)
    total = len(library[name].node_def)
    for node in library[name].node_def:
      for value in node.attr.values():
        if value.HasField("func"):
          total += nodes(value.func.name, seen)
        for f in value.list.func:
          total += nodes(f.name, seen)
    return total

  bodies = [n for n in library if "while_body" in n]
  return max((nodes(b, set()) for b in bodies), default=0)


# Ops whose branch is chosen by a tensor's value: their predicate must reach
# the host (on a GPU, a device-to-host copy) before the ops after them run.
BRANCH_OPS = ("If", "StatelessIf", "Case", "StatelessCase", "Switch", "While", "StatelessWhile")


def body_branches(graph: tf.Graph) -> int:
  """Data-dependent branch ops in the largest `while` body of a traced loop,
  nested functions included (each counted once): what a step may wait on."""
  library = {f.signature.name: f for f in graph.as_graph_def().library.function}

  def count(name, seen):
    if name in seen or name not in library:
      return 0, 0
    seen.add(name)
    fn = library[name]
    total = sum(node.op in BRANCH_OPS for node in fn.node_def)
    size = len(fn.node_def)
    for node in fn.node_def:
      for value in node.attr.values():
        names = [value.func.name] if value.HasField("func") else []
        for sub in names + [f.name for f in value.list.func]:
          b, n = count(sub, seen)
          total, size = total + b, size + n
    return total, size

  bodies = [count(n, set()) for n in library if "while_body" in n]
  return max(bodies, key=lambda bn: bn[1], default=(0, 0))[0]


def keras_graph(model) -> tf.Graph | None:
  """The graph of Keras's compiled multi-step train function (Keras wraps it
  in a plain Python closure)."""
  for cell in model.train_function.__closure__ or ():
    if hasattr(cell.cell_contents, "_list_all_concrete_functions"):
      return cell.cell_contents._list_all_concrete_functions()[0].graph
  return None


def safe_loop(steps_per_loop, workdir, trainer_cls=BenchTrainer, config=None):
  config = config or bench_config(10**6, steps_per_loop)
  trainer = trainer_cls(config, workdir)
  trainer.build()

  def call():
    # What fit() does every loop: one call, its output read once (a host sync).
    return trainer.parts.compiled.loop(trainer.parts.feed.iterator, steps_per_loop)

  call()

  def run():
    t = clock()
    out = call()
    dt = clock() - t
    assert int(out.applied) == steps_per_loop
    return dt

  run.graph = trainer.parts.compiled.loop.function._list_all_concrete_functions()[0].graph
  return run, trainer


def keras_model(steps_per_loop, model_fn=make_model, loss="mse"):
  model = model_fn()
  model.compile(
    optimizer=keras.optimizers.Adam(1e-3, global_clipnorm=1.0),
    loss=loss,
    steps_per_execution=steps_per_loop,
  )
  return model


def keras_fit(steps_per_loop, model_fn=make_model, dataset_fn=make_dataset, loss="mse"):
  model = keras_model(steps_per_loop, model_fn, loss)
  ds = dataset_fn()
  times = []

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.t = clock()

    def on_epoch_end(self, epoch, logs=None):
      times.append(clock() - self.t)

  cbs = [keras.callbacks.TerminateOnNaN(), Timer()]
  model.fit(ds, epochs=1, steps_per_epoch=steps_per_loop, verbose=0, callbacks=cbs)

  def run():
    model.fit(ds, epochs=1, steps_per_epoch=steps_per_loop, verbose=0, callbacks=cbs)
    return times[-1]

  run.graph = keras_graph(model)
  return run


def matmul_peak():
  n = 2048
  a = tf.random.normal((n, n))
  b = tf.random.normal((n, n))

  @tf.function
  def mm(k):
    acc = tf.zeros((n, n))
    for _ in tf.range(k):
      acc += tf.matmul(a, b)
    return acc

  mm(tf.constant(1)).numpy()
  best = 0.0
  for _ in range(5):
    t = time.perf_counter()
    mm(tf.constant(10))[0, 0].numpy()
    best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t))
  return best


def step_flops():
  fwd = 2 * (FEATURES * HIDDEN + HIDDEN * HIDDEN + HIDDEN * 1)
  return 3 * fwd * BATCH  # forward + backward (two matmuls per layer)


def recovery_cost(steps, steps_per_loop, rounds):
  """fit() with 3 injected divergences against a clean fit() of the same steps."""
  times = {"clean": [], "3 divergences": []}
  traces, attempts = {}, {}
  for _ in range(rounds):
    for name in times:
      c = bench_config(steps, steps_per_loop)
      c.checkpoint.every_steps = steps // 4
      if name != "clean":
        a, b, d = steps // 4 + 10, steps // 2 + 10, 3 * steps // 4 + 10
        c.drill.loss_steps = f"{a}-{a + 2},{b}-{b + 2},{d}-{d + 2}"
      with tempfile.TemporaryDirectory() as wd:
        trainer = BenchTrainer(c, wd)
        trainer.build()
        t = time.perf_counter()
        r = trainer.fit()
        times[name].append(time.perf_counter() - t)
        traces[name] = trainer.parts.compiled.loop.function.experimental_get_tracing_count()
        attempts[name] = r.attempts
        assert r.rollbacks == (0 if name == "clean" else 3), r.rollbacks
  return {k: statistics.median(v) for k, v in times.items()}, traces, attempts


def spread(values) -> str:
  return f"[{min(values) * 1e3:.0f}..{max(values) * 1e3:.0f}]"


def conv_bench(args) -> None:
  """MobileNetV2: the compiled loops, then fit() end to end."""
  batch, spl = args.conv_batch, args.conv_steps_per_loop
  model_fn = make_conv_model
  dataset_fn = functools.partial(make_conv_dataset, batch)
  loss = "sparse_categorical_crossentropy"
  with tempfile.TemporaryDirectory() as wd:
    runs = {
      "hand": hand_loop(spl, model_fn, dataset_fn, loss),
      "safe": safe_loop(spl, wd, ConvTrainer, conv_config(10**6, spl, batch))[0],
      "keras": keras_fit(spl, model_fn, dataset_fn, loss),
    }
    names = list(runs)
    # Building each contender seeded the RNGs, which clears TensorFlow's
    # kernel cache (see below): one untimed call each brings all three back.
    for run in runs.values():
      run()
    per_step = {k: [] for k in runs}
    for r in range(args.conv_rounds):
      # Interleaved, and in a rotating order, so noise and order hit all alike.
      for name in names[r % 3 :] + names[: r % 3]:
        per_step[name].append(runs[name]() / spl)
  med = {k: statistics.median(v) for k, v in per_step.items()}
  print(
    f"MobileNetV2 32x32x3, 10 classes, batch {batch}, float32, steps_per_loop {spl}, "
    f"{args.conv_rounds} interleaved rounds: compiled loop, ms per step, median [min..max]"
  )
  for k in names:
    print(f"  {k:6s} {med[k] * 1e3:7.1f} {spread(per_step[k])}")
  # Speed ratios, of the medians and, less sensitive to the load of other
  # processes drifting over minutes, the median of each round's own ratio.
  for other, target in (("hand", 0.99), ("keras", 1.0)):
    paired = statistics.median(o / s for o, s in zip(per_step[other], per_step["safe"]))
    print(
      f"  safe / {other:5s} = {med[other] / med['safe']:.3f} (medians), {paired:.3f} "
      f"(median of per-round ratios)   target >= {target}"
    )

  if not args.conv_fit_rounds:
    return
  short, long = (int(v) for v in args.conv_fit_steps.split(","))
  model = keras_model(spl, model_fn, loss)
  ds = dataset_fn()

  # A finished fit() leaves a model and a traced graph to Python's cyclic GC:
  # collect them untimed, not inside the next measurement.
  def keras_seconds(steps):
    gc.collect()
    t = clock()
    model.fit(
      ds,
      epochs=1,
      steps_per_epoch=steps,
      verbose=0,
      callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    return clock() - t

  def safe_seconds(steps):
    gc.collect()
    with tempfile.TemporaryDirectory() as wd:
      t = clock()
      result = ConvTrainer(conv_config(steps, spl, batch), wd).fit()
      dt = clock() - t
    assert result.step == steps and not result.incidents, result
    return dt

  keras_seconds(spl)  # compile and trace once: later fits reuse it
  hand_e2e = []  # the hand loop timed again in each round, as the baseline
  e2e = {"safe": [], "keras": []}
  for r in range(args.conv_fit_rounds):
    lengths = (short, long) if r % 2 == 0 else (long, short)
    t = {n: safe_seconds(n) for n in lengths}
    e2e["safe"].append((t[long] - t[short]) / (long - short))
    # Trainer._build seeds the RNGs (keras.utils.set_random_seed), and
    # tf.random.set_seed clears TensorFlow's kernel cache: every other
    # tf.function re-instantiates its graph on its next call (seconds for
    # MobileNetV2). Warm the other two up again, untimed.
    keras_seconds(spl)
    runs["hand"]()
    t = {n: keras_seconds(n) for n in lengths}
    e2e["keras"].append((t[long] - t[short]) / (long - short))
    gc.collect()
    hand_e2e += [runs["hand"]() / spl for _ in range(3)]
  med_e2e = {k: statistics.median(v) for k, v in e2e.items()}
  print(
    f"MobileNetV2 end to end: fit() of {long} minus fit() of {short} steps, per step, "
    f"{args.conv_fit_rounds} rounds, ms per step, median [min..max]"
  )
  print(
    f"  safe   {med_e2e['safe'] * 1e3:7.1f} {spread(e2e['safe'])}   Trainer(config, workdir).fit()"
  )
  print(
    f"  keras  {med_e2e['keras'] * 1e3:7.1f} {spread(e2e['keras'])}   model.fit, one compiled model"
  )
  print(
    f"  hand   {statistics.median(hand_e2e) * 1e3:7.1f} {spread(hand_e2e)}   the compiled hand loop"
  )
  print(
    f"  safe fit / hand loop = {statistics.median(hand_e2e) / med_e2e['safe']:.3f}   "
    "(target >= 0.99)"
  )
  print(f"  safe fit / keras fit = {med_e2e['keras'] / med_e2e['safe']:.3f}   (target >= 1.0)")


# Guard pieces that config turns off, priced by --pieces.
PIECES = {
  "-spike and growth watch": {"guard.spike_detection": False, "guard.growth_factor": 0.0},
  "-input check": {"guard.check_inputs": False},
  "-per-example drops": {"guard.drop_examples": False},
  "-all three": {
    "guard.spike_detection": False,
    "guard.growth_factor": 0.0,
    "guard.check_inputs": False,
    "guard.drop_examples": False,
  },
}


def pieces_config(name: str, steps_per_loop: int):
  """The benchmark's config with the guard pieces PIECES[name] turns off."""
  config = bench_config(10**6, steps_per_loop)
  for key, value in PIECES[name].items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def mlp_bench(args) -> None:
  tf.get_logger().setLevel("ERROR")
  spl = args.steps_per_loop
  with tempfile.TemporaryDirectory() as wd:
    runs = {"hand": hand_loop(spl), "floor": floor_loop(spl), "safe": None, "keras": keras_fit(spl)}
    runs["safe"], _ = safe_loop(spl, wd)
    if args.pieces:
      # safetrain with one guard piece off at a time, then all of them: what
      # each costs in the compiled loop, side by side with the full guard.
      for name in PIECES:
        runs[name], _ = safe_loop(spl, os.path.join(wd, name), config=pieces_config(name, spl))
    for run in runs.values():  # untimed: building each one cleared the kernel cache
      run()
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
      for name, run in runs.items():  # interleaved: noise hits all alike
        times[name].append(run())
  med = {k: statistics.median(v) for k, v in times.items()}
  rate = {k: spl / v for k, v in med.items()}
  peak = matmul_peak()
  print(
    f"MLP {FEATURES}-{HIDDEN}-{HIDDEN}-1, batch {BATCH}, float32, steps_per_loop {spl}, "
    f"{args.rounds} interleaved rounds, medians"
  )
  for k in runs:
    flops = rate[k] * step_flops()
    nodes = body_nodes(runs[k].graph) if runs[k].graph is not None else 0
    print(
      f"  {k:6s} {rate[k]:8.1f} steps/s   {flops / 1e9:6.1f} GFLOP/s "
      f"({100 * flops / peak:4.1f}% of matmul peak)   {nodes:5d} nodes in the loop body"
    )
  print(f"  matmul peak (2048^2 float32): {peak / 1e9:.1f} GFLOP/s")
  for name, other, target in (
    ("safe", "hand", " (target >= 0.97)"),
    ("safe", "keras", " (target >= 1.05)"),
    ("floor", "hand", ": the least a guard costs"),
    ("safe", "floor", ": what safetrain's guards cost beyond it"),
  ):
    paired = statistics.median(o / s for o, s in zip(times[other], times[name]))
    print(
      f"  {name} / {other:5s} = {rate[name] / rate[other]:.3f} (medians), {paired:.3f} "
      f"(median of per-round ratios){target}"
    )
  for name in PIECES if args.pieces else ():
    saved = statistics.median(s - p for s, p in zip(times["safe"], times[name])) / spl
    print(f"  {name:28s} saves {saved * 1e6:6.1f} us a step (median of per-round differences)")
  recovery_bench(args)


def fit_bench(args) -> None:
  """The MLP through the public API: `Trainer(config, workdir).fit()` against
  the hand loop and Keras `fit`, start-up cancelled (benchmarks/bench_fit.py)."""
  import bench_fit  # it imports this module: imported when used

  short, long = (int(v) for v in args.fit_steps.split(","))
  bench_fit.measure(
    argparse.Namespace(
      rounds=args.fit_rounds,
      short=short,
      long=long,
      breakdown=False,
      clock=args.clock,
      threads=args.threads,
    )
  )


def recovery_bench(args) -> None:
  spl = args.steps_per_loop
  steps = 20 * spl
  rec, traces, attempts = recovery_cost(steps, spl, args.recovery_rounds)
  print(
    f"recovery: fit() of {steps} steps, checkpoint every {steps // 4}, "
    f"{args.recovery_rounds} rounds, medians"
  )
  for k, v in rec.items():
    print(f"  {k:14s} {v:6.2f} s   {attempts[k]} steps attempted   loop traced {traces[k]}x")
  print(f"  3 divergences / clean = {rec['3 divergences'] / rec['clean']:.3f} (wall time)")
  per = {k: rec[k] / attempts[k] for k in rec}
  extra = (rec["3 divergences"] - per["clean"] * attempts["3 divergences"]) / 3
  # Rollbacks redo the steps since the restored checkpoint; what is left is
  # the price of the rollbacks themselves (restore, forensics replay, save).
  print(
    f"  per attempted step: {per['3 divergences'] / per['clean']:.3f}; "
    f"each rollback costs {extra:.2f} s"
    " beyond the steps it redoes"
  )


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", choices=("all", "mlp", "fit", "conv", "recovery"), default="all")
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--steps_per_loop", type=int, default=100)
  p.add_argument("--recovery_rounds", type=int, default=3)
  p.add_argument("--conv_batch", type=int, default=64)
  p.add_argument("--conv_steps_per_loop", type=int, default=10)
  p.add_argument("--conv_rounds", type=int, default=7)
  p.add_argument("--conv_fit_rounds", type=int, default=3)
  p.add_argument("--conv_fit_steps", default="20,160", help="the two run lengths, short,long")
  p.add_argument(
    "--pieces", action="store_true", help="MLP: also safetrain with guard pieces off, priced"
  )
  p.add_argument("--fit_rounds", type=int, default=3)
  p.add_argument("--fit_steps", default="200,8200", help="the MLP fit() lengths, short,long")
  p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
  p.add_argument("--threads", type=int, default=0, help="TF intra- and inter-op threads (0: TF's)")
  args = p.parse_args()
  tf.get_logger().setLevel("ERROR")
  if args.threads:
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
  global clock
  clock = time.process_time if args.clock == "cpu" else time.perf_counter
  print(f"timed by {args.clock} clock, TF threads {args.threads or 'default'}")
  if args.only in ("all", "mlp"):
    mlp_bench(args)
  if args.only in ("all", "fit"):
    fit_bench(args)
  if args.only == "recovery":
    recovery_bench(args)
  if args.only in ("all", "conv"):
    conv_bench(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
