"""Preflight (guard.preflight): findings about the first batch before step 1."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from classification import SpiralTrainer
from classification import get_config as spiral_config
from common import TinyTrainer, tiny_config

import safetrain
from safetrain.diagnosis import preflight


def built(cls, workdir, **overrides):
  t = cls(tiny_config(**overrides), workdir)
  t.build()
  return t


class UnscaledNaNTrainer(TinyTrainer):
  """In the first batch, column 0 ranges over 1000..4000 and column 1 has NaN
  in rows 0, 5 and 9."""

  def build_train_dataset(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    x[:, 0] = 1000.0 + 200.0 * (np.arange(64) % 16)
    x[[0, 5, 9], 1] = np.nan
    y = np.zeros((64, 1), np.float32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


class WideTrainer(TinyTrainer):
  """Inputs of 1000: `first` outputs 40, `wide` outputs 40 * 8 * kernel."""

  wide_kernel = 500.0  # 1.6e5: past float16's 65504

  def build_model(self):
    const = keras.initializers.Constant
    return keras.Sequential(
      [
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu", name="first", kernel_initializer=const(0.01)),
        keras.layers.Dense(4, name="wide", kernel_initializer=const(self.wide_kernel)),
        keras.layers.Dense(1, name="head", kernel_initializer=const(1e-4)),
      ]
    )

  def build_train_dataset(self):
    x = np.full((32, 4), 1000.0, np.float32)
    y = np.zeros((32, 1), np.float32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


class NearWideTrainer(WideTrainer):
  wide_kernel = 25.0  # 8000: finite, but over 10% of 65504


def audit(t):
  g = t.config.guard
  return preflight.audit(
    t.parts.forensics,
    t.parts.feed.first_batch,
    bad_inputs=g.bad_inputs,
    fp16_margin=g.preflight_fp16_margin,
  )


def test_unscaled_and_nan_inputs_are_named(workdir):
  t = built(UnscaledNaNTrainer, workdir)
  findings = audit(t)
  unscaled = [f for f in findings if f.startswith("normalize")]
  nan = [f for f in findings if "non-finite input" in f]
  assert len(unscaled) == 1 and "x[:, 0]: range 1000..4000" in unscaled[0]
  assert "x[:, 1]" not in unscaled[0]  # NaN is not "out of scale"
  assert len(nan) == 1 and "x[:, 1] (NaN in 3 of 16 rows)" in nan[0]
  # The rest of the batch is healthy: no loss or gradient finding.
  assert len(findings) == 2, findings


def test_the_threshold_is_a_config_key(workdir):
  t = built(UnscaledNaNTrainer, workdir, **{"guard.preflight_max_abs_input": 1e4})
  assert not [f for f in audit(t) if f.startswith("normalize")]


def test_healthy_experiment_has_no_findings(workdir):
  for policy in ("float32", "mixed_float16"):
    c = spiral_config("smoke")
    c.precision.policy = policy
    t = SpiralTrainer(c, os.path.join(workdir, policy))
    t.build()
    assert audit(t) == []
  t = built(TinyTrainer, os.path.join(workdir, "tiny"))
  assert audit(t) == []


def test_fp16_overflow_and_near_overflow_are_named_by_layer(workdir):
  t = built(WideTrainer, os.path.join(workdir, "a"), **{"precision.policy": "mixed_float16"})
  over = [f for f in audit(t) if "float16" in f]
  assert len(over) == 1
  assert "wide output overflowed float16" in over[0] and "max |activation| 1.6e5" in over[0]
  assert 'dtype="float32"' in over[0] and "mixed_bfloat16" in over[0]

  t = built(NearWideTrainer, os.path.join(workdir, "b"), **{"precision.policy": "mixed_float16"})
  near = [f for f in audit(t) if "float16" in f]
  assert len(near) == 1 and near[0].startswith("layer wide (Dense) reaches max |activation| 8000")
  # The same model in float32 has nothing to fear from float16's range.
  t = built(NearWideTrainer, os.path.join(workdir, "c"))
  assert not [f for f in audit(t) if "float16" in f]


class InfLossTrainer(TinyTrainer):
  """A hand-written BCE: log(1 - p) is -inf where the sigmoid saturates to 1."""

  def build_model(self):
    return keras.Sequential(
      [keras.Input((4,)), keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(50))]
    )

  def build_train_dataset(self):
    x = np.ones((32, 4), np.float32)
    return tf.data.Dataset.from_tensor_slices((x, np.zeros((32, 1), np.float32))).batch(16)

  def compute_loss(self, model, batch, training):
    x, y = batch
    p = tf.clip_by_value(tf.sigmoid(model(x, training=training)), 0.0, 1.0)
    return -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))


def test_nonfinite_initial_loss_names_the_loss(workdir):
  t = built(InfLossTrainer, workdir)
  (finding,) = audit(t)
  assert finding.startswith("the initial loss is Inf")
  assert "the loss function is the culprit" in finding and "Log op (-Inf)" in finding


def test_strict_raises_before_step_one(workdir):
  t = UnscaledNaNTrainer(tiny_config(**{"guard.preflight": "strict"}), workdir)
  with pytest.raises(safetrain.PreflightError, match=r"normalize x\[:, 0\]"):
    t.fit()
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "checkpoint"))
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


class ProbabilityHeadTrainer(TinyTrainer):
  """A 3-class softmax head named `probs`, in the policy's dtype unless
  `head_dtype` says otherwise."""

  head_dtype = None

  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(3, activation="softmax", name="probs", dtype=self.head_dtype),
      ]
    )

  def build_train_dataset(self):
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((x, np.arange(32) % 3)).batch(16)


class Float32HeadTrainer(ProbabilityHeadTrainer):
  head_dtype = "float32"


class SigmoidSubclassed(keras.Model):
  def __init__(self):
    super().__init__()
    self.hidden = keras.layers.Dense(8, activation="relu")
    self.out = keras.layers.Dense(1, name="is_positive")
    self.act = keras.layers.Activation("sigmoid", name="p_positive")

  def call(self, x):
    return self.act(self.out(self.hidden(x)))


class SigmoidHeadTrainer(ProbabilityHeadTrainer):
  def build_model(self):
    return SigmoidSubclassed()

  def build_train_dataset(self):
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((x, np.ones((32, 1), np.float32))).batch(16)


def test_float16_output_activation_is_named_with_tensorflows_advice(workdir):
  fp16 = {"precision.policy": "mixed_float16", "loss": "sparse_categorical_crossentropy"}
  t = built(ProbabilityHeadTrainer, os.path.join(workdir, "a"), **fp16)
  (finding,) = audit(t)
  assert finding.startswith("output layer probs (Dense) computes its softmax in float16")
  assert "(-1/p) overflows" in finding and "loss scale to its floor" in finding
  assert 'dtype="float32" on probs' in finding
  assert 'keras.layers.Activation("softmax", dtype="float32")' in finding

  # A subclassed model whose output is a separate sigmoid activation layer.
  fp16["loss"] = "binary_crossentropy"
  t = built(SigmoidHeadTrainer, os.path.join(workdir, "b"), **fp16)
  (finding,) = audit(t)
  assert finding.startswith("output layer p_positive (Activation) computes its sigmoid")
  assert 'keras.layers.Activation("sigmoid", dtype="float32")' in finding

  # The advice followed, or no float16 at all: nothing to say.
  fp16["loss"] = "sparse_categorical_crossentropy"
  t = built(Float32HeadTrainer, os.path.join(workdir, "c"), **fp16)
  assert audit(t) == []
  t = built(ProbabilityHeadTrainer, os.path.join(workdir, "d"), loss=fp16["loss"])
  assert audit(t) == []


def test_strict_stops_on_a_float16_softmax_head(workdir):
  c = tiny_config(
    **{
      "guard.preflight": "strict",
      "precision.policy": "mixed_float16",
      "loss": "sparse_categorical_crossentropy",
    }
  )
  with pytest.raises(safetrain.PreflightError, match="output layer probs"):
    ProbabilityHeadTrainer(c, workdir).fit()
