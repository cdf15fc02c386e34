"""safetrain `fit()` against Keras `fit` on real architectures, in float32
and mixed_float16: the question the first machine with a GPU answers.

For each model and precision, both contenders train the same model on the
same synthetic data (no download) for --short and --long steps, each built
from scratch; the per-step cost is the difference over the difference in
steps (start-up cancelled), and the short run's time is the start-up. Keras
`fit` runs with `steps_per_execution` equal to safetrain's
`train.steps_per_loop`, `global_clipnorm=1.0` (safetrain's default clip) and
`TerminateOnNaN`; under mixed_float16 Keras wraps the optimizer in its
LossScaleOptimizer itself. safetrain runs at its defaults (guards,
checkpoints, records) with preflight off, `train.jit_compile` and
`train.skip_update` at their defaults (printed: `auto` picks the branchless
skip on a GPU). Keras's `jit_compile` is its own default, "auto" (XLA on a
GPU).

  .venv/bin/python benchmarks/bench_models.py                      # the whole matrix
  .venv/bin/python benchmarks/bench_models.py --models transformer --precisions float32 \\
      --short 4 --long 8 --batch 8 --image 32                      # a quick look on a CPU

Models: MobileNetV2 and ResNet50 (keras.applications, weights=None, 10
classes, --image pixels square), and a 2-layer transformer language model
(sequence 64, vocabulary 512, width 128). On this 2-core CPU the matrix is
minutes per model; it is meant for an accelerator.
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
from absl import logging  # noqa: E402

import safetrain  # noqa: E402
from safetrain import trainer as trainer_lib  # noqa: E402

MODELS = ("mobilenetv2", "resnet50", "transformer")
PRECISIONS = ("float32", "mixed_float16")
SEQ, VOCAB, WIDTH = 64, 512, 128


def transformer_lm() -> keras.Model:
  """Token and position embeddings, two pre-norm blocks of causal
  self-attention and an MLP, a vocabulary head (logits)."""
  tokens = keras.Input((SEQ,), dtype="int32")
  x = keras.layers.Embedding(VOCAB, WIDTH)(tokens)
  x = x + keras.layers.Embedding(SEQ, WIDTH)(keras.ops.arange(SEQ))
  for _ in range(2):
    h = keras.layers.LayerNormalization()(x)
    h = keras.layers.MultiHeadAttention(4, WIDTH // 4)(h, h, use_causal_mask=True)
    x = x + h
    h = keras.layers.LayerNormalization()(x)
    h = keras.layers.Dense(4 * WIDTH, activation="gelu")(h)
    x = x + keras.layers.Dense(WIDTH)(h)
  x = keras.layers.LayerNormalization()(x)
  # float32 logits under a mixed policy, as Keras's guide advises.
  logits = keras.layers.Dense(VOCAB, dtype="float32")(x)
  return keras.Model(tokens, logits)


def build(model: str, image: int) -> keras.Model:
  """The model, under the current global dtype policy."""
  if model == "transformer":
    return transformer_lm()
  app = {"mobilenetv2": keras.applications.MobileNetV2, "resnet50": keras.applications.ResNet50}
  return app[model](weights=None, input_shape=(image, image, 3), classes=10)


def dataset(model: str, image: int, batch: int) -> tf.data.Dataset:
  """Synthetic batches of the model's input and labels, repeated."""
  rng = np.random.default_rng(0)
  n = 4 * batch
  if model == "transformer":
    x = rng.integers(0, VOCAB, size=(n, SEQ + 1)).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((x[:, :-1], x[:, 1:]))
  else:
    x = rng.uniform(-1, 1, size=(n, image, image, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, rng.integers(0, 10, size=n)))
  return ds.repeat().batch(batch, drop_remainder=True).prefetch(2)


def loss_name(model: str) -> str:
  return "softmax_cross_entropy" if model == "transformer" else "sparse_categorical_crossentropy"


def keras_loss(model: str):
  return keras.losses.SparseCategoricalCrossentropy(from_logits=model == "transformer")


class ModelTrainer(safetrain.Trainer):
  """The benchmark's model and data (see `build`, `dataset`)."""

  model_name, image = "transformer", 32

  def build_model(self):
    return build(self.model_name, self.image)

  def build_train_dataset(self):
    return dataset(self.model_name, self.image, self.config.train.batch_size)


def safe_fit(model: str, precision: str, steps: int, args) -> float:
  config = safetrain.default_config()
  config.trainer = "ModelTrainer"
  config.loss = loss_name(model)
  config.precision.policy = precision
  config.train.steps = steps
  config.train.batch_size = args.batch
  config.train.steps_per_loop = min(args.steps_per_loop, steps)
  config.checkpoint.every_steps = steps
  config.guard.preflight = "off"
  config.optimizer.learning_rate = 1e-3
  ModelTrainer.model_name, ModelTrainer.image = model, args.image
  with tempfile.TemporaryDirectory() as workdir:
    t = time.perf_counter()
    result = ModelTrainer(config, workdir).fit()
    dt = time.perf_counter() - t
  assert result.step == steps, result
  return dt


def keras_fit(model: str, precision: str, steps: int, args) -> float:
  previous = keras.mixed_precision.dtype_policy()
  keras.mixed_precision.set_global_policy(precision)
  try:
    t = time.perf_counter()
    net = build(model, args.image)
    net.compile(
      optimizer=keras.optimizers.Adam(1e-3, global_clipnorm=1.0),
      loss=keras_loss(model),
      steps_per_execution=min(args.steps_per_loop, steps),
    )
    net.fit(
      dataset(model, args.image, args.batch),
      epochs=1,
      steps_per_epoch=steps,
      verbose=0,
      callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    return time.perf_counter() - t
  finally:
    keras.mixed_precision.set_global_policy(previous)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {MODELS}")
  p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"of {PRECISIONS}")
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--short", type=int, default=20)
  p.add_argument("--long", type=int, default=220)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image", type=int, default=224, help="image side (the transformer ignores it)")
  p.add_argument("--steps-per-loop", type=int, default=100)
  return p


def main(argv=None) -> list[dict]:
  """Runs the matrix; prints and returns one row per (model, precision)."""
  args = parser().parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  models = [m for m in args.models.split(",") if m]
  precisions = [p for p in args.precisions.split(",") if p]
  for name, allowed in (("models", MODELS), ("precisions", PRECISIONS)):
    bad = [v for v in (models if name == "models" else precisions) if v not in allowed]
    if bad:
      raise SystemExit(f"--{name}: {', '.join(bad)} not in {', '.join(allowed)}")
  gpus = tf.config.list_logical_devices("GPU")
  devices = ", ".join(d.name for d in tf.config.list_logical_devices())
  defaults = safetrain.default_config().train
  skip = trainer_lib.skip_update(defaults.skip_update, jit_compile=defaults.jit_compile)
  print(
    f"devices: {devices}; GPU: {'yes' if gpus else 'no'}; safetrain train.jit_compile="
    f"{defaults.jit_compile}, train.skip_update={defaults.skip_update} -> {skip}; "
    f"Keras jit_compile=auto (XLA {'on' if gpus else 'off'})"
  )
  print(
    f"batch {args.batch}, image {args.image}, {args.steps_per_loop} steps per loop; "
    f"fit() of {args.long} minus fit() of {args.short} steps, {args.rounds} round(s), wall time"
  )
  print(
    f"  {'model':<12} {'precision':<14} {'safe ms/step':>12} {'keras ms/step':>13} "
    f"{'safe/keras':>10} {'start-up s safe/keras':>22}"
  )
  rows = []
  for model in models:
    for precision in precisions:
      times = {"safe": {}, "keras": {}}
      for _ in range(args.rounds):
        for name, fit in (("safe", safe_fit), ("keras", keras_fit)):
          for steps in (args.short, args.long):
            times[name].setdefault(steps, []).append(fit(model, precision, steps, args))
      per_step = {
        k: (statistics.median(v[args.long]) - statistics.median(v[args.short]))
        / (args.long - args.short)
        for k, v in times.items()
      }
      start = {k: statistics.median(v[args.short]) for k, v in times.items()}
      row = dict(model=model, precision=precision, per_step=per_step, start=start)
      rows.append(row)
      ratio = per_step["safe"] / per_step["keras"] if per_step["keras"] > 0 else float("nan")
      print(
        f"  {model:<12} {precision:<14} {1e3 * per_step['safe']:>12.2f} "
        f"{1e3 * per_step['keras']:>13.2f} {ratio:>10.3f} "
        f"{start['safe']:>10.1f} / {start['keras']:<10.1f}",
        flush=True,
      )
  print("  (safe/keras: safetrain's time per step over Keras fit's; under 1.0 safetrain is faster)")
  return rows


if __name__ == "__main__":
  sys.exit(main() and 0)
