"""Getting the model out: the export at the end of fit(), `safetrain export`,
Trainer.restore() and export(), and the learning-rate schedule's serialization.

One subprocess (about 6 s of TensorFlow import) does every fresh-process check:
it loads the Keras file and the SavedModel with safetrain blocked from import,
then runs the real `safetrain export` command on a damaged workdir.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import ROOT, TinyTrainer, regression_data, tiny_config, weights

import safetrain
from safetrain.cli import export as export_command
from safetrain.training import export as export_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished run (checkpoints at 0, 10, 20) and its trainer."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  trainer = TinyTrainer(tiny_config(), workdir)
  result = trainer.fit()
  return workdir, trainer, result


def _copy(workdir, tmp_path):
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  return copy


def _checkpoint_weights(path, n):
  return [
    tf.train.load_variable(path, f"model_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE")
    for i in range(n)
  ]


def _hashes(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, directory)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


_FRESH = textwrap.dedent(
  """
  import os, sys
  sys.modules["safetrain"] = None  # any import of safetrain fails from here on
  import numpy as np, keras, tensorflow as tf
  workdir, out = sys.argv[1], sys.argv[2]
  x = np.load(os.path.join(out, "x.npy"))
  model = keras.saving.load_model(os.path.join(workdir, "export", "model.keras"))
  np.save(os.path.join(out, "keras.npy"), model.predict(x, verbose=0))
  served = tf.saved_model.load(os.path.join(workdir, "export", "saved_model"))
  np.save(os.path.join(out, "served.npy"), served.serve(tf.constant(x)).numpy())
  assert not [m for m in sys.modules if m.startswith("safetrain.")]
  # Then the real command, on the workdir the test damaged.
  del sys.modules["safetrain"]
  from safetrain.cli import main as cli
  sys.argv = ["safetrain", "export", sys.argv[3], "--output", os.path.join(out, "fallback.keras")]
  cli.run()
  """
)


def test_fresh_process_loads_the_export_and_the_command_passes_over_a_damaged_checkpoint(
  trained, tmp_path
):
  workdir, trainer, result = trained
  assert result.exported == os.path.join(workdir, "export", "model.keras")
  # The SavedModel, by the command's code in this process.
  assert export_command.main([workdir, "--format", "saved_model"]) == 0
  damaged = _copy(workdir, tmp_path)
  ckpts = os.path.join(damaged, "checkpoints")
  index = os.path.join(ckpts, "ckpt-20.index")
  open(index, "r+b").truncate(os.path.getsize(index) // 2)
  before = _hashes(ckpts)
  x, _ = regression_data(64, seed=3)
  np.save(tmp_path / "x.npy", x)
  (tmp_path / "fresh.py").write_text(_FRESH)
  p = subprocess.run(
    [sys.executable, str(tmp_path / "fresh.py"), workdir, str(tmp_path), damaged],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  expected = trainer.model.predict(x, verbose=0)
  # The Keras file: identical predictions, without safetrain's code.
  np.testing.assert_array_equal(np.load(tmp_path / "keras.npy"), expected)
  # The SavedModel serves the same predictions (another graph: float tolerance).
  np.testing.assert_allclose(np.load(tmp_path / "served.npy"), expected, rtol=1e-6, atol=1e-6)
  # The command fell back to ckpt-10, said so, and moved nothing.
  assert f"the model of {ckpts}/ckpt-10 -> " in p.stdout
  assert "ckpt-20" in p.stderr and "Traceback" not in p.stderr
  assert _hashes(ckpts) == before
  fallback = keras.saving.load_model(tmp_path / "fallback.keras")
  for a, b in zip(fallback.get_weights(), _checkpoint_weights(os.path.join(ckpts, "ckpt-10"), 4)):
    np.testing.assert_array_equal(a, b)


def test_restore_and_the_export_command_on_a_finished_workdir(trained, tmp_path, capsys):
  workdir, trainer, _ = trained
  fresh = TinyTrainer(tiny_config(), workdir)
  assert fresh.restore() == os.path.join(workdir, "checkpoints", "ckpt-20")
  for a, b in zip(weights(fresh), weights(trainer)):
    np.testing.assert_array_equal(a, b)
  out = str(tmp_path / "m.keras")
  assert export_command.main([workdir, "--output", out]) == 0
  for a, b in zip(keras.saving.load_model(out).get_weights(), weights(trainer)):
    np.testing.assert_array_equal(a, b)
  recorded = json.load(open(os.path.join(workdir, "config.json")))["experiment"]
  assert recorded == {"file": os.path.join(ROOT, "tests", "common.py"), "arg": None}


def _error(capsys, argv):
  capsys.readouterr()
  assert export_command.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("safetrain export: error: ") and "\n" not in err, err
  return err


def test_the_export_command_says_in_one_line_what_it_cannot_find(trained, tmp_path, capsys):
  workdir, _, _ = trained
  assert "no such workdir" in _error(capsys, [str(tmp_path / "nowhere")])
  os.makedirs(tmp_path / "empty")
  assert "has no config.json" in _error(capsys, [str(tmp_path / "empty")])
  assert "must end with .keras" in _error(capsys, [workdir, "--output", str(tmp_path / "m.h5")])
  copy = _copy(workdir, tmp_path)
  config_path = os.path.join(copy, "config.json")
  recorded = json.load(open(config_path))
  recorded["experiment"]["file"] = str(tmp_path / "gone.py")
  json.dump(recorded, open(config_path, "w"))
  assert "gone.py that trained" in _error(capsys, [copy])
  del recorded["experiment"]
  json.dump(recorded, open(config_path, "w"))
  assert "does not name the experiment" in _error(capsys, [copy])
  recorded["experiment"] = {"file": os.path.join(ROOT, "tests", "common.py"), "arg": None}
  recorded["trainer"] = "NoSuchTrainer"
  recorded["config"]["trainer"] = "NoSuchTrainer"
  json.dump(recorded, open(config_path, "w"))
  assert "no Trainer subclass 'NoSuchTrainer'" in _error(capsys, [copy])
  recorded["trainer"] = "TinyTrainer"
  json.dump(recorded, open(config_path, "w"))
  shutil.rmtree(os.path.join(copy, "checkpoints"))
  assert "no healthy checkpoint" in _error(capsys, [copy])
  assert not os.path.exists(os.path.join(copy, "export", "model.keras.tmp"))


def test_the_export_command_passes_over_a_checkpoint_cut_short(trained, tmp_path):
  copy = _copy(trained[0], tmp_path)
  data = os.path.join(copy, "checkpoints", "ckpt-20.data-00000-of-00001")
  open(data, "r+b").truncate(os.path.getsize(data) // 2)
  assert export_command.main([copy]) == 0


def test_an_interrupted_export_leaves_the_previous_one_whole(trained, tmp_path, monkeypatch):
  _, trainer, _ = trained
  out = str(tmp_path / "export" / "model.keras")
  export_lib.export_model(trainer.model, out)
  good = open(out, "rb").read()
  real_save = keras.Model.save

  def killed_mid_write(model, path, *args, **kwargs):
    real_save(model, path, *args, **kwargs)
    open(path, "r+b").truncate(100)  # half written when the signal came
    raise KeyboardInterrupt

  monkeypatch.setattr(keras.Model, "save", killed_mid_write)
  with pytest.raises(KeyboardInterrupt):
    export_lib.export_model(trainer.model, out)
  monkeypatch.undo()
  assert open(out, "rb").read() == good
  assert os.listdir(tmp_path / "export") == ["model.keras"]
  # What a kill -9 leaves (a temporary of a dead process) goes at the next export.
  dead = subprocess.Popen(["true"])
  dead.wait()
  left = tmp_path / "export" / f".model.keras.tmp-{dead.pid}.keras"
  left.write_bytes(good[:100])
  # A SavedModel directory is swapped whole for the new one.
  sm = str(tmp_path / "export" / "saved_model")
  export_lib.export_model(trainer.model, sm, "saved_model")
  zeros = keras.models.clone_model(trainer.model)
  zeros.set_weights([np.zeros_like(w) for w in trainer.model.get_weights()])
  export_lib.export_model(zeros, sm, "saved_model")
  assert sorted(os.listdir(tmp_path / "export")) == ["model.keras", "saved_model"]
  x, _ = regression_data(8)
  served = tf.saved_model.load(sm)
  np.testing.assert_array_equal(served.serve(x).numpy(), np.zeros((8, 1)))


def test_a_model_compiled_with_the_trainer_optimizer_saves_and_reloads(tmp_path):
  config = tiny_config(
    **{"optimizer.schedule": "cosine", "drill.loss_steps": "3-5", "train.steps": 10}
  )
  trainer = TinyTrainer(config, str(tmp_path / "run"))
  result = trainer.fit()
  assert result.lr_scale == 0.5 and result.rollbacks == 1
  model = trainer.model
  model.compile(optimizer=trainer.optimizer, loss="mse")
  model.save(tmp_path / "compiled.keras")
  loaded = keras.saving.load_model(tmp_path / "compiled.keras")
  schedule = loaded.optimizer._learning_rate
  assert type(schedule).__name__ == "ScaledSchedule"
  assert isinstance(schedule.base, keras.optimizers.schedules.CosineDecay)
  assert schedule.base.get_config() == trainer.optimizer._learning_rate.base.get_config()
  assert schedule.lr_scale == 0.5 and schedule.base_factor == 1.0
  assert float(loaded.optimizer.learning_rate) == float(trainer.optimizer.learning_rate)
  # The optimizer's state loads back too (iterations and every slot).
  (unused,) = [v for v in trainer.optimizer.variables if v.name == "learning_rate"]
  kept = [v.numpy() for v in trainer.optimizer.variables if v is not unused]
  assert [v.numpy().tolist() for v in loaded.optimizer.variables] == [v.tolist() for v in kept]
  x, _ = regression_data(16)
  np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
  # The export holds the model only, even of a compiled model.
  path = trainer.export(str(tmp_path / "only.keras"))
  config_text = zipfile.ZipFile(path).read("config.json").decode()
  assert "ScaledSchedule" not in config_text and "optimizer" not in config_text
  np.testing.assert_array_equal(
    keras.saving.load_model(path).predict(x, verbose=0), model.predict(x, verbose=0)
  )


def test_fit_exports_only_when_it_finishes(tmp_path, monkeypatch, caplog):
  ended = []

  class Preempted(TinyTrainer):
    def actions(self):
      return [lambda record: os.kill(os.getpid(), signal.SIGINT) if record.step == 10 else None]

    def callbacks(self):
      return [keras.callbacks.LambdaCallback(on_train_end=ended.append)]

  workdir = str(tmp_path / "preempted")
  result = Preempted(tiny_config(), workdir).fit()
  assert (result.stopped, result.step, result.exported) == ("preempted", 10, None)
  assert not os.path.exists(os.path.join(workdir, "export"))
  assert ended == [{}]  # on_train_end ran (no evaluation: no epoch logs)
  workdir = str(tmp_path / "diverged")
  config = tiny_config(**{"drill.loss_steps": "1-100", "recovery.enabled": False})
  with pytest.raises(safetrain.DivergenceError):
    TinyTrainer(config, workdir).fit()
  assert not os.path.exists(os.path.join(workdir, "export"))
  workdir = str(tmp_path / "data_end")
  result = TinyTrainer(
    tiny_config(**{"train.repeat_data": False, "train.steps": 40}), workdir
  ).fit()
  assert result.stopped == "data_exhausted" and result.step == 16
  assert result.exported == os.path.join(workdir, "export", "model.keras")

  def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(export_lib, "export_model", no_space)
  result = TinyTrainer(tiny_config(), str(tmp_path / "full")).fit()
  assert (result.stopped, result.step, result.exported) == ("completed", 20, None)
  assert "The model was not exported (OSError: [Errno 28] No space left" in caplog.text
