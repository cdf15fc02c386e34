"""Speed of safetrain under MirroredStrategy against one device and against an
unguarded mirrored loop.

The CPU is split into two logical devices at start (as tests/conftest.py does),
so MirroredStrategy runs two replicas in this process. Three loops on the same
MLP (64-256-256-1), the same global batch and the same steps per host sync,
run interleaved for several rounds; medians and ratios are printed:

  one       safetrain's compiled loop on one device (the default strategy);
  mirrored  safetrain's compiled loop, distribute.strategy=mirrored over the
            two logical CPUs: every guard decision on all-reduced values, the
            apply/skip branch in cross-replica context;
  hand      the mirrored loop a careful user writes without guards:
            strategy.run(step) in a tf.function loop, the loss averaged over
            the global batch, tf.clip_by_global_norm, apply_gradients in
            replica context (Keras all-reduces the gradients).

`mirrored / one` is what splitting costs or gains on this machine (two logical
CPUs share the same cores, so expect no gain on a CPU); `mirrored / hand` is
the price of the cross-replica guard path.

  .venv/bin/python benchmarks/bench_distribute.py [--rounds 11] [--steps_per_loop 50]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# Before anything else touches TensorFlow: two logical CPUs for MirroredStrategy.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
  _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import safetrain  # noqa: E402

FEATURES, HIDDEN, BATCH = 64, 256, 256


def make_model():
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
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)


class BenchTrainer(safetrain.Trainer):
  def build_model(self):
    return make_model()

  def build_train_dataset(self):
    return make_dataset()


def safe_loop(strategy, steps_per_loop, workdir):
  c = safetrain.default_config()
  c.trainer = "BenchTrainer"
  c.train.steps = 10**6
  c.train.batch_size = BATCH
  c.train.steps_per_loop = steps_per_loop
  c.checkpoint.every_steps = 10**6
  c.guard.preflight = "off"
  c.optimizer.learning_rate = 1e-3
  c.distribute.strategy = strategy
  c.distribute.cpu_replicas = 2
  trainer = BenchTrainer(c, workdir)
  trainer.build()
  n = tf.constant(steps_per_loop, tf.int64)

  def call():
    out = trainer.parts.compiled.loop.function(trainer.parts.feed.iterator, n)
    # What fit() does with the result every loop: one host sync.
    return tf.nest.map_structure(lambda t: t.numpy(), out)

  call()  # trace and warm up

  def run():
    t = time.perf_counter()
    out = call()
    dt = time.perf_counter() - t
    assert int(out.applied) == steps_per_loop
    return dt

  return run, trainer


def hand_loop(steps_per_loop):
  strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
  assert strategy.num_replicas_in_sync == 2
  with strategy.scope():
    keras.utils.set_random_seed(0)
    model = make_model()
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
  loss_fn = keras.losses.MeanSquaredError(reduction="none")
  it = iter(strategy.experimental_distribute_dataset(make_dataset().repeat()))

  def step(x, y):
    with tf.GradientTape() as tape:
      per_example = loss_fn(y, model(x, training=True))
      loss = tf.nn.compute_average_loss(per_example, global_batch_size=BATCH)
    grads = tape.gradient(loss, model.trainable_variables)
    grads, _ = tf.clip_by_global_norm(grads, 1.0)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  @tf.function
  def loop(n):
    loss = tf.constant(0.0)
    for _ in tf.range(n):
      x, y = next(it)
      loss = strategy.reduce("sum", strategy.run(step, args=(x, y)), axis=None)
    return loss

  n = tf.constant(steps_per_loop)
  loop(n).numpy()  # trace and warm up

  def run():
    t = time.perf_counter()
    loss = loop(n).numpy()
    dt = time.perf_counter() - t
    assert np.isfinite(loss)
    return dt

  return run


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=11)
  p.add_argument("--steps_per_loop", type=int, default=50)
  args = p.parse_args(argv)
  spl = args.steps_per_loop
  with tempfile.TemporaryDirectory() as wd:
    one, t_one = safe_loop("one_device", spl, os.path.join(wd, "one"))
    mirrored, t_mir = safe_loop("mirrored", spl, os.path.join(wd, "mirrored"))
    assert t_one.strategy.num_replicas_in_sync == 1
    assert t_mir.strategy.num_replicas_in_sync == 2
    runs = {"one": one, "mirrored": mirrored, "hand": hand_loop(spl)}
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
      for name, fn in runs.items():  # interleaved, so machine load hits all alike
        times[name].append(fn())
  med = {k: statistics.median(v) for k, v in times.items()}
  print(
    f"MLP {FEATURES}-{HIDDEN}-{HIDDEN}-1, global batch {BATCH}, {spl} steps per loop, "
    f"{args.rounds} interleaved rounds, medians; {os.cpu_count()} cores, "
    "2 logical CPUs"
  )
  for name in runs:
    lo, hi = min(times[name]), max(times[name])
    print(
      f"  {name:9s} {spl / med[name]:8.1f} steps/s  "
      f"({med[name] / spl * 1e3:.2f} ms/step, range {lo / spl * 1e3:.2f}-{hi / spl * 1e3:.2f})"
    )
  print(f"  mirrored / one  : {med['mirrored'] / med['one']:.2f}x the time per step")
  print(f"  mirrored / hand : {med['mirrored'] / med['hand']:.2f}x the time per step")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
