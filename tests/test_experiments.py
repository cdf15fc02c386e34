"""Every experiment file, end to end, on its `:smoke` variant.

Parametrized over experiments/*.py, so a new experiment is covered without
touching this file. Each file must be a complete experiment (docstring with a
run command, `get_config` whose configs validate, a Trainer it names). Then:
linear_regression and classification run through the real command in a
subprocess (`python -m safetrain --config=PATH:smoke`), since they are what
`make run` and the README use; a subprocess costs ~7 s of TensorFlow start-up
on this machine, so the zoo_* entries run in-process in tests/test_zoo.py
(which must mention each of them), and any other experiment runs in-process
here.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
from common import ROOT

import safetrain
from safetrain.cli import experiment

EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))
IDS = [os.path.splitext(os.path.basename(p))[0] for p in EXPERIMENTS]
SUBPROCESS = ("linear_regression", "classification")


def name_of(path):
  return os.path.splitext(os.path.basename(path))[0]


def load(path):
  return experiment.load_module(path)


def expected_exit_code(module):
  """0 unless the experiment documents that it is meant to stop (exit 3)."""
  return getattr(module, "EXPECTED_EXIT_CODE", 0)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_the_experiments_are_found():
  assert set(SUBPROCESS) <= set(IDS)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=IDS)
def test_experiment_file_is_complete(path):
  module = load(path)
  doc = module.__doc__ or ""
  assert f"--config=experiments/{name_of(path)}.py" in doc, "docstring lacks the run command"
  assert "smoke" in doc, "docstring does not mention the :smoke variant"
  for arg in (None, "smoke"):
    config = module.get_config(arg)
    safetrain.validate(config)
    cls = experiment.resolve_trainer(config.trainer, module)
    assert issubclass(cls, safetrain.Trainer)
  smoke, full = module.get_config("smoke"), module.get_config(None)
  assert smoke.train.steps < full.train.steps
  assert smoke.train.steps <= 200, "smoke variants stay short"
  assert expected_exit_code(module) in (0, 3)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=IDS)
def test_experiment_runs_end_to_end(path, tmp_path):
  name = name_of(path)
  module = load(path)
  workdir = tmp_path / "run"
  if name in SUBPROCESS:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
      [sys.executable, "-m", "safetrain", f"--config={path}:smoke", f"--workdir={workdir}"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == expected_exit_code(module), proc.stderr[-3000:]
    # safetrain's own log lines (in WORKDIR/log.txt; INFO is not on the
    # terminal), without the INFO chatter TensorFlow sends through absl on
    # every checkpoint save.
    log = (workdir / "log.txt").read_text()
    assert "Saved healthy checkpoint" in log and "Saved healthy checkpoint" not in proc.stderr
    for text in (log, proc.stderr):
      assert "Sharding callback" not in text and "functional_saver" not in text
  elif name.startswith("zoo_"):
    with open(os.path.join(ROOT, "tests", "test_zoo.py")) as f:
      assert f"import {name}\n" in f.read(), f"tests/test_zoo.py does not test {name}"
    return
  else:
    config = module.get_config("smoke")
    trainer = experiment.resolve_trainer(config.trainer, module)(config, str(workdir))
    if expected_exit_code(module) == 3:
      with pytest.raises(safetrain.DivergenceError):
        trainer.fit()
    else:
      trainer.fit()
  config = json.loads((workdir / "config.json").read_text())["config"]
  assert config["train"]["steps"] == module.get_config("smoke").train.steps
  metrics = read_jsonl(workdir / "metrics.jsonl")
  assert metrics
  if expected_exit_code(module) == 0:
    assert max(r["step"] for r in metrics) == config["train"]["steps"]
  if name == "linear_regression":
    # The documented recovery: the finite blow-up (loss_growth) or the
    # non-finite loss it turns into, rolled back with the rate cut.
    incidents = read_jsonl(workdir / "incidents.jsonl")
    rollbacks = [i for i in incidents if i["action"] == "rollback"]
    assert rollbacks and all(i["kind"] in ("loss_growth", "nonfinite_loss") for i in rollbacks)
    assert all(i["lr_scale_after"] < i["lr_scale_before"] for i in rollbacks)
  if name == "classification":
    assert not os.path.exists(workdir / "incidents.jsonl") or not read_jsonl(
      workdir / "incidents.jsonl"
    )
