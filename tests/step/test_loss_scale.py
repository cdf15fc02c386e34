"""The dynamic loss scaler: growth, hysteresis, floor, cap, checkpointing."""

import tensorflow as tf

from safetrain.step.loss_scale import DynamicLossScale


def make(**kw):
  args = dict(
    initial=8.0,
    growth_interval=3,
    growth_factor=2.0,
    backoff_factor=0.5,
    hysteresis=2,
    min_scale=1.0,
    max_scale=32.0,
  )
  args.update(kw)
  return DynamicLossScale(**args)


def run(ls, pattern):
  """Feeds a string of g (finite grads) / o (overflow) through a compiled update."""
  update = tf.function(ls.update)
  for ch in pattern:
    update(tf.constant(ch == "g"))
  return float(ls.scale.numpy())


def test_grows_after_growth_interval_good_steps():
  ls = make()
  assert run(ls, "gg") == 8.0
  assert run(ls, "g") == 16.0
  assert int(ls.good_steps.numpy()) == 0


def test_hysteresis_then_backoff_and_growth_refills_hysteresis():
  ls = make()
  assert run(ls, "o") == 8.0  # first overflow spends hysteresis only
  assert run(ls, "o") == 4.0  # second drops the scale
  assert run(ls, "o") == 2.0  # hysteresis stays spent until the scale grows
  assert run(ls, "ggg") == 4.0
  assert int(ls.hysteresis_left.numpy()) == 2
  assert run(ls, "o") == 4.0


def test_an_overflow_resets_the_growth_count():
  ls = make()
  assert run(ls, "ggog") == 8.0
  assert run(ls, "gg") == 16.0


def test_never_under_the_floor():
  ls = make(hysteresis=1)
  assert run(ls, "o" * 20) == 1.0
  assert bool(ls.at_floor().numpy())


def test_never_over_the_cap():
  ls = make(initial=16.0)
  assert run(ls, "g" * 30) == 32.0


def test_disabled_is_a_constant_one():
  ls = make(enabled=False)
  assert run(ls, "ooogg") == 1.0


def test_checkpoint_round_trip(tmp_path):
  ls = make()
  run(ls, "oggg" + "o")
  saved = (ls.scale.numpy(), ls.good_steps.numpy(), ls.hysteresis_left.numpy())
  path = tf.train.Checkpoint(ls=ls).save(str(tmp_path / "ls"))
  other = make()
  tf.train.Checkpoint(ls=other).restore(path).assert_consumed()
  assert (other.scale.numpy(), other.good_steps.numpy(), other.hysteresis_left.numpy()) == saved


def reference(pattern, *, initial=8.0, interval=3, hysteresis=2, lo=1.0, hi=32.0):
  """The rule as the nested conds it once was, in Python: g a good step, o
  an overflow, s a step skipped for another reason (not counted)."""
  scale, good, left, out = initial, 0, hysteresis, []
  for ch in pattern:
    if ch == "g":
      good += 1
      if good >= interval:
        scale, good, left = min(scale * 2.0, hi), 0, hysteresis
    elif ch == "o":
      good, left = 0, left - 1
      if left <= 0:
        scale = max(scale * 0.5, lo)
      left = max(left, 0)
    out.append((scale, good, left))
  return out


def test_the_branchless_update_follows_the_rule_step_by_step():
  ls = make()
  update = tf.function(ls.update)
  pattern = "gsgoogggsgooogsggggggggggoogogssggg" + "o" * 6 + "g" * 9
  seen = []
  for ch in pattern:
    update(tf.constant(ch == "g"), tf.constant(ch != "s"))
    seen.append(
      (float(ls.scale.numpy()), int(ls.good_steps.numpy()), int(ls.hysteresis_left.numpy()))
    )
  assert seen == reference(pattern)
