"""TensorBoard scalars in one op: what TensorBoard reads is what
tf.summary.scalar would have written, and a run's loops all land."""

import glob
import os

import numpy as np
import tensorflow as tf
from common import TinyTrainer, tiny_config

from safetrain.records import summaries


def read_scalars(directory):
  """{(step, tag): (value, plugin name)} of every event file under directory."""
  out = {}
  for path in glob.glob(os.path.join(directory, "**", "events.out.tfevents.*"), recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        out[(event.step, value.tag)] = (
          float(tf.make_ndarray(value.tensor)),
          value.metadata.plugin_data.plugin_name,
          tf.make_ndarray(value.tensor).dtype,
        )
  return out


def test_write_scalars_reads_back_like_tf_summary_scalar(tmp_path):
  values = {"loss": 0.25, "grad_norm": 3.0, "eval/loss": 1e-30, "lr": 2e-3}
  one_op, reference = str(tmp_path / "one_op"), str(tmp_path / "reference")
  with tf.summary.create_file_writer(one_op).as_default():
    summaries.write_scalars(values, step=7)
    summaries.write_scalars({}, step=8)  # nothing to write: no event
  with tf.summary.create_file_writer(reference).as_default():
    for tag, v in values.items():
      tf.summary.scalar(tag, v, step=7)
  got, want = read_scalars(one_op), read_scalars(reference)
  assert got == want
  assert set(got) == {(7, tag) for tag in values}
  assert got[(7, "lr")][:2] == (np.float32(2e-3), "scalars")


def test_every_loop_of_a_run_writes_its_loss_at_its_step(workdir):
  config = tiny_config(**{"train.steps": 20, "train.steps_per_loop": 5})
  TinyTrainer(config, workdir).fit()
  scalars = read_scalars(os.path.join(workdir, "events"))
  assert sorted(step for step, tag in scalars if tag == "loss") == [5, 10, 15, 20]
  assert all(np.isfinite(v) for (step, tag), (v, _, _) in scalars.items() if tag == "loss")


def test_scalars_event_is_the_proto_make_tensor_proto_makes_byte_for_byte():
  values = {"a": 0.1, "b": float("nan"), "c": float("inf"), "d": -3e38, "e": 7, "f": 1e-45}
  want = tf.compat.v1.Summary()
  for tag, value in values.items():
    entry = want.value.add(tag=tag)
    entry.metadata.CopyFrom(summaries._SCALAR_METADATA)
    entry.tensor.CopyFrom(tf.make_tensor_proto(np.float32(value)))
  assert summaries.scalars_event(values) == want.SerializeToString()
