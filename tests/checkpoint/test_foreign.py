"""A workdir written for another model (safetrain/checkpoint/foreign.py): the check on a
checkpoint's variable list, before any restore."""

import json

import keras
import pytest

from safetrain.checkpoint import foreign, repair
from safetrain.core.errors import WorkdirError


def _model(hidden=8):
  return keras.Sequential([keras.Input((4,)), keras.layers.Dense(hidden), keras.layers.Dense(1)])


def _saved(model):
  """A checkpoint's (key, shape) list, model variables saved by position."""
  keys = [
    (f"model_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE", list(v.shape))
    for i, v in enumerate(model.variables)
  ]
  return keys + [("run/step/.ATTRIBUTES/VARIABLE_VALUE", [])]


def _workdir(tmp_path, trainer):
  (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer, "config": {}}))
  return str(tmp_path)


def _check(saved, model, workdir, owner="TinyTrainer"):
  notes = repair.Notes()
  foreign.check("ckpt-5", saved, model=model, owner=owner, workdir=workdir, notes=notes)
  return notes.messages


def test_the_same_model_passes_in_silence(tmp_path):
  model = _model()
  assert _check(_saved(model), model, _workdir(tmp_path, "TinyTrainer")) == []
  assert _check(_saved(model), model, str(tmp_path / "no-config")) == []


def test_the_same_shapes_under_another_trainer_name_is_a_warning(tmp_path, capsys):
  model = _model()
  notes = _check(_saved(model), model, _workdir(tmp_path, "OldName"))
  assert len(notes) == 1 and "written by OldName, this is TinyTrainer" in notes[0]
  assert "resuming from it" in capsys.readouterr().err


def test_another_model_is_an_error_naming_the_trainers_and_the_shapes(tmp_path):
  with pytest.raises(WorkdirError) as e:
    _check(_saved(_model(8)), _model(16), _workdir(tmp_path, "WideTrainer"))
  message = str(e.value)
  assert "ckpt-5 was written for a different model" in message
  assert "(it was written by WideTrainer, this is TinyTrainer)" in message
  assert "shapes only in this model: [[4, 16], [16], [16, 1]]" in message
  assert "only in the checkpoint: [[4, 8], [8], [8, 1]]" in message
  assert "\n" not in message


def test_an_older_checkpoint_layout_is_read_through_the_model_and_optimizer_keys(tmp_path):
  model = _model()
  kernel, bias, out_kernel, out_bias = (list(v.shape) for v in model.variables)
  old = [
    ("model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE", kernel),
    ("model/layer_with_weights-0/bias/.ATTRIBUTES/VARIABLE_VALUE", bias),
    ("optimizer/_trainable_variables/2/.ATTRIBUTES/VARIABLE_VALUE", out_kernel),
    ("optimizer/_trainable_variables/3/.ATTRIBUTES/VARIABLE_VALUE", out_bias),
  ]
  assert _check(old, model, str(tmp_path)) == []
  with pytest.raises(WorkdirError, match="holds 3 model variables, this model has 4"):
    _check(old[:3], model, str(tmp_path))
