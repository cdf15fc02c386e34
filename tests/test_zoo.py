"""The failure zoo, end to end: each experiments/zoo_*.py smoke variant under
safetrain (in-process), and the same scenario under plain Keras.

The plain-Keras half keeps the zoo honest: every failing entry must really
fail without safetrain, and the healthy control must really be healthy. How
plain Keras fails is the platform's business (a NaN loss or an Inf one, NaN
predictions or constant ones: a CPU's ReLU may or may not turn NaN into 0),
so those tests assert that the run is broken, not the way it breaks. Zoo
item 1 is experiments/linear_regression.py; its safetrain run is tested end
to end in test_experiments.py, its plain-Keras failure here.
"""

import json
import os

import keras
import linear_regression
import numpy as np
import pytest
import zoo_batchnorm_outliers
import zoo_clipped_bce
import zoo_dead_relu
import zoo_fp16_overflow
import zoo_glm_exp
import zoo_nan_data
import zoo_not_learning
import zoo_relu_unscaled
import zoo_rnn_exploding
import zoo_wide_healthy
from common import all_finite

import safetrain


def fit(module, arg, workdir):
  config = module.get_config(arg)
  trainer = getattr(module, config.trainer)(config, str(workdir))
  return trainer, trainer.fit()


def records(workdir, name):
  path = os.path.join(str(workdir), name)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plain_keras(model, optimizer, loss, x, y, steps=10, batch_size=32):
  """model.compile + model.fit, no safetrain; returns (epoch loss, model)."""
  n = steps * batch_size
  model.compile(optimizer=optimizer, loss=loss)
  history = model.fit(x[:n], y[:n], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
  return history.history["loss"][-1], model


def weights_finite(model):
  return all(np.all(np.isfinite(np.asarray(w, np.float32))) for w in model.get_weights())


def assert_broken(loss, model):
  """The plain run is broken in some way: a loss or a weight not finite."""
  assert not (np.isfinite(loss) and weights_finite(model)), (loss, "all weights finite")


def kinds_actions(incidents):
  return {(i["kind"], i["action"]) for i in incidents}


# ----------------------------------------------------------- 1: linear regression


def test_linear_regression_plain_keras_goes_nan():
  keras.utils.set_random_seed(0)
  x, y = linear_regression.make_data(320, 0)
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
  loss, model = plain_keras(model, keras.optimizers.SGD(0.1), "mse", x, y)
  assert_broken(loss, model)


# ------------------------------------------------------------ 2: relu unscaled


def test_relu_unscaled_clipping_keeps_sgd_finite_and_learning(tmp_path):
  trainer, result = fit(zoo_relu_unscaled, "smoke", tmp_path)
  assert result.incidents == []
  assert result.step == 200 and result.skipped_steps == 0
  assert all_finite(trainer)
  # Targets are +-1000..10000 (mean square ~3.7e7); the run gets the MSE down
  # by four orders of magnitude.
  assert result.loss < 1e4
  first = records(tmp_path, "metrics.jsonl")[0]
  assert first["grad_norm"] > 1e6  # what clip.global_norm=1.0 tamed


def test_relu_unscaled_plain_keras_goes_nan():
  keras.utils.set_random_seed(0)
  x, y = zoo_relu_unscaled.make_data(1024, 0)
  loss, model = plain_keras(zoo_relu_unscaled.make_model(), keras.optimizers.SGD(0.01), "mse", x, y)
  assert_broken(loss, model)


# --------------------------------------------------------------- 3: clipped BCE


def test_clipped_bce_quarantines_nan_batches_then_drops_their_rows(tmp_path):
  trainer, result = fit(zoo_clipped_bce, "smoke", tmp_path)
  assert result.step == 100
  # The weights stay healthy and the next batches train: the first NaN
  # batches are bad batches, skipped and quarantined; once one is shown
  # bound to its rows, the scalar loss is evaluated per row and the bad rows
  # are dropped. No rollback, no learning-rate cut.
  assert kinds_actions(result.incidents) == {
    ("nonfinite_loss", "quarantined_batch"),
    ("nonfinite_loss", "row_losses"),
    ("nonfinite_loss", "dropped_examples"),
  }
  assert all(i["cause"] == "bad_batch" for i in result.incidents)
  assert result.rollbacks == 0 and result.lr_scale == 1.0
  # Before the remedy ~17 batches of the smoke run were quarantined.
  assert 0 < result.quarantined == result.skipped_steps <= 5
  assert result.examples_dropped >= 5
  quarantined = records(tmp_path, "quarantine.jsonl")
  skipped = [q for q in quarantined if q["action"] == "quarantined_batch"]
  assert len(skipped) == result.quarantined and all(q["position"] >= 0 for q in skipped)
  assert all_finite(trainer)
  assert result.eval_metrics["accuracy"] > 0.85


def test_clipped_bce_plain_keras_goes_nan():
  keras.utils.set_random_seed(0)
  x, y = zoo_clipped_bce.make_data(4096, 0)
  loss, model = plain_keras(
    zoo_clipped_bce.make_model(), keras.optimizers.Adam(0.01), zoo_clipped_bce.clipped_bce, x, y
  )
  assert_broken(loss, model)


# ----------------------------------------------------------------- 4: NaN data


def test_nan_data_rows_are_dropped_counted_and_reported(tmp_path):
  trainer, result = fit(zoo_nan_data, "smoke", tmp_path)
  assert result.step == 60 and result.skipped_steps == 0
  assert result.incidents
  assert kinds_actions(result.incidents) == {("nonfinite_inputs", "dropped_rows")}
  assert all("x[:, " in i["diagnosis"] for i in result.incidents)
  # Exactly the bad rows of the batches the run consumed were dropped.
  # The trainer reads one batch off a first iterator (for preflight) before
  # training, and a seeded shuffle reshuffles per iterator: do the same.
  dataset = trainer.build_train_dataset().repeat()
  next(iter(dataset.take(1)))
  batches = dataset.take(result.attempts)
  expected = sum(int(np.isnan(x.numpy()).any(axis=1).sum()) for x, _ in batches)
  dropped = sum(
    r["dropped_rows"] for r in records(tmp_path, "metrics.jsonl") if "dropped_rows" in r
  )
  assert dropped == expected > 0
  assert all_finite(trainer)
  assert result.loss < 0.5  # the target's variance is ~1.6


def test_nan_data_impute_variant_learns_without_incidents(tmp_path):
  trainer, result = fit(zoo_nan_data, "impute,smoke", tmp_path)
  assert result.incidents == []
  assert all(r.get("dropped_rows", 0) == 0 for r in records(tmp_path, "metrics.jsonl"))
  assert all_finite(trainer)
  assert result.loss < 0.2


def test_nan_data_plain_keras_dies_silently():
  keras.utils.set_random_seed(0)
  x, y = zoo_nan_data.make_data(2048, 0)
  loss, model = plain_keras(zoo_nan_data.make_model(), keras.optimizers.Adam(0.01), "mse", x, y)
  # The first kernel is NaN. Then it depends on the CPU: where ReLU maps NaN
  # to 0 the model predicts one constant and the loss stalls near the
  # target's variance (silently); elsewhere predictions and loss are NaN.
  assert not np.all(np.isfinite(model.layers[0].kernel.numpy()))
  clean = x[~np.isnan(x).any(axis=1)][:256]
  pred = model.predict(clean, verbose=0)
  assert np.isnan(pred).any() or np.ptp(pred) == 0.0
  assert not np.isfinite(loss) or loss > 1.0


# ------------------------------------------------------------ 5: fp16 overflow


def test_fp16_overflow_is_remedied_by_computing_the_layer_in_float32(tmp_path):
  trainer, result = fit(zoo_fp16_overflow, "smoke", tmp_path)
  # Seen on the first batch before step 1, checked by a replay, applied.
  [incident] = result.incidents
  assert (incident["step"], incident["kind"], incident["action"], incident["cause"]) == (
    0,
    "float16_overflow",
    "float32_layers",
    "precision",
  )
  assert incident["layers"] == ["projection"] and 'dtype="float32"' in incident["diagnosis"]
  assert result.rollbacks == 0 and result.lr_scale == 1.0 and result.step == 60
  layers = {layer.name: layer.compute_dtype for layer in trainer.model.layers}
  assert layers["projection"] == "float32" and layers["norm"] == "float16"
  assert all_finite(trainer)
  # The target's variance is 0.35: 0.26 after these 60 steps, 0.037 after
  # the full run's 400 (the :no_fallback variant trains not at all).
  assert result.loss < 0.3
  # The exported model computes what was trained.
  exported = keras.saving.load_model(result.exported, compile=False)
  assert exported.get_layer("projection").compute_dtype == "float32"


def test_fp16_overflow_without_the_fallback_stops_with_a_diagnosis_naming_the_layer(
  tmp_path, caplog
):
  config = zoo_fp16_overflow.get_config("no_fallback,smoke")
  trainer = zoo_fp16_overflow.Fp16OverflowTrainer(config, str(tmp_path))
  with caplog.at_level("WARNING"), pytest.raises(safetrain.DivergenceError) as err:
    trainer.fit()
  # Preflight saw it on the first batch, before step 1.
  preflight = [r.getMessage() for r in caplog.records if "preflight" in r.getMessage()]
  assert any("projection" in m and "float16" in m for m in preflight), preflight
  # Step 1 trained on the rows whose loss was finite (per-example losses);
  # overflow on the rows of every later batch is no bad data but the model.
  assert err.value.step <= 1
  incidents = records(tmp_path, "incidents.jsonl")
  assert {i["kind"] for i in incidents} == {"nonfinite_loss"}
  recovery_actions = [i["action"] for i in incidents if i["action"] in ("rollback", "abort")]
  assert recovery_actions == ["rollback", "abort"]
  rollback = next(i for i in incidents if i["action"] == "rollback")
  assert "projection" in rollback["diagnosis"] and "float16" in rollback["diagnosis"]
  assert "projection" in err.value.diagnosis
  assert os.path.exists(err.value.last_healthy_checkpoint + ".index")
  assert all_finite(trainer)


@pytest.mark.parametrize("variant, bound", [("bf16", 0.25), ("normalized", 0.15)])
def test_fp16_overflow_fixes_train_fine(tmp_path, variant, bound):
  trainer, result = fit(zoo_fp16_overflow, f"{variant},smoke", tmp_path)
  assert result.incidents == []
  assert result.step == 60 and result.skipped_steps == 0
  assert all_finite(trainer)
  assert result.loss < bound  # the target's variance is 0.35
  if variant == "normalized":
    assert trainer.model.layers[0].compute_dtype == "float16"
    assert result.loss_scale == 2.0**15  # no overflow ever backed it off


def test_fp16_overflow_plain_keras_goes_nan():
  keras.utils.set_random_seed(0)
  x, y = zoo_fp16_overflow.make_data(2048, 0)
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = zoo_fp16_overflow.make_model()
    loss, model = plain_keras(model, keras.optimizers.Adam(0.01), "mse", x, y)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  # LossScaleOptimizer skips every update, so the weights stay finite and the
  # model never trains: a non-finite loss on every step.
  assert not np.isfinite(loss)


# ----------------------------------------------------------- 6: exploding RNN


def test_rnn_exploding_clipping_keeps_it_alive(tmp_path):
  trainer, result = fit(zoo_rnn_exploding, "smoke", tmp_path)
  assert result.incidents == []
  assert result.step == 100 and result.skipped_steps == 0
  assert all_finite(trainer)
  assert records(tmp_path, "metrics.jsonl")[0]["grad_norm"] > 1e3
  # Predicting the mean total scores 50/12 = 4.2.
  assert result.loss < 2.0


def test_rnn_exploding_plain_keras_goes_nan():
  keras.utils.set_random_seed(0)
  x, y = zoo_rnn_exploding.make_data(320, 0)
  loss, model = plain_keras(
    zoo_rnn_exploding.make_model(), keras.optimizers.SGD(0.001), "mse", x, y
  )
  assert_broken(loss, model)


# ------------------------------------------------------------ 7: healthy, wide


def test_wide_healthy_guards_change_nothing(tmp_path):
  guarded, r1 = fit(zoo_wide_healthy, "smoke", tmp_path / "guarded")
  unguarded, r2 = fit(zoo_wide_healthy, "unguarded,smoke", tmp_path / "unguarded")
  assert not unguarded.config.guard.check_inputs and not unguarded.config.recovery.enabled
  assert r1.incidents == [] and r2.incidents == []
  assert r1.step == r2.step == 30
  assert all_finite(guarded)
  for a, b in zip(guarded.model.get_weights(), unguarded.model.get_weights(), strict=True):
    np.testing.assert_array_equal(a, b)
  assert r1.loss == r2.loss


def test_wide_healthy_plain_keras_is_healthy_too():
  keras.utils.set_random_seed(0)
  x, y = zoo_wide_healthy.make_data(0)
  model = zoo_wide_healthy.make_model()
  model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
  losses = model.fit(x, y, batch_size=32, epochs=5, verbose=0).history["loss"]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert weights_finite(model)


# ----------------------------------------------------------- 8: dead ReLUs


def test_dead_relu_is_caught_as_a_finite_blow_up_and_recovers(tmp_path):
  trainer, result = fit(zoo_dead_relu, "smoke", tmp_path)
  assert result.step == 200 and all_finite(trainer)
  rollbacks = [i for i in result.incidents if i["action"] == "rollback"]
  assert rollbacks and {i["kind"] for i in rollbacks} == {"loss_growth"}
  assert all(i["restored_step"] == 0 for i in rollbacks)  # before any unit died
  assert result.lr_scale == 0.5 ** len(rollbacks)
  _, y = zoo_dead_relu.make_data(1024, trainer.config.seed + 1)
  assert result.eval_metrics["loss"] < 0.3 * float(np.var(y))


def test_dead_relu_units_are_caught_and_the_layer_named(tmp_path):
  trainer, result = fit(zoo_dead_relu, "smoke,no_growth", tmp_path)
  assert result.step == 200 and all_finite(trainer)
  rollbacks = [i for i in result.incidents if i["action"] == "rollback"]
  assert rollbacks and {i["kind"] for i in rollbacks} == {"dead_units"}
  first = rollbacks[0]["diagnosis"]
  assert "layer hidden3 (Dense, relu)" in first and "(100%)" in first
  assert "learning rate 1 " in first
  # The rate probe chose the lower rate (from the restored state).
  assert "probe" in rollbacks[0]
  assert result.lr_scale == pytest.approx(rollbacks[-1]["lr_scale_after"]) and result.lr_scale < 1
  # Alive again: the model no longer predicts one value.
  _, y = zoo_dead_relu.make_data(1024, trainer.config.seed + 1)
  assert result.eval_metrics["loss"] < 0.9 * float(np.var(y))
  x, _ = zoo_dead_relu.make_data(256, 0)
  assert float(np.std(trainer.model(x).numpy())) > 0.1


def test_dead_relu_healthy_control_has_no_incident(tmp_path):
  _, result = fit(zoo_dead_relu, "healthy,smoke", tmp_path)
  assert result.incidents == [] and result.step == 200


def test_dead_relu_plain_keras_learns_nothing():
  keras.utils.set_random_seed(0)
  x, y = zoo_dead_relu.make_data(4096, 0)
  loss, model = plain_keras(
    zoo_dead_relu.make_model(), keras.optimizers.Adam(1.0), "mse", x, y, steps=100
  )
  # Broken in any way: non-finite, or no better than predicting the mean.
  assert not np.isfinite(loss) or loss > 0.9 * float(np.var(y)), loss


# ------------------------------------------------------------ 9: not learning


def test_not_learning_rate_probe_finds_a_rate_that_learns(tmp_path):
  trainer, result = fit(zoo_not_learning, "smoke", tmp_path)
  assert result.step == 200 and all_finite(trainer)
  (rollback,) = [i for i in result.incidents if i["action"] == "rollback"]
  assert rollback["kind"] == "not_learning" and rollback["cause"] == "not_learning"
  trials = rollback["probe"]
  assert [t["lr_scale"] for t in trials] == pytest.approx([0.5, 0.1, 0.02])
  best = min(trials, key=lambda t: t["loss"])
  assert result.lr_scale == pytest.approx(best["lr_scale"])
  _, y = zoo_not_learning.make_data(4096, 0)
  assert result.loss < 0.1 * float(np.var(y))


def test_not_learning_plain_keras_finishes_no_better_than_the_mean():
  keras.utils.set_random_seed(0)
  x, y = zoo_not_learning.make_data(4096, 0)
  loss, model = plain_keras(
    zoo_not_learning.make_model(), keras.optimizers.Adam(3.0), "mse", x, y, steps=120
  )
  assert weights_finite(model) and np.isfinite(loss)
  assert loss > 0.9 * float(np.var(y)), loss


# ---------------------------------------------------- 10: a GLM broken at once


def test_glm_exp_stops_at_once_with_the_failure_present_from_the_start(tmp_path):
  with pytest.raises(safetrain.DivergenceError) as err:
    fit(zoo_glm_exp, "smoke", tmp_path)
  (abort,) = [i for i in records(tmp_path, "incidents.jsonl") if i["action"] == "abort"]
  assert abort["step"] == 1 and abort["cause"] == "present_from_start"
  assert abort["lr_scale_after"] == 1.0
  assert not [i for i in records(tmp_path, "incidents.jsonl") if i["action"] == "rollback"]
  assert "Exp op" in err.value.diagnosis and "not normalized" in err.value.diagnosis
  assert "learning_rate" not in err.value.diagnosis.split("Stopping because")[1]


def test_glm_exp_scaled_control_has_no_incident(tmp_path):
  _, result = fit(zoo_glm_exp, "smoke,scaled", tmp_path)
  assert result.incidents == [] and result.step == 100


def test_glm_exp_plain_keras_goes_nan():
  keras.utils.set_random_seed(0)
  x, y = zoo_glm_exp.make_data(4096, 0)
  loss, model = plain_keras(
    zoo_glm_exp.make_model(), keras.optimizers.Adam(1e-2), "poisson", x, y, batch_size=64
  )
  assert_broken(loss, model)


# ------------------------------------------- 11: outliers poison BatchNorm


def test_batchnorm_outliers_are_quarantined_and_the_statistics_stay_finite(tmp_path):
  trainer, result = fit(zoo_batchnorm_outliers, "smoke", tmp_path)
  assert result.step == 60 and all_finite(trainer)
  assert kinds_actions(result.incidents) == {("nonfinite_state", "quarantined_batch")}
  assert result.rollbacks == 0 and result.lr_scale == 1.0
  positions = [q["position"] for q in records(tmp_path, "quarantine.jsonl")]
  assert positions == list(zoo_batchnorm_outliers.POISONED)
  assert np.isfinite(result.eval_metrics["loss"]) and result.eval_metrics["loss"] < 0.5


def test_batchnorm_outliers_plain_keras_poisons_the_statistics():
  keras.utils.set_random_seed(0)
  x, y = zoo_batchnorm_outliers.make_data(2048, 0)
  model = zoo_batchnorm_outliers.make_model()
  model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  model.fit(x[: 32 * 30], y[: 32 * 30], batch_size=32, epochs=1, shuffle=False, verbose=0)
  bn = model.layers[1]
  assert not np.all(np.isfinite(bn.moving_variance.numpy()))
  # Inference divides by an infinite variance: one constant (or NaN) for every input.
  clean, _ = zoo_batchnorm_outliers.make_data(256, 1, poisoned=())
  pred = model.predict(clean, verbose=0)
  assert not np.all(np.isfinite(pred)) or float(np.std(pred)) < 1e-6
