"""Config defaults and validation."""

import re

import ml_collections
import pytest
from common import ROOT

import safetrain
from safetrain.core import config as config_lib


def test_defaults_validate_and_hold_every_design_group():
  c = safetrain.default_config()
  safetrain.validate(c)
  for group in (
    "train",
    "eval",
    "optimizer",
    "precision",
    "loss_scale",
    "clip",
    "guard",
    "recovery",
    "checkpoint",
    "distribute",
  ):
    assert isinstance(c[group], ml_collections.ConfigDict), group
  assert c.loss_scale.initial == 2**15 and c.loss_scale.hysteresis == 2
  assert c.loss_scale.growth_interval == 2000 and c.loss_scale.max_scale == 2**24
  assert c.clip.global_norm == 1.0
  assert c.guard.bad_inputs == "drop_rows" and c.recovery.data == "skip"


BAD = [
  ("storage.locking", "fcntl"),
  ("storage.lease_seconds", 0.5),
  ("storage.lease_seconds", float("nan")),
  ("train.steps", 0),
  ("train.steps", -5),
  ("train.batch_size", 0),
  ("train.steps_per_loop", 0),
  ("optimizer.name", "adamm"),
  ("optimizer.learning_rate", 0.0),
  ("optimizer.learning_rate", float("nan")),
  ("optimizer.schedule", "cosinus"),
  ("precision.policy", "float16"),
  ("loss_scale.backoff_factor", 1.5),
  ("loss_scale.min_scale", 0.0),
  ("loss_scale.initial", 2.0**30),
  ("loss_scale.hysteresis", 0),
  ("clip.global_norm", -1.0),
  ("guard.bad_inputs", "ignore"),
  ("guard.rollback_after", 0),
  ("guard.preflight", "loud"),
  ("recovery.lr_backoff", 1.0),
  ("recovery.lr_backoff", 0.0),
  ("recovery.data", "rewind"),
  ("recovery.min_lr_scale", 2.0),
  ("checkpoint.every_steps", 0),
  ("checkpoint.max_to_keep", 1),
  ("distribute.strategy", "tpu"),
  ("drill.loss_steps", "3-1"),
  ("drill.grad_steps", "x"),
  ("drill.value", "zero"),
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_value_is_rejected_naming_the_field(field, value):
  c = safetrain.default_config()
  group, key = field.split(".")
  with c.unlocked():
    c[group][key] = value
  with pytest.raises(safetrain.ConfigError) as err:
    safetrain.validate(c)
  assert err.value.field == field
  assert field in str(err.value) and repr(value) in str(err.value)


def test_warmup_schedule_needs_warmup_steps():
  c = safetrain.default_config()
  c.optimizer.schedule = "warmup_cosine"
  with pytest.raises(safetrain.ConfigError, match="optimizer.warmup_steps"):
    safetrain.validate(c)


def test_unknown_key_is_an_error():
  c = safetrain.default_config()
  with pytest.raises(AttributeError):
    c.lock()
    c.train.stepz = 3
  c2 = safetrain.default_config()
  c2.train.unlock()
  c2.train.stepz = 3
  with pytest.raises(safetrain.ConfigError, match="train.stepz"):
    safetrain.validate(c2)


def test_trainer_validates_before_any_tensorflow_work(tmp_path):
  c = safetrain.default_config()
  c.recovery.lr_backoff = 2.0
  with pytest.raises(safetrain.ConfigError, match="recovery.lr_backoff"):
    safetrain.Trainer(c, str(tmp_path))
  assert not (tmp_path / "config.json").exists()


def test_parse_steps():
  assert config_lib.parse_steps("3, 7-9") == [(3, 3), (7, 9)]
  assert config_lib.parse_steps("") == []


def _integer_keys(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _integer_keys(value, prefix + key + ".")
    elif isinstance(value, int) and not isinstance(value, bool):
      yield prefix + key


INTEGER_KEYS = sorted(_integer_keys(safetrain.default_config()))


def _set(c, field, value):
  *groups, key = field.split(".")
  node = c
  for g in groups:
    node = node[g]
  with c.unlocked():
    node[key] = value


@pytest.mark.parametrize("field", INTEGER_KEYS)
def test_every_integer_key_has_an_upper_bound(field):
  assert len(INTEGER_KEYS) >= 21
  for value in (2**63, 2**64 + 1):
    c = safetrain.default_config()
    _set(c, field, value)
    with pytest.raises(safetrain.ConfigError) as err:
      safetrain.validate(c)
    assert err.value.field == field and "<=" in str(err.value)


@pytest.mark.parametrize(
  "field, value",
  [
    ("seed", 4294967296),  # numpy and TensorFlow seeds are 32-bit
    ("loss_scale.hysteresis", 2**63),
    ("guard.rollback_after", 2**63),
    ("guard.spike_warmup_steps", 2**63),
    ("loss_scale.growth_interval", 2**63),
    ("train.batch_size", 2**31),
  ],
)
def test_the_values_that_overflowed_are_rejected_and_their_bounds_accepted(field, value):
  c = safetrain.default_config()
  _set(c, field, value)
  with pytest.raises(safetrain.ConfigError, match=re.escape(field)):
    safetrain.validate(c)
  c = safetrain.default_config()
  _set(c, field, value - 1 if field in ("seed", "train.batch_size") else 10**6)
  safetrain.validate(c)


def test_a_short_run_fits_the_intervals_to_its_steps_and_says_so(tmp_path, caplog):
  """classification.py has 100-step loops and a 100-step warm-up: a 40-step
  try-out runs, with the loop, intervals and warm-up clamped, once logged."""
  import json
  import os

  from safetrain.cli import main as cli

  root = ROOT
  argv = [
    "safetrain",
    f"--config={os.path.join(root, 'experiments', 'classification.py')}",
    f"--workdir={tmp_path}",
    "--config.train.steps=40",
  ]
  assert cli.main_with_exit_code(argv) == 0
  said = [r.getMessage() for r in caplog.records if "Fitted to train.steps=40" in r.getMessage()]
  assert len(said) == 1
  for note in (
    "train.steps_per_loop 100 -> 40",
    "optimizer.warmup_steps 100 -> 4",
    "eval.every_steps 1000 -> 40",
    "checkpoint.every_steps 1000 -> 40",
  ):
    assert note in said[0]
  resolved = json.load(open(tmp_path / "config.json"))["config"]
  assert resolved["train"]["steps_per_loop"] == 40 and resolved["optimizer"]["warmup_steps"] == 4


def test_clamping_leaves_a_config_that_fits_alone():
  c = safetrain.default_config()
  resolved, notes = config_lib.fit_to_steps(c)
  assert notes == [] and resolved.to_dict() == c.to_dict()
