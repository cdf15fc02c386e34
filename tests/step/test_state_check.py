"""guard.check_state: a batch whose forward pass poisons BatchNorm statistics
is a bad batch (nonfinite_state), skipped with the state put back, no rate cut."""

import json

import numpy as np
import pytest
import tensorflow as tf
from common import tiny_config

import safetrain
from safetrain import Trainer


class BatchNormTrainer(Trainer):
  """A regression through BatchNorm; rows of batch `poison_at` get huge but
  finite features (1e25), which drive the moving variance to inf."""

  poison_at = 7
  scale = 1e25

  def build_model(self):
    return tf.keras.Sequential(
      [
        tf.keras.Input((4,)),
        tf.keras.layers.Dense(8),
        tf.keras.layers.BatchNormalization(momentum=0.5),
        tf.keras.layers.Dense(1),
      ]
    )

  def build_train_dataset(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * 40, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True).astype("float32")
    x[32 * self.poison_at : 32 * self.poison_at + 4] *= self.scale
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()


def _config(**overrides):
  return tiny_config(
    **{"train.steps": 20, "train.steps_per_loop": 5, "guard.spike_detection": False, **overrides}
  )


def _bn_moving(model):
  bn = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
  return [v.numpy() for v in bn[0].non_trainable_variables]


def test_a_batch_that_poisons_batchnorm_statistics_is_quarantined_not_a_rate_cut(tmp_path):
  t = BatchNormTrainer(_config(), str(tmp_path))
  r = t.fit()
  assert r.step == 20
  state = [i for i in r.incidents if i["kind"] == "nonfinite_state"]
  assert [(i["action"], i["step"], i.get("cause")) for i in state] == [
    ("quarantined_batch", 8, "bad_batch")
  ]
  assert "moving_variance" in state[0]["diagnosis"] or "moving_mean" in state[0]["diagnosis"]
  assert not [i for i in r.incidents if i["action"] == "rollback"]
  assert r.lr_scale == 1.0 and r.quarantined == 1
  assert all(np.isfinite(v).all() and np.abs(v).max() < 1e10 for v in _bn_moving(t.model))
  quarantined = [json.loads(line) for line in open(tmp_path / "quarantine.jsonl")]
  assert [(q["kind"], q["step"], q["position"]) for q in quarantined] == [("nonfinite_state", 8, 7)]


def test_the_check_off_lets_the_poison_through(tmp_path):
  """The control: without the piece the same batch trains and its statistics
  stay in the model (what the piece prevents)."""
  t = BatchNormTrainer(_config(**{"guard.check_state": False}), str(tmp_path))
  try:
    r = t.fit()
  except safetrain.DivergenceError:
    return
  assert not [i for i in r.incidents if i["kind"] == "nonfinite_state"]
  poisoned = not all(np.isfinite(v).all() and np.abs(v).max() < 1e10 for v in _bn_moving(t.model))
  assert poisoned or any(i["action"] == "rollback" for i in r.incidents)


def test_a_clean_batchnorm_run_has_no_state_incident(tmp_path):
  t = BatchNormTrainer(_config(), str(tmp_path))
  t.poison_at = 10_000  # beyond the data: no poisoned rows
  r = t.fit()
  assert r.step == 20 and not r.incidents


def test_state_max_abs_is_validated():
  c = safetrain.default_config()
  c.guard.state_max_abs = -1.0
  with pytest.raises(safetrain.ConfigError, match="state_max_abs"):
    safetrain.validate(c)
