"""NaN forensics: the diagnosis names the layer, the loss or the gradients."""

import dataclasses
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import TinyTrainer, tiny_config
from test_preflight import InfLossTrainer, WideTrainer

import safetrain
from safetrain.diagnosis import forensics


def built(cls, workdir, **overrides):
  t = cls(tiny_config(**overrides), workdir)
  t.build()
  return t


def diagnose(t, kind="nonfinite_loss", step=7):
  return forensics.diagnose(t.parts.forensics, kind=kind, batch=t.parts.feed.first_batch, step=step)


def state(t):
  return [v.numpy().copy() for v in t.model.variables + t.optimizer.variables]


def same(a, b):
  return all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))


class BlowupTrainer(TinyTrainer):
  """`blowup` multiplies positive inputs by 1e38: Inf in float32."""

  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu", name="hidden"),
        keras.layers.Dense(4, name="blowup", kernel_initializer=keras.initializers.Constant(1e38)),
        keras.layers.Dense(1),
      ]
    )

  def build_train_dataset(self):
    x = np.full((32, 4), 2.0, np.float32)
    return tf.data.Dataset.from_tensor_slices((x, np.zeros((32, 1), np.float32))).batch(16)


def test_names_the_layer_whose_output_overflows(workdir):
  t = built(BlowupTrainer, workdir)
  text = diagnose(t, step=41)
  assert "layer blowup (Dense) is the first whose output is non-finite at step 41" in text
  assert (
    "its largest weight is 1e38" in text
    and "max |activation| of the layers before it: hidden" in text
  )


def test_fp16_overflow_is_named_end_to_end(workdir):
  """A real run: the compiled step diverges, the trainer stashes the batch,
  and the abort's diagnosis names the layer and its float32 magnitude."""
  c = tiny_config(**{"precision.policy": "mixed_float16", "guard.rollback_after": 1})
  c.recovery.enabled = False
  with pytest.raises(safetrain.DivergenceError) as err:
    WideTrainer(c, workdir).fit()
  assert (
    "wide output overflowed float16 at step 1: max |activation| 1.6e5 (float16 holds at most "
    "65504); max |activation| of the layers before it: first 40" in err.value.diagnosis
  )
  assert 'keep wide in float32 (dtype="float32"' in err.value.diagnosis
  # Also named: the unnormalized inputs behind it.
  assert "x[:, 0]: range 1000..1000" in err.value.diagnosis


def test_names_the_loss_function(workdir):
  t = built(InfLossTrainer, workdir)
  text = diagnose(t)
  assert "every layer output is finite" in text
  assert "the loss is Inf: the loss function is the culprit (a Log op (-Inf)" in text
  # check_numerics is switched off again afterwards.
  assert np.isneginf(tf.math.log(tf.constant(0.0)).numpy())


class ExpModel(keras.Model):
  """Subclassed: its own call (not a layer) overflows between two layers."""

  def __init__(self):
    super().__init__(name="expmodel")
    self.hidden = keras.layers.Dense(8, name="hidden")
    self.head = keras.layers.Dense(1, name="head")

  def call(self, x, training=False):
    return self.head(tf.exp(1000.0 * tf.abs(self.hidden(x))))


class SubclassedTrainer(TinyTrainer):
  def build_model(self):
    return ExpModel()


def test_subclassed_model_names_the_op_in_its_own_call(workdir):
  t = built(SubclassedTrainer, workdir)
  text = diagnose(t)
  assert "an Exp op (+Inf) in expmodel's own call, between its layers" in text
  assert "reaching layer head" in text and "hidden" in text


class SqrtGradTrainer(TinyTrainer):
  """Finite forward and loss; d sqrt(u)/du at u = 0 is Inf, so every gradient is NaN."""

  def compute_loss(self, model, batch, training):
    x, y = batch
    pred = model(x, training=training)
    return tf.reduce_mean(tf.sqrt(tf.square(pred - y) * 0.0))


def test_nonfinite_gradients_name_the_variables(workdir):
  t = built(SqrtGradTrainer, workdir)
  text = diagnose(t, kind="nonfinite_grads")
  assert "the forward pass and the loss (0) are finite, but the gradients of 4 variables" in text
  assert re.search(r"sequential_?\d*/dense_?\d*/kernel", text)
  assert "the first bad op is a SqrtGrad op (+Inf) in the backward pass" in text


class BatchNormDropoutTrainer(TinyTrainer):
  def build_model(self):
    return keras.Sequential(
      [
        keras.Input((4,)),
        keras.layers.Dense(8),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(4, name="blowup", kernel_initializer=keras.initializers.Constant(1e38)),
        keras.layers.Dense(1),
      ]
    )


def test_replay_changes_no_variable(workdir):
  t = built(BatchNormDropoutTrainer, workdir)
  before = state(t)
  text = diagnose(t)
  assert "blowup" in text or "loss" in text
  assert same(before, state(t))
  # Layers are unwrapped again: calls no longer go through the recorder.
  assert all("call" not in vars(layer) for layer in t.model._flatten_layers())


def test_an_injected_fault_is_reported_as_not_reproduced(workdir):
  t = built(TinyTrainer, workdir, **{"drill.loss_steps": "3"})
  text = diagnose(t)
  assert "the replay of this batch is finite" in text
  assert "did not reproduce (injected by config.drill" in text
  assert "the largest gradient norms: sequential" in text


def test_nonfinite_params_and_missing_batch(workdir):
  t = built(TinyTrainer, workdir)
  kernel = t.model.layers[0].kernel
  kernel.assign(tf.fill(kernel.shape, np.nan))
  text = forensics.diagnose(t.parts.forensics, kind="nonfinite_params", batch=None, step=9)
  assert text.startswith("After the update of step 9, these variables are non-finite: ")
  assert kernel.path in text
  text = forensics.diagnose(t.parts.forensics, kind="nonfinite_loss", batch=None, step=9)
  assert "not kept" in text


def test_never_raises(workdir):
  t = built(TinyTrainer, workdir)
  # Anything going wrong inside falls back to a plain sentence.
  t.parts.forensics = dataclasses.replace(t.parts.forensics, model=None)
  assert diagnose(t) == "the loss was not finite."
  assert os.path.isdir(workdir)


def test_loss_spike_compares_the_replayed_loss_with_the_running_mean(workdir):
  t = built(TinyTrainer, workdir)
  t.state["spike"].mean.assign(0.01)
  text = diagnose(t, kind="loss_spike")
  assert "x its running mean 0.01" in text and "the largest gradient norms:" in text
