"""The guarded step: classification, skip semantics, clipping, input guard."""

import numpy as np
import pytest
import tensorflow as tf
from common import TinyTrainer, all_finite, regression_data, tiny_config, weights

import safetrain
from safetrain.step import guard
from safetrain.step.loss_watch import SpikeDetector


class OrderedTrainer(TinyTrainer):
  """TinyTrainer without shuffling, optionally leaving out one batch."""

  leave_out = None

  def build_train_dataset(self):
    x, y = regression_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
    if self.leave_out is not None:
      ds = ds.enumerate().filter(lambda i, b: i != self.leave_out).map(lambda i, b: b)
    return ds


def optimizer_state(trainer):
  return [v.numpy() for v in trainer.optimizer.variables]


def test_nan_gradient_at_step_k_is_skipped_and_nothing_else_changes(tmp_path):
  c = tiny_config(**{"train.steps": 10, "optimizer.schedule": "cosine"})
  c.drill.grad_steps = "4"
  hit = OrderedTrainer(c, str(tmp_path / "a"))
  r = hit.fit()

  clean_cfg = tiny_config(**{"train.steps": 10, "optimizer.schedule": "cosine"})
  clean = OrderedTrainer(clean_cfg, str(tmp_path / "b"))
  clean.leave_out = 3  # the batch of attempt 4
  clean.fit()

  assert r.step == 10 and r.attempts == 11 and r.skipped_steps == 1
  [inc] = r.incidents
  # The next batch from the same state trained: a bad batch, quarantined.
  assert (inc["kind"], inc["action"], inc["step"]) == ("nonfinite_grads", "quarantined_batch", 4)
  assert inc["cause"] == "bad_batch" and r.quarantined == 1 and r.rollbacks == 0
  # Weights, optimizer slots and iterations equal a run that never saw batch 4.
  for a, b in zip(weights(hit), weights(clean)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(optimizer_state(hit), optimizer_state(clean)):
    np.testing.assert_array_equal(a, b)
  assert int(hit.optimizer.iterations.numpy()) == 10
  # ... and so does the learning-rate schedule, step by step.
  lr_hit = [m["lr"] for m in safetrain.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))]
  lr_clean = [m["lr"] for m in safetrain.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))]
  assert lr_hit == lr_clean


@pytest.mark.parametrize("skip_update", ["cond", "select"])
def test_skipped_step_restores_batchnorm_statistics(tmp_path, skip_update):
  class BNTrainer(OrderedTrainer):
    def build_model(self):
      import keras

      return keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(), keras.layers.Dense(1)]
      )

  c = tiny_config(**{"train.steps": 3, "train.steps_per_loop": 3, "train.skip_update": skip_update})
  c.drill.input_steps = "2"
  c.drill.input_rows = 16  # the whole batch: nothing left, the batch is skipped
  t = BNTrainer(c, str(tmp_path))
  r = t.fit()
  assert r.skipped_steps == 1 and all_finite(t)
  mm = t.model.layers[0].moving_mean.numpy()
  assert np.all(np.isfinite(mm))


def test_clipping_bounds_the_update_and_reports_the_preclip_norm(tmp_path):
  c = tiny_config(
    **{
      "train.steps": 1,
      "train.steps_per_loop": 1,
      "optimizer.name": "sgd",
      "optimizer.learning_rate": 0.1,
      "clip.global_norm": 1e-3,
    }
  )
  t = OrderedTrainer(c, str(tmp_path))
  t.build()
  before = weights(t)
  t.fit()
  delta = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(weights(t), before)))
  assert delta == pytest.approx(0.1 * 1e-3, rel=1e-3)
  [rec] = safetrain.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert rec["grad_norm"] > 0.01  # the norm before clipping, not after


@pytest.mark.parametrize("policy", ["drop_rows", "skip_batch", "raise"])
def test_nan_rows_under_each_bad_inputs_policy(tmp_path, policy):
  c = tiny_config(**{"train.steps": 6, "guard.bad_inputs": policy, "checkpoint.every_steps": 2})
  c.drill.input_steps = "3"
  c.drill.input_rows = 2
  c.drill.input_feature = 2
  t = OrderedTrainer(c, str(tmp_path))
  if policy == "raise":
    with pytest.raises(safetrain.BadInputError, match=r"step 3: x\[:, 2\] \(2 rows\)"):
      t.fit()
    # Nothing lost: the healthy state before the bad batch is checkpointed.
    assert t.parts.checkpoints.latest_step() == 2 and all_finite(t)
    return
  r = t.fit()
  assert r.step == 6 and all_finite(t)
  [inc] = r.incidents
  assert inc["kind"] == "nonfinite_inputs" and inc["step"] == 3
  assert "x[:, 2]" in inc["diagnosis"]
  recs = safetrain.read_jsonl(str(tmp_path / "metrics.jsonl"))
  dropped = sum(m["dropped_rows"] for m in recs)
  skipped = sum(m["skipped_batches"] for m in recs)
  if policy == "drop_rows":
    assert inc["action"] == "dropped_rows" and (dropped, skipped) == (2, 0)
    assert r.attempts == 6
  else:
    assert inc["action"] == "skipped_batch" and (dropped, skipped) == (0, 1)
    assert r.attempts == 7


def test_drop_rows_computes_the_loss_on_the_remaining_rows(tmp_path):
  """The update with two bad rows dropped equals the update on the clean rows."""
  c = tiny_config(**{"train.steps": 1, "train.steps_per_loop": 1, "optimizer.name": "sgd"})
  c.drill.input_steps = "1"
  c.drill.input_rows = 2
  dropped = OrderedTrainer(c, str(tmp_path / "a"))
  dropped.fit()

  class CleanRows(OrderedTrainer):
    def build_train_dataset(self):
      x, y = regression_data()
      return tf.data.Dataset.from_tensor_slices((x[2:16], y[2:16])).batch(14)

  clean = CleanRows(
    tiny_config(**{"train.steps": 1, "train.steps_per_loop": 1, "optimizer.name": "sgd"}),
    str(tmp_path / "b"),
  )
  clean.fit()
  for a, b in zip(weights(dropped), weights(clean)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mixed_float16_trains_like_float32_with_the_scale_in_metrics(tmp_path):
  losses = {}
  for policy in ("float32", "mixed_float16"):
    c = tiny_config(**{"train.steps": 40, "precision.policy": policy, "train.steps_per_loop": 10})
    r = TinyTrainer(c, str(tmp_path / policy)).fit()
    losses[policy] = r.loss
    recs = safetrain.read_jsonl(str(tmp_path / policy / "metrics.jsonl"))
    scales = {m["loss_scale"] for m in recs}
    assert scales == ({1.0} if policy == "float32" else {2.0**15})
  assert losses["mixed_float16"] == pytest.approx(losses["float32"], rel=0.05)


def test_overflow_is_routine_and_lowers_the_scale_with_hysteresis(tmp_path):
  c = tiny_config(
    **{"train.steps": 10, "precision.policy": "mixed_float16", "train.steps_per_loop": 10}
  )
  c.drill.grad_steps = "3-5"
  c.drill.value = "inf"
  r = TinyTrainer(c, str(tmp_path)).fit()
  assert r.step == 10 and r.rollbacks == 0 and r.incidents == []
  [rec] = safetrain.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert rec["overflow"] == 3 and rec["divergence"] == 0
  # Three overflows with hysteresis 2: one spent, two halvings.
  assert r.loss_scale == 2.0**13


def test_loss_scale_collapse_ends_as_divergence_not_endless_skips(tmp_path):
  c = tiny_config(
    **{"train.steps": 10, "precision.policy": "mixed_float16", "recovery.enabled": False}
  )
  c.loss_scale.initial = 4.0
  c.loss_scale.hysteresis = 1
  c.drill.grad_steps = "1-100000"
  c.drill.value = "inf"
  t = TinyTrainer(c, str(tmp_path))
  with pytest.raises(safetrain.DivergenceError, match="loss_scale_floor"):
    t.fit()
  kinds = [i["kind"] for i in safetrain.read_jsonl(str(tmp_path / "incidents.jsonl"))]
  assert kinds[-1] == "loss_scale_floor" and int(t.state["run"].step.numpy()) == 0
  # loss_scale_floor is only raised at the floor (1.0); the abort then puts
  # the last healthy checkpoint back (ckpt-0, the initial scale 4.0).
  assert float(t.state["loss_scale"].scale.numpy()) == 4.0 and all_finite(t)


def test_nonfinite_loss_is_divergence_and_spike_stats_stay_clean(tmp_path):
  c = tiny_config(**{"train.steps": 10, "guard.rollback_after": 5})
  c.drill.loss_steps = "6-7"
  t = TinyTrainer(c, str(tmp_path))
  r = t.fit()
  assert r.rollbacks == 0 and r.skipped_steps == 2
  assert [(i["kind"], i["count"]) for i in r.incidents] == [("nonfinite_loss", 2)]
  assert np.isfinite(t.state["spike"].mean.numpy()) and np.isfinite(t.state["spike"].dev.numpy())
  # The statistics carried through the compiled loop are stored after it, fed
  # by the 10 good steps only.
  assert int(t.state["spike"].count.numpy()) == 10 and t.state["spike"].mean.numpy() > 0


def test_loss_spike_is_detected_after_warmup(tmp_path):
  class SpikyTrainer(OrderedTrainer):
    def build_train_dataset(self):
      x, y = regression_data(n=16 * 40)
      y[16 * 30 : 16 * 31] *= 1000.0  # batch 31 has absurd targets
      return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

  c = tiny_config(**{"train.steps": 35, "guard.spike_warmup_steps": 10, "guard.rollback_after": 3})
  r = SpikyTrainer(c, str(tmp_path)).fit()
  spikes = [i for i in r.incidents if i["kind"] == "loss_spike"]
  assert [(i["step"], i["count"], i["action"]) for i in spikes] == [(31, 1, "skipped_step")]
  assert r.step == 35 and r.rollbacks == 0


def test_spike_detection_off_neither_flags_nor_keeps_statistics(tmp_path):
  class SpikyTrainer(OrderedTrainer):
    def build_train_dataset(self):
      x, y = regression_data(n=16 * 40)
      y[16 * 30 : 16 * 31] *= 1000.0
      return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

  c = tiny_config(**{"train.steps": 35, "guard.spike_warmup_steps": 10})
  c.guard.spike_detection = False
  c.guard.growth_factor = 0.0  # the 1000x batch would be a finite blow-up
  t = SpikyTrainer(c, str(tmp_path))
  r = t.fit()
  assert r.incidents == [] and r.step == 35 and r.attempts == 35
  assert int(t.state["spike"].count.numpy()) == 0


def test_healthy_runs_have_no_spikes_or_incidents(tmp_path):
  r = TinyTrainer(
    tiny_config(**{"train.steps": 60, "guard.spike_warmup_steps": 5}), str(tmp_path)
  ).fit()
  assert r.incidents == [] and r.skipped_steps == 0


def test_inner_loop_is_traced_once_across_loops_and_lr_scale_changes(tmp_path):
  c = tiny_config(**{"train.steps": 30, "train.steps_per_loop": 4})
  c.drill.loss_steps = "13-15"
  t = TinyTrainer(c, str(tmp_path))
  r = t.fit()
  assert r.rollbacks == 1 and r.lr_scale == 0.5
  assert t.parts.compiled.loop.function.experimental_get_tracing_count() == 1


def test_a_spike_must_also_climb_back_towards_the_first_loss():
  """Late in a run that memorizes its data the running mean is a hundredth of
  the first loss, and one batch at 10x that mean is noise: not a spike under
  the default floor (a tenth of the first loss), a spike without it. A loss
  back near where the run started is a spike either way."""
  c = safetrain.default_config().guard
  # As the loop carries them (SpikeDetector.read): running mean, mean
  # absolute deviation, good steps seen, best running mean, first loss.
  stats = tf.constant([0.001, 0.0001, 5000.0, 0.001, 0.3])

  def detector(fraction):
    return SpikeDetector(
      warmup_steps=c.spike_warmup_steps,
      threshold=c.spike_threshold,
      rel_floor=c.spike_rel_floor,
      decay=c.spike_decay,
      first_loss_fraction=fraction,
    )

  default, off = detector(c.spike_first_loss_fraction), detector(0.0)
  assert c.spike_first_loss_fraction == 0.1
  assert not bool(default.is_spike(stats, tf.constant(0.011)))
  assert bool(off.is_spike(stats, tf.constant(0.011)))
  for spiking in (default, off):
    assert bool(spiking.is_spike(stats, tf.constant(0.05)))
  # A negative first loss (a log-likelihood, say) sets no floor.
  negative = tf.concat([stats[:4], [-2.0]], 0)
  assert bool(default.is_spike(negative, tf.constant(0.011)))


def test_far_above_best_needs_the_loss_back_near_where_the_run_started():
  """A memorizing run moving between running losses of 5.5e-5 and 1.8e-4
  (3.3x apart) far below its first loss of 0.3 is healthy (saved, never
  stalled); back at 0.2 it is far above its best; without the floor the
  ratio alone decides."""

  def watch(mean, fraction=0.1):
    s = SpikeDetector(first_loss_fraction=fraction)
    for var, value in zip(s._vars(), (mean, 0.0, 5000, 5.5e-5, 0.3)):
      var.assign(value)
    return s.far_above_best(3.0)

  assert not watch(1.8e-4)
  assert watch(0.2)
  assert watch(1.8e-4, fraction=0.0)
  assert not watch(1.5e-4)  # under 3x its best either way


def test_the_loss_watch_decides_the_same_in_a_graph_as_eagerly():
  """The statistics travel the compiled loop as one vector; Grappler's
  remapper once turned max(growth_factor * best, first) over an unstacked
  vector into LeakyRelu(best), so every loss above the first was a blow-up."""
  detector = SpikeDetector(warmup_steps=2, growth_factor=1000.0, first_loss_fraction=0.1)
  stats = tf.constant([1.5, 0.01, 5.0, 1.5, 1.6])  # mean, dev, count, best, first

  @tf.function
  def verdicts(stats, loss):
    return detector.is_growth(stats, loss), detector.is_spike(stats, loss)

  for loss, growth, spike in ((2.0, False, False), (10.0, False, True), (2000.0, True, True)):
    eager = (
      detector.is_growth(stats, tf.constant(loss)),
      detector.is_spike(stats, tf.constant(loss)),
    )
    graph = verdicts(stats, tf.constant(loss))
    assert [bool(v) for v in eager] == [bool(v) for v in graph] == [growth, spike], loss


@pytest.mark.parametrize(
  "values",
  [[1.0, -2.0], [3e30, 4e30], [1.0, float("nan")], [float("inf"), 1.0], [0.0, 0.0]],
  ids=["finite", "squares_overflow", "nan", "inf", "zeros"],
)
def test_finite_and_norm_branchless_answers_as_the_branch(values):
  grads = [tf.constant(values[:1]), tf.constant([[values[1]]])]
  forms = [
    tf.function(lambda g, b=b: guard.finite_and_norm(g, branchless=b))(grads) for b in (False, True)
  ]
  (f0, n0), (f1, n1) = [(bool(f), n.numpy()) for f, n in forms]
  assert f0 == f1 and np.array_equal(n0, n1, equal_nan=True), (f0, n0, f1, n1)
  if values == [3e30, 4e30]:
    assert f0 and n0 == pytest.approx(5e30, rel=1e-6)
