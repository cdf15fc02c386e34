"""The configuration of a safetrain run: every key, its default, and validation.

`default_config()` is the one place where defaults live. Library code reads
config fields directly (never `config.get(key, default)`), so a key that is not
here does not exist, and a typo in an override is an error.
"""

from __future__ import annotations

import copy
import math
import numbers
import re

import ml_collections

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad", "nadam", "lion")
SCHEDULES = ("constant", "warmup_constant", "cosine", "warmup_cosine", "linear")
BAD_INPUTS = ("drop_rows", "skip_batch", "raise")
PREFLIGHT = ("off", "warn", "strict")
RECOVERY_DATA = ("skip", "replay")
CLIP_MODES = ("fixed", "adaptive")
LOCKS = ("auto", "flock", "lease")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")
DRILL_VALUES = ("nan", "inf")
SKIP_UPDATES = ("auto", "select", "cond")


class ConfigError(ValueError):
  """A config value is invalid. The message names the field, value and rule."""

  def __init__(self, field: str, value, allowed: str):
    self.field = field
    self.value = value
    self.allowed = allowed
    super().__init__(f"config.{field} = {value!r} is invalid: {allowed}")


def default_config() -> ml_collections.ConfigDict:
  """Returns a ConfigDict holding every key safetrain reads, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # What to run: the name of a Trainer subclass in the experiment file, or a
  # dotted import path ("package.module.Class").
  c.trainer = ""
  # Loss used by the default `Trainer.compute_loss`: any keras.losses name, or
  # softmax_cross_entropy / sigmoid_cross_entropy (from logits).
  c.loss = "mse"
  # Per-class weights of the training examples, as Keras fit's class_weight:
  # {class index: weight}, e.g. {0: 1.0, 1: 5.0}; a class not listed weighs
  # 1. Each training batch's sample weight becomes the weight of its integer
  # label (rounded, or the argmax of a one-hot label), multiplied into the
  # batch's own sample_weight; evaluation is not weighted. {}: off.
  c.class_weight = ml_collections.ConfigDict()

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.steps_per_loop = 100
  c.train.log_every_steps = 100
  # TensorBoard histograms of every weight and of the per-layer gradient
  # norms every this many steps (0: off).
  c.train.histogram_every_steps = 0
  # Repeat the training dataset when it ends; if False, a run whose data ends
  # before train.steps stops cleanly there (checkpoint written, exit 0).
  c.train.repeat_data = True
  # tf.config.experimental.enable_op_determinism(): bit-exact CPU reruns.
  c.train.deterministic = False
  # XLA: the whole guarded step (the guard, classification, clipping, loss
  # scaling and the update; the iterator and the host stay outside) as one
  # compiled program, and compute_loss with its gradient once a rare path is
  # built. None (auto): on when a GPU is visible, off on a CPU, as Keras's
  # jit_compile="auto"; true/false force it. docs/speed.md.
  c.train.jit_compile = ml_collections.config_dict.placeholder(bool)
  # How a step that is not good leaves the state: cond (the update in a
  # tf.cond), select (the update always, the old values selected back with
  # tf.where: no branch a GPU waits on the host for, one copy of the
  # optimizer's state a step), or auto: select with a GPU or under
  # train.jit_compile, cond otherwise. docs/speed.md.
  c.train.skip_update = "auto"

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # 0: evaluate only at the end of fit().
  c.eval.steps = 0  # batches per evaluation; 0: the whole eval dataset.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  # Decay schedules end at learning_rate * end_lr_factor at train.steps.
  c.optimizer.end_lr_factor = 0.0
  c.optimizer.beta_1 = 0.9
  c.optimizer.beta_2 = 0.999
  c.optimizer.epsilon = 1e-7
  c.optimizer.momentum = 0.0
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0

  c.precision = ml_collections.ConfigDict()
  c.precision.policy = "float32"

  c.loss_scale = ml_collections.ConfigDict()
  c.loss_scale.initial = 2.0**15
  c.loss_scale.growth_interval = 2000
  c.loss_scale.growth_factor = 2.0
  c.loss_scale.backoff_factor = 0.5
  c.loss_scale.hysteresis = 2
  c.loss_scale.min_scale = 1.0
  c.loss_scale.max_scale = 2.0**24

  c.clip = ml_collections.ConfigDict()
  # fixed: clip every step's global norm to clip.global_norm (0 disables).
  # adaptive: ZClip (Kumar et al. 2025): clip only a norm whose z-score against
  # exponential moving averages of the norm's mean and variance exceeds
  # clip.z_threshold; clip.global_norm (0: none) caps the warm-up steps.
  c.clip.mode = "fixed"
  c.clip.global_norm = 1.0
  c.clip.ema = 0.97
  c.clip.z_threshold = 2.5
  c.clip.warmup_steps = 25

  c.guard = ml_collections.ConfigDict()
  c.guard.check_inputs = True
  # A variable the optimizer does not update (BatchNorm's moving statistics,
  # any float non-trainable) that a batch's forward pass drives non-finite or
  # beyond state_max_abs makes the step a bad batch (nonfinite_state): skipped,
  # the state put back. One reduction per such variable and step.
  c.guard.check_state = True
  c.guard.state_max_abs = 1e30
  c.guard.bad_inputs = "drop_rows"
  c.guard.rollback_after = 3
  c.guard.spike_detection = True
  # Good steps whose loss feeds the running statistics before spikes count.
  c.guard.spike_warmup_steps = 100
  # A spike is a loss above mean + spike_threshold * max(deviation,
  # spike_rel_floor * |mean|), with mean and mean absolute deviation tracked
  # as exponential moving averages (decay spike_decay) of good steps only.
  c.guard.spike_threshold = 10.0
  c.guard.spike_rel_floor = 0.25
  c.guard.spike_decay = 0.98
  # ... and, for a positive loss, above spike_first_loss_fraction times the
  # run's first loss: late in training, a batch whose loss is 10x a tiny running
  # mean (an optimizer memorizing its data) is noise, not a divergence, while
  # a real spike climbs back towards where the run started. The same floor
  # applies to "far above its best" (guard.stall_factor: stalled runs, and
  # states not saved as healthy). 0 disables.
  c.guard.spike_first_loss_fraction = 0.1
  # A finite blow-up: a good step's loss above growth_factor times the best
  # running mean of the loss (and above the first one) is divergence
  # (`loss_growth`), from the first step on, warm-up or not. 0 disables.
  c.guard.growth_factor = 1000.0
  # Default compute_loss (and one returning per-example losses): non-finite
  # examples are dropped from the mean; more than max_dropped_examples of the
  # batch (a fraction) makes the step a non-finite loss instead.
  c.guard.drop_examples = True
  c.guard.max_dropped_examples = 0.25
  # A run that stopped learning (`stalled`): the running loss stays above
  # stall_factor times its best for stall_steps good steps, or the loop's mean
  # gradient norm fell under stall_norm_drop times its running level while the
  # loss is that far above its best. stall_steps 0 disables.
  c.guard.stall_factor = 3.0
  c.guard.stall_steps = 300
  c.guard.stall_norm_drop = 1e-3
  # A run that never learned (`not_learning`): after learn_steps good steps
  # from the start or from the last rollback, the running loss is not below
  # learn_factor times the trivial predictor's loss (for a keras loss the
  # default compute_loss computes: the mean, the median or the label
  # frequencies of the first batch's targets; otherwise the loss at the
  # initial weights), and no longer falling. Rolled back with a lower rate
  # once; if that did not help, the run stops (exit 3). learn_steps 0
  # disables.
  c.guard.learn_steps = 1000
  c.guard.learn_factor = 0.95
  # Dead ReLU units (`dead_units`): once per loop the first training batch is
  # run through the model; a ReLU-family layer (of at least dead_min_units
  # units) with at least dead_fraction of its units zero on every row of it is
  # dead. 0 disables.
  c.guard.dead_fraction = 1.0
  c.guard.dead_min_units = 4
  c.guard.preflight = "warn"
  # Preflight flags an input feature whose largest |value| in the first batch
  # exceeds this: unnormalized inputs are the classic cause of NaN losses.
  c.guard.preflight_max_abs_input = 100.0
  # Under mixed_float16, preflight flags a layer whose activations on the first
  # batch exceed this fraction of float16's largest value (65504).
  c.guard.preflight_fp16_margin = 0.1

  c.recovery = ml_collections.ConfigDict()
  c.recovery.enabled = True
  c.recovery.max_rollbacks = 5
  # Under mixed_float16, a layer whose float16 output overflows (on the
  # first batch at the start of each process, or on the batch that fails
  # before a rollback) computes in float32 instead, when an eager replay
  # shows that makes the step finite: no rollback, no learning-rate cut.
  c.recovery.float32_fallback = True
  # A compute_loss returning a scalar that a batch's rows make non-finite
  # (shown by the row probe: those rows alone non-finite, the others
  # finite): from then on a non-finite scalar loss is evaluated per row in
  # the step and the step trains on the finite rows (guard.drop_examples and
  # guard.max_dropped_examples, as for per-example losses).
  c.recovery.scalar_rows = True
  c.recovery.lr_backoff = 0.5
  c.recovery.min_lr_scale = 1.0 / 64
  # A `not_learning` rollback chooses its rate by a probe: from the restored
  # state, the current scale times each probe factor (none under
  # min_lr_scale) trains probe_steps guarded steps; the scale whose loss fell
  # lowest is kept, the trials undone. probe_steps 0: the scale is cut by
  # lr_backoff instead.
  c.recovery.probe_factors = (0.5, 0.1, 0.02)
  c.recovery.probe_steps = 100
  c.recovery.data = "skip"
  c.recovery.rewarm_steps = 0
  c.recovery.budget_reset_steps = 1000
  # Bad batches (a non-finite loss bound to a batch's data; the state is
  # healthy) are quarantined: skipped, recorded with their data position,
  # no rollback, no learning-rate cut. When more than bad_batch_rate of the
  # batches (a moving average over about bad_batch_window batches) are bad,
  # they count as a diverging state: rollback with backoff.
  c.recovery.bad_batch_rate = 0.3
  c.recovery.bad_batch_window = 200
  # In-memory snapshots of the healthy state (model, optimizer, loss scale,
  # guard state), one taken after every healthy inner loop, the newest kept:
  # a rollback goes back at most about one or two loops instead of a whole
  # checkpoint interval. 0 disables; snapshots_max_mb caps their memory (a
  # model whose snapshots would exceed it rolls back from disk only).
  c.recovery.snapshots = 2
  c.recovery.snapshots_max_mb = 1024.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 5

  # The workdir's store (see docs/storage.md). locking: "auto" is flock on a
  # local directory and a lease file on any other store; "lease" forces the
  # lease (a shared filesystem whose flock cannot be trusted, NFS). A lease
  # is renewed every lease_seconds / 3 by the running job and taken over
  # only after lease_seconds without a renewal.
  c.storage = ml_collections.ConfigDict()
  c.storage.locking = "auto"
  c.storage.lease_seconds = 60.0

  c.distribute = ml_collections.ConfigDict()
  c.distribute.strategy = "auto"
  c.distribute.cpu_replicas = 0  # >1 splits the CPU into that many devices.

  # Fault injection for tests and fire drills. Steps are attempt numbers
  # (1-based, counting skipped attempts too) written like "5" or "3,7-9".
  c.drill = ml_collections.ConfigDict()
  c.drill.loss_steps = ""
  c.drill.grad_steps = ""
  c.drill.input_steps = ""
  c.drill.value = "nan"
  c.drill.input_feature = 0
  c.drill.input_rows = 1
  # With per-example losses, loss_steps makes only the first loss_rows
  # examples' losses non-finite (0: the whole loss, as for a mean).
  c.drill.loss_rows = 0
  c.drill.replica = -1  # -1: every replica; k: only replica k's shard.
  return c


_SPEC_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_steps(spec: str, field: str = "drill") -> list[tuple[int, int]]:
  """Parses "3,7-9" into [(3, 3), (7, 9)]."""
  ranges = []
  if not spec.strip():
    return ranges
  for part in spec.split(","):
    m = _SPEC_RE.match(part)
    if not m:
      raise ConfigError(field, spec, 'a list of steps like "5" or "3,7-9"')
    lo = int(m.group(1))
    hi = int(m.group(2) or lo)
    if lo < 1 or hi < lo:
      raise ConfigError(field, spec, "steps are >= 1 and ranges go upwards")
    ranges.append((lo, hi))
  return ranges


def _check(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise ConfigError(field, value, allowed)


# Upper bounds of integer keys: far above any real run, far below where int64
# counters (attempts, 2 * steps_per_loop + rollback_after), int32 shapes or
# 32-bit seeds overflow.
MAX_STEPS = 10**12  # step counts and intervals
MAX_COUNT = 10**6  # counts of events: overflows, bad steps, rollbacks
MAX_INT32 = 2**31 - 1  # sizes and indices that end up in int32 shapes
MAX_SEED = 2**32 - 1  # numpy and TensorFlow seeds


def _int(c, field: str, minimum: int, maximum: int) -> None:
  value = _lookup(c, field)
  _check(
    isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum,
    field,
    value,
    f"an integer >= {minimum} and <= {maximum}",
  )


def _num(c, field: str, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
  value = _lookup(c, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = ok and math.isfinite(value)
  if ok:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
  lb = "(" if lo_open else "["
  rb = ")" if hi_open else "]"
  _check(ok, field, value, f"a number in {lb}{lo}, {hi}{rb}")


def _choice(c, field: str, allowed) -> None:
  value = _lookup(c, field)
  _check(value in allowed, field, value, "one of " + ", ".join(allowed))


def _bool(c, field: str) -> None:
  value = _lookup(c, field)
  _check(isinstance(value, bool), field, value, "true or false")


def _lookup(c, field: str):
  node = c
  for part in field.split("."):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field once, before any TensorFlow work.

  Raises:
    ConfigError: naming the first invalid field, its value and what is allowed.
  """
  expected = default_config()
  _check_keys(config, expected, "")
  _int(config, "seed", 0, MAX_SEED)
  _check(isinstance(config.trainer, str), "trainer", config.trainer, "a class name")
  _check(isinstance(config.loss, str) and config.loss, "loss", config.loss, "a keras.losses name")
  class_weights(config.class_weight)
  _int(config, "train.steps", 1, MAX_STEPS)
  _int(config, "train.batch_size", 1, MAX_INT32)
  _int(config, "train.steps_per_loop", 1, MAX_STEPS)
  _int(config, "train.log_every_steps", 1, MAX_STEPS)
  _int(config, "train.histogram_every_steps", 0, MAX_STEPS)
  _bool(config, "train.repeat_data")
  _bool(config, "recovery.float32_fallback")
  _bool(config, "recovery.scalar_rows")
  _bool(config, "train.deterministic")
  _check(
    config.train.jit_compile in (None, True, False),
    "train.jit_compile",
    config.train.jit_compile,
    "true, false or None (auto: XLA with a GPU)",
  )
  _choice(config, "train.skip_update", SKIP_UPDATES)
  _int(config, "eval.every_steps", 0, MAX_STEPS)
  _int(config, "eval.steps", 0, MAX_STEPS)
  _choice(config, "optimizer.name", OPTIMIZERS)
  _num(config, "optimizer.learning_rate", 0.0, 1e6, lo_open=True)
  _choice(config, "optimizer.schedule", SCHEDULES)
  _int(config, "optimizer.warmup_steps", 0, MAX_STEPS)
  if config.optimizer.schedule.startswith("warmup_"):
    _check(
      config.optimizer.warmup_steps > 0,
      "optimizer.warmup_steps",
      config.optimizer.warmup_steps,
      "> 0 for a warmup schedule",
    )
  _num(config, "optimizer.end_lr_factor", 0.0, 1.0)
  _num(config, "optimizer.beta_1", 0.0, 1.0, hi_open=True)
  _num(config, "optimizer.beta_2", 0.0, 1.0, hi_open=True)
  _num(config, "optimizer.epsilon", 0.0, 1.0, lo_open=True)
  _num(config, "optimizer.momentum", 0.0, 1.0, hi_open=True)
  _bool(config, "optimizer.nesterov")
  _num(config, "optimizer.weight_decay", 0.0, 1.0)
  _choice(config, "precision.policy", POLICIES)
  _num(config, "loss_scale.min_scale", 0.0, 2.0**64, lo_open=True)
  _num(config, "loss_scale.max_scale", config.loss_scale.min_scale, 2.0**64)
  _num(config, "loss_scale.initial", config.loss_scale.min_scale, config.loss_scale.max_scale)
  _int(config, "loss_scale.growth_interval", 1, MAX_STEPS)
  _num(config, "loss_scale.growth_factor", 1.0, 1e3, lo_open=True)
  _num(config, "loss_scale.backoff_factor", 0.0, 1.0, lo_open=True, hi_open=True)
  _int(config, "loss_scale.hysteresis", 1, MAX_COUNT)
  _choice(config, "clip.mode", CLIP_MODES)
  _num(config, "clip.global_norm", 0.0, 1e12)
  _num(config, "clip.ema", 0.0, 1.0, lo_open=True, hi_open=True)
  _num(config, "clip.z_threshold", 0.0, 1e6, lo_open=True)
  _int(config, "clip.warmup_steps", 1, MAX_STEPS)
  _bool(config, "guard.check_inputs")
  _bool(config, "guard.check_state")
  _num(config, "guard.state_max_abs", 0.0, 3.4e38, lo_open=True)
  _choice(config, "guard.bad_inputs", BAD_INPUTS)
  _int(config, "guard.rollback_after", 1, MAX_COUNT)
  _bool(config, "guard.spike_detection")
  _int(config, "guard.spike_warmup_steps", 1, MAX_STEPS)
  _num(config, "guard.spike_threshold", 0.0, 1e9, lo_open=True)
  _num(config, "guard.spike_rel_floor", 0.0, 1e9)
  _num(config, "guard.spike_first_loss_fraction", 0.0, 1e3)
  _num(config, "guard.spike_decay", 0.0, 1.0, lo_open=True, hi_open=True)
  _num(config, "guard.growth_factor", 0.0, 1e30)
  _check(
    config.guard.growth_factor == 0 or config.guard.growth_factor > 1,
    "guard.growth_factor",
    config.guard.growth_factor,
    "0 (off) or a factor > 1",
  )
  _bool(config, "guard.drop_examples")
  _num(config, "guard.max_dropped_examples", 0.0, 1.0, lo_open=True)
  _num(config, "guard.stall_factor", 1.0, 1e30, lo_open=True)
  _int(config, "guard.stall_steps", 0, MAX_STEPS)
  _num(config, "guard.stall_norm_drop", 0.0, 1.0, hi_open=True)
  _int(config, "guard.learn_steps", 0, MAX_STEPS)
  _num(config, "guard.learn_factor", 0.0, 1.0, lo_open=True)
  _num(config, "guard.dead_fraction", 0.0, 1.0)
  _int(config, "guard.dead_min_units", 1, MAX_INT32)
  _choice(config, "guard.preflight", PREFLIGHT)
  _num(config, "guard.preflight_max_abs_input", 0.0, 1e38, lo_open=True)
  _num(config, "guard.preflight_fp16_margin", 0.0, 1.0, lo_open=True)
  _bool(config, "recovery.enabled")
  _int(config, "recovery.max_rollbacks", 0, MAX_COUNT)
  _num(config, "recovery.lr_backoff", 0.0, 1.0, lo_open=True, hi_open=True)
  _num(config, "recovery.min_lr_scale", 0.0, 1.0, lo_open=True)
  _choice(config, "recovery.data", RECOVERY_DATA)
  factors = config.recovery.probe_factors
  _check(
    isinstance(factors, (tuple, list))
    and all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1 for f in factors),
    "recovery.probe_factors",
    factors,
    "a tuple of factors in (0, 1), like (0.5, 0.1, 0.02)",
  )
  _int(config, "recovery.probe_steps", 0, MAX_STEPS)
  _int(config, "recovery.rewarm_steps", 0, MAX_STEPS)
  _int(config, "recovery.budget_reset_steps", 1, MAX_STEPS)
  _num(config, "recovery.bad_batch_rate", 0.0, 1.0, lo_open=True)
  _int(config, "recovery.bad_batch_window", 1, MAX_STEPS)
  _int(config, "recovery.snapshots", 0, 64)
  _num(config, "recovery.snapshots_max_mb", 0.0, 1e9)
  _int(config, "checkpoint.every_steps", 1, MAX_STEPS)
  _int(config, "checkpoint.max_to_keep", 2, 10**4)
  _choice(config, "storage.locking", LOCKS)
  _num(config, "storage.lease_seconds", 1.0, 86400.0)
  _choice(config, "distribute.strategy", STRATEGIES)
  _int(config, "distribute.cpu_replicas", 0, 256)
  for f in ("loss_steps", "grad_steps", "input_steps"):
    spec = config.drill[f]
    _check(isinstance(spec, str), f"drill.{f}", spec, 'a string like "3,7-9"')
    parse_steps(spec, f"drill.{f}")
  _choice(config, "drill.value", DRILL_VALUES)
  _int(config, "drill.input_feature", 0, MAX_INT32)
  _int(config, "drill.input_rows", 1, MAX_INT32)
  _int(config, "drill.replica", -1, MAX_INT32)
  _int(config, "drill.loss_rows", 0, MAX_INT32)


def fit_to_steps(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """Returns a copy of a validated config whose intervals fit `train.steps`.

  A shorter run (to try something) should not need five other keys changed:
  as Keras clamps `steps_per_execution`, the loop length and the eval and
  checkpoint intervals are clamped to `train.steps`, and a warm-up that would
  not end before it is cut to a tenth of the run.

  Returns:
    (the resolved copy, one "key: old -> new" note per clamped key).
  """
  config = copy.deepcopy(config)
  steps = config.train.steps
  notes = []

  def clamp(group: str, key: str, value: int) -> None:
    old = config[group][key]
    if old != value:
      config[group][key] = value
      notes.append(f"{group}.{key} {old} -> {value}")

  for group, key in (
    ("train", "steps_per_loop"),
    ("eval", "every_steps"),
    ("checkpoint", "every_steps"),
  ):
    clamp(group, key, min(config[group][key], steps))
  if config.optimizer.schedule.startswith("warmup_") and config.optimizer.warmup_steps >= steps:
    clamp("optimizer", "warmup_steps", steps // 10)
  return config, notes


def class_weights(value, field: str = "class_weight") -> dict[int, float]:
  """`config.class_weight` (or a Keras-style class_weight dict) as {int: float}.

  Keys are class indices (ints >= 0; digit strings too, as config.json
  writes them), values finite weights >= 0. Raises ConfigError naming
  `field` and the entry otherwise.
  """
  allowed = "a dict {class index (an int >= 0): weight (a finite number >= 0)}, e.g. {0: 1, 1: 5}"
  if value is None:
    return {}
  if not hasattr(value, "items"):
    raise ConfigError(field, value, allowed)
  plain = dict(value.items())
  weights = {}
  for key, weight in plain.items():
    if isinstance(key, str) and key.isdigit():
      key = int(key)
    ok = isinstance(key, numbers.Integral) and not isinstance(key, bool) and 0 <= key <= MAX_INT32
    ok = ok and isinstance(weight, numbers.Real) and not isinstance(weight, bool)
    if not (ok and math.isfinite(weight) and weight >= 0):
      raise ConfigError(field, plain, f"{allowed} (not {key!r}: {weight!r})")
    weights[int(key)] = float(weight)
  return weights


def _check_keys(config, expected, prefix: str) -> None:
  """Unknown or missing keys (from a hand-built ConfigDict) are errors too."""
  for key in config.keys():
    if prefix + str(key) == "class_weight":
      continue  # its keys are class indices, checked by class_weights()
    if key not in expected:
      raise ConfigError(prefix + key, config[key], "unknown key; see safetrain.default_config()")
  for key in expected.keys():
    name = prefix + key
    if key not in config:
      raise ConfigError(name, None, "missing; start from safetrain.default_config()")
    if isinstance(expected[key], ml_collections.ConfigDict) and name != "class_weight":
      _check(
        isinstance(config[key], ml_collections.ConfigDict), name, config[key], "a config group"
      )
      _check_keys(config[key], expected[key], name + ".")
