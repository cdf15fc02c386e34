"""Adaptive clipping (ZClip): what it clips, and its state across a resume
and a rollback."""

import numpy as np
import pytest
import tensorflow as tf
from common import TinyTrainer, tiny_config, weights

import safetrain
from safetrain.step.clipping import GradientClip


def feed(clip, norms):
  state = clip.read()
  limits = []
  for n in norms:
    norm = tf.constant(n, tf.float32)
    limit = clip.threshold(state, norm)
    limits.append(float(limit))
    state = clip.observe(state, norm, limit, tf.constant(True))
  clip.write(state)
  return limits


def test_adaptive_clipping_clips_only_the_spike_after_the_warm_up():
  clip = GradientClip(mode="adaptive", global_norm=0.0, ema=0.9, z_threshold=2.5, warmup_steps=4)
  norms = [1.0, 1.2, 0.8, 1.0, 1.1, 0.9, 50.0, 1.0]
  limits = feed(clip, norms)
  # Warm-up: no cap (global_norm 0); after it, a normal norm passes.
  assert limits[:4] == [float("inf")] * 4
  assert limits[4] == pytest.approx(1.1) and limits[5] == pytest.approx(0.9)
  # The spike is cut to mean + z^2 * std / z (< 2: nowhere near 50).
  assert limits[6] < 2.0
  # It fed its clipped value, not 50: the statistics stay small.
  assert float(clip.mean.numpy()) < 1.5 and int(clip.count.numpy()) == 8


def test_fixed_clipping_is_the_global_norm():
  clip = GradientClip(mode="fixed", global_norm=1.0)
  assert feed(clip, [0.5, 3.0]) == [1.0, 1.0] and clip.read() == ()


def clip_state(t):
  c = t.state["clip"]
  return [v.numpy() for v in (c.mean, c.var, c.count, c.warm_sum, c.warm_sq)]


def adaptive(steps, **kw):
  return tiny_config(
    **{
      "train.steps": steps,
      "checkpoint.every_steps": 4,
      "clip.mode": "adaptive",
      "clip.warmup_steps": 5,
      **kw,
    }
  )


def test_adaptive_clipping_state_survives_a_resume_bit_exactly(tmp_path):
  TinyTrainer(adaptive(13), str(tmp_path / "resumed")).fit()
  resumed = TinyTrainer(adaptive(26), str(tmp_path / "resumed"))
  resumed.fit()
  straight = TinyTrainer(adaptive(26), str(tmp_path / "straight"))
  straight.fit()
  assert int(straight.state["clip"].count.numpy()) == 26
  for a, b in zip(clip_state(resumed) + weights(resumed), clip_state(straight) + weights(straight)):
    np.testing.assert_array_equal(a, b)


def test_adaptive_clipping_state_is_carried_across_a_rollback(tmp_path):
  t = TinyTrainer(adaptive(20, **{"drill.loss_steps": "12-14"}), str(tmp_path))
  r = t.fit()
  assert r.rollbacks == 1
  # Not rolled back: every good step fed it, including those redone.
  assert int(t.state["clip"].count.numpy()) == r.attempts - r.skipped_steps


def test_clip_mode_is_checked(tmp_path):
  c = tiny_config(**{"clip.mode": "zclip"})
  with pytest.raises(safetrain.ConfigError, match="clip.mode"):
    TinyTrainer(c, str(tmp_path)).fit()
