"""Issue 25's smaller items: the quarantine diagnosis names the batch's own
step; a state file naming a checkpoint that does not exist is rebuilt from
the files present."""

import json
import os

import tensorflow as tf
from common import TinyTrainer, regression_data, tiny_config

import safetrain
from safetrain.checkpoint import files


class OneBadBatchTrainer(TinyTrainer):
  """Batch position 3 has a row whose scalar loss is log(0): a bad batch at
  step 4, inside the loop of steps 1-5."""

  def build_train_dataset(self):
    x, y = regression_data()
    x[16 * 3 + 3, 0] = 100.0
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)

  def compute_loss(self, model, batch, training):
    x, y = batch
    pred = model(x, training=training)
    marked = tf.cast(x[:, :1] > 50.0, tf.float32)
    return tf.reduce_mean(tf.square(pred - y) + tf.math.log(1.0 - marked)), {}


def test_a_quarantined_batchs_diagnosis_is_headed_by_its_own_step(tmp_path):
  # The quarantine record itself, without the scalar-rows remedy after it.
  c = tiny_config(**{"train.steps": 10, "recovery.scalar_rows": False})
  r = OneBadBatchTrainer(c, str(tmp_path)).fit()
  assert [(i["action"], i["step"]) for i in r.incidents] == [("quarantined_batch", 4)]
  (q,) = safetrain.read_jsonl(os.path.join(tmp_path, "quarantine.jsonl"))
  assert q["attempt"] == 4 and q["diagnosis"].startswith("Step 4 "), q["diagnosis"]
  assert r.incidents[0]["diagnosis"].startswith("Step 4 "), r.incidents[0]["diagnosis"]


def test_a_state_file_naming_an_absent_checkpoint_is_rebuilt_from_the_files(tmp_path):
  """model_checkpoint_path "ckpt-999" beside ckpt-10, ckpt-15, ckpt-20: the
  run resumes from ckpt-20 (it once restarted at 0 and died refusing to
  overwrite ckpt-0)."""
  c = tiny_config(**{"train.steps": 20, "checkpoint.every_steps": 5, "checkpoint.max_to_keep": 3})
  TinyTrainer(c, str(tmp_path)).fit()
  directory = os.path.join(tmp_path, "checkpoints")
  assert sorted(files.scan(directory).files) == [10, 15, 20]
  with open(os.path.join(directory, "checkpoint"), "w") as f:
    f.write('model_checkpoint_path: "ckpt-999"\nall_model_checkpoint_paths: "ckpt-999"\n')
  c.train.steps = 25
  trainer = TinyTrainer(c, str(tmp_path))
  r = trainer.fit()
  assert r.step == 25
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["resumed_from"].endswith("ckpt-20")
  assert any("names ckpt-999 as the latest" in n for n in trainer.parts.checkpoints.repairs)
  found = files.scan(directory)
  assert found.latest == 25 and 20 in found.files
  # The lying state file is kept as evidence.
  corrupt = os.listdir(os.path.join(directory, "corrupt"))
  assert [n for n in corrupt if n.startswith("checkpoint-")], corrupt
