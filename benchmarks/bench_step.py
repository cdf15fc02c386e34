"""Speed of the guarded step against the loops users would otherwise run.

Three loops on the same MLP (64-256-256-1), batch 256, float32, the same data
and the same number of steps per host sync (steps_per_loop), run interleaved
for many rounds on this machine; medians and ratios are printed:

  hand    the loop a careful user writes: steps_per_loop steps in one
          tf.function, tf.clip_by_global_norm, apply_gradients, nothing else;
  safe    safetrain's compiled inner loop with every guard on (input check,
          finiteness classification, NaN-safe clipping, spike detection);
  keras   model.fit with steps_per_execution=steps_per_loop,
          global_clipnorm=1.0 and TerminateOnNaN.

It also prints achieved FLOP/s against a measured large-matmul peak, and the
cost of recovery: fit() with 3 injected divergences (3 rollbacks) against a
clean fit() of the same steps, and whether recovery retraced the loop.

  .venv/bin/python benchmarks/bench_step.py [--rounds 15] [--steps_per_loop 100]
"""

import argparse
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


def bench_config(steps, steps_per_loop):
  c = safetrain.default_config()
  c.trainer = "BenchTrainer"
  c.train.steps = steps
  c.train.batch_size = BATCH
  c.train.steps_per_loop = steps_per_loop
  c.checkpoint.every_steps = steps
  c.guard.preflight = "off"
  c.optimizer.learning_rate = 1e-3
  return c


def hand_loop(steps_per_loop):
  model = make_model()
  opt = keras.optimizers.Adam(1e-3)
  opt.build(model.trainable_variables)
  loss_fn = keras.losses.MeanSquaredError()
  it = iter(make_dataset())

  @tf.function
  def loop(n):
    for _ in tf.range(n):
      x, y = next(it)
      with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
      grads = tape.gradient(loss, model.trainable_variables)
      grads, _ = tf.clip_by_global_norm(grads, 1.0)
      opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  n = tf.constant(steps_per_loop)
  loop(n).numpy()  # trace and warm up

  def run():
    t = time.perf_counter()
    loop(n).numpy()
    return time.perf_counter() - t

  return run


def safe_loop(steps_per_loop, workdir):
  trainer = BenchTrainer(bench_config(10**6, steps_per_loop), workdir)
  trainer.build()
  n = tf.constant(steps_per_loop, tf.int64)

  def call():
    out = trainer._train_loop_fn(trainer._iterator, n)
    # What fit() does with the result every loop: one host sync.
    return tf.nest.map_structure(lambda t: t.numpy(), out)

  call()

  def run():
    t = time.perf_counter()
    out = call()
    dt = time.perf_counter() - t
    assert int(out["applied"]) == steps_per_loop
    return dt

  return run, trainer


def keras_fit(steps_per_loop):
  model = make_model()
  model.compile(
    optimizer=keras.optimizers.Adam(1e-3, global_clipnorm=1.0),
    loss="mse",
    steps_per_execution=steps_per_loop,
  )
  ds = make_dataset()
  times = []

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      times.append(time.perf_counter() - self.t)

  cbs = [keras.callbacks.TerminateOnNaN(), Timer()]
  model.fit(ds, epochs=1, steps_per_epoch=steps_per_loop, verbose=0, callbacks=cbs)

  def run():
    model.fit(ds, epochs=1, steps_per_epoch=steps_per_loop, verbose=0, callbacks=cbs)
    return times[-1]

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
        traces[name] = trainer._train_loop_fn.experimental_get_tracing_count()
        attempts[name] = r.attempts
        assert r.rollbacks == (0 if name == "clean" else 3), r.rollbacks
  return {k: statistics.median(v) for k, v in times.items()}, traces, attempts


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--steps_per_loop", type=int, default=100)
  p.add_argument("--recovery_rounds", type=int, default=3)
  p.add_argument("--recovery_only", action="store_true", help="only the recovery benchmark")
  args = p.parse_args()
  tf.get_logger().setLevel("ERROR")
  spl = args.steps_per_loop
  if args.recovery_only:
    return print_recovery_cost(spl, args.recovery_rounds)
  with tempfile.TemporaryDirectory() as wd:
    runs = {"hand": hand_loop(spl), "safe": None, "keras": keras_fit(spl)}
    runs["safe"], _ = safe_loop(spl, wd)
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
      for name, run in runs.items():  # interleaved: noise hits all three alike
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
    print(
      f"  {k:6s} {rate[k]:8.1f} steps/s   {flops / 1e9:6.1f} GFLOP/s "
      f"({100 * flops / peak:4.1f}% of matmul peak)"
    )
  print(f"  matmul peak (2048^2 float32): {peak / 1e9:.1f} GFLOP/s")
  print(f"  safe / hand  = {rate['safe'] / rate['hand']:.3f}   (target >= 0.97)")
  print(f"  safe / keras = {rate['safe'] / rate['keras']:.3f}   (target >= 1.05)")
  return print_recovery_cost(spl, args.recovery_rounds)


def print_recovery_cost(spl, rounds):
  steps = 20 * spl
  rec, traces, attempts = recovery_cost(steps, spl, rounds)
  print(
    f"recovery: fit() of {steps} steps, checkpoint every {steps // 4}, {rounds} rounds, medians"
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
  return 0


if __name__ == "__main__":
  sys.exit(main())
