"""Bad input for the command: each case exits 2 with one line naming the
problem, and no traceback.

Most cases call `cli.main_with_exit_code` in-process (a real process costs
seconds of TensorFlow import); one runs the real command to prove the same of
the entry point. Malformed experiment files live in tests/fixtures/configs/.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf
from common import ROOT

import safetrain
from safetrain.cli import experiment
from safetrain.cli import main as cli

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "configs")
GOOD = os.path.join(FIXTURES, "kill_drill.py")
DATA = os.path.join(FIXTURES, "bad_data.py")


def _fixture(name):
  return os.path.join(FIXTURES, name)


def _run(argv, capsys):
  code = cli.main_with_exit_code(["safetrain", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def _assert_one_clear_line(code, err, *expected):
  assert code == 2, err
  assert "Traceback" not in err
  lines = [ln for ln in err.splitlines() if ln.startswith("safetrain: error:")]
  assert len(lines) == 1, err
  for text in expected:
    assert text in lines[0], lines[0]


# (flags after --config=GOOD --workdir=WORKDIR, what the message must name)
FLAG_CASES = {
  "not_an_int": (["--config.train.steps=abc"], ["--config.train.steps=abc", "int"]),
  "a_float_for_an_int": (["--config.train.steps=1.5"], ["--config.train.steps=1.5"]),
  "unknown_key": (
    ["--config.train.stepz=3"],
    ["--config.train.stepz", "no key 'stepz'", "did you mean config.train.steps?"],
  ),
  "unknown_group": (["--config.trian.steps=3"], ["no key 'trian'", "config.train"]),
  "key_below_a_value": (["--config.optimizer.nesterov.x=1"], ["is a value, not a group"]),
  "negative_steps": (["--config.train.steps=-5"], ["config.train.steps = -5", ">= 1"]),
  "zero_steps": (["--config.train.steps=0"], ["config.train.steps = 0"]),
  "steps_per_loop_zero": (
    ["--config.train.steps_per_loop=0"],
    ["config.train.steps_per_loop = 0", ">= 1"],
  ),
  "lr_backoff_one": (["--config.recovery.lr_backoff=1.0"], ["recovery.lr_backoff", "(0.0, 1.0)"]),
  "lr_backoff_zero": (["--config.recovery.lr_backoff=0"], ["recovery.lr_backoff"]),
  "lr_backoff_negative": (["--config.recovery.lr_backoff=-0.5"], ["recovery.lr_backoff"]),
  "nan_learning_rate": (["--config.optimizer.learning_rate=nan"], ["optimizer.learning_rate"]),
  "word_learning_rate": (["--config.optimizer.learning_rate=fast"], ["learning_rate=fast"]),
  "bad_optimizer": (["--config.optimizer.name=adamm"], ["'adamm'", "one of adam"]),
  "bad_policy": (["--config.precision.policy=float64"], ["precision.policy", "mixed_float16"]),
  "bad_bad_inputs": (["--config.guard.bad_inputs=ignore"], ["guard.bad_inputs", "drop_rows"]),
  "bad_recovery_data": (["--config.recovery.data=rewind"], ["recovery.data", "replay"]),
  "bad_strategy": (["--config.distribute.strategy=tpu"], ["distribute.strategy"]),
  "not_a_bool": (["--config.train.deterministic=maybe"], ["deterministic=maybe", "oolean"]),
  "backwards_drill_range": (["--config.drill.loss_steps=9-3"], ["drill.loss_steps"]),
  "max_to_keep_one": (["--config.checkpoint.max_to_keep=1"], ["checkpoint.max_to_keep", ">= 2"]),
  "a_group_set_to_a_number": (["--config.train=3"], ["--config.train=3"]),
  "missing_value": (["--config.seed"], ["--config.seed"]),
  "missing_trainer_class": (
    ["--config.trainer=NoSuchTrainer"],
    ["config.trainer = 'NoSuchTrainer'", "DrillTrainer, WideDrillTrainer"],
  ),
  "trainer_not_a_trainer": (["--config.trainer=keras.Model"], ["a subclass of safetrain.Trainer"]),
  "trainer_module_missing": (["--config.trainer=no_such_module.MyTrainer"], ["importable"]),
  "empty_trainer": (["--config.trainer="], ["config.trainer = ''"]),
  "unknown_flag": (["--bogus=1"], ["Unknown command line flag 'bogus'"]),
  "extra_positional_args": (["train", "now"], ["unexpected arguments: train now"]),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flags_and_values(case, tmp_path, capsys):
  flags_, expected = FLAG_CASES[case]
  workdir = tmp_path / "run"
  code, _, err = _run([f"--config={GOOD}", f"--workdir={workdir}", *flags_], capsys)
  _assert_one_clear_line(code, err, *expected)
  assert not workdir.exists()  # failed before touching the workdir


FILE_CASES = {
  "missing_file": (_fixture("no_such_file.py"), ["no experiment file", "no_such_file.py"]),
  "no_get_config": (_fixture("no_get_config.py"), ["defines no get_config"]),
  "get_config_raises": (
    _fixture("get_config_raises.py"),
    ["get_config() in", "RuntimeError: DATA_DIR is not set"],
  ),
  "get_config_with_a_bad_arg": (
    _fixture("get_config_raises.py") + ":large",
    ["get_config('large')", "RuntimeError"],
  ),
  "returns_a_dict": (_fixture("returns_dict.py"), ["returned dict, not an ml_collections"]),
  "import_error": (_fixture("import_error.py"), ["cannot import", "safetrain_no_such_module"]),
  "unknown_key_in_file": (_fixture("unknown_key.py"), ["config.train.stepz", "unknown key"]),
  "not_from_defaults": (_fixture("not_from_defaults.py"), ["missing; start from"]),
  "wrong_type_in_file": (_fixture("wrong_type.py"), ["wrong_type.py", "'steps'", "<class 'int'>"]),
  "empty_path": ("", ["--config needs a path"]),
  "not_a_python_file": (
    os.path.join(ROOT, "README.md"),
    ["README.md is not an experiment file", "Python file (.py)"],
  ),
  "unknown_arg": (GOOD + ":no_such_arg", ["has no :ARG 'no_such_arg'", "it accepts wide"]),
  "arg_with_an_extra_colon": (
    os.path.join(ROOT, "experiments", "classification.py") + ":smoke:extra",
    ["has no :ARG 'smoke:extra'", "it accepts smoke"],
  ),
  "combined_args_one_unknown": (
    os.path.join(ROOT, "experiments", "zoo_nan_data.py") + ":smoke,imputed",
    ["has no :ARG 'imputed'", "it accepts smoke, impute"],
  ),
  "repeated_arg": (
    os.path.join(ROOT, "experiments", "classification.py") + ":smoke,smoke",
    ["repeats a word"],
  ),
  "arg_to_a_file_without_args": (DATA + ":smoke", ["takes no :ARG", "declares no ARGS"]),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_experiment_files(case, tmp_path, capsys):
  path, expected = FILE_CASES[case]
  code, _, err = _run([f"--config={path}", f"--workdir={tmp_path / 'run'}"], capsys)
  _assert_one_clear_line(code, err, *expected)


def test_an_experiment_with_a_syntax_error(tmp_path, capsys):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(arg=None)\n  return None\n")
  code, _, err = _run([f"--config={path}", f"--workdir={tmp_path / 'run'}"], capsys)
  _assert_one_clear_line(code, err, "cannot import", "SyntaxError", "line 1")


def test_missing_flags_and_flag_order(tmp_path, capsys):
  workdir = f"--workdir={tmp_path / 'run'}"
  _assert_one_clear_line(*_run([workdir], capsys)[::2], "--config=experiments/NAME.py is required")
  _assert_one_clear_line(*_run([f"--config={GOOD}"], capsys)[::2], "--workdir is required")
  code, _, err = _run(["--config.train.steps=5", f"--config={GOOD}", workdir], capsys)
  _assert_one_clear_line(code, err, "before a value for --config")


def test_unwritable_workdirs(tmp_path, capsys):
  # As root, permission bits do not stop writes; a path through a regular file does.
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  for workdir, why in ((blocker / "run", "Not a directory"), (blocker, "File exists")):
    code, _, err = _run([f"--config={GOOD}", f"--workdir={workdir}"], capsys)
    _assert_one_clear_line(code, err, f"--workdir={workdir} is not a writable directory", why)


def test_every_experiment_declares_the_args_it_accepts():
  for path in glob.glob(os.path.join(ROOT, "experiments", "*.py")):
    module = experiment.load_module(path)
    assert "smoke" in module.ARGS, path
    for word in module.ARGS:
      assert experiment.check_arg(module, path, word) == [word]
      safetrain.validate(module.get_config(word))
    if len(module.ARGS) > 1:  # combinations: every word with smoke
      for word in module.ARGS[1:]:
        config = module.get_config(f"{word},smoke")
        assert config.train.steps == module.get_config("smoke").train.steps, (path, word)


def test_a_drill_that_cannot_fire_is_an_error_at_build(tmp_path, capsys):
  # The drill experiment's data has 4 feature columns, and one replica here.
  cases = [
    (
      ["--config.drill.input_steps=3", "--config.drill.input_feature=99"],
      ["config.drill.input_feature = 99", "0..3", "never fires"],
    ),
    (
      ["--config.drill.loss_steps=3", "--config.drill.replica=1"],
      ["config.drill.replica = 1", "below 1"],
    ),
  ]
  for i, (flags_, expected) in enumerate(cases):
    workdir = tmp_path / str(i)
    code, _, err = _run([f"--config={GOOD}", f"--workdir={workdir}", *flags_], capsys)
    _assert_one_clear_line(code, err, *expected)
    assert not os.path.exists(workdir / "checkpoints")  # before any training


def test_lowering_train_steps_below_the_step_reached_is_noted(tmp_path, capsys):
  args = [f"--config={GOOD}", f"--workdir={tmp_path}"]
  code, _, _ = _run([*args, "--config.train.steps=5"], capsys)
  assert code == 0
  code, out, err = _run(
    [*args, "--config.train.steps=3", "--config.train.steps_per_loop=1"], capsys
  )
  assert code == 0 and "step 5:" in out
  assert "note: the workdir was already at step 5, past train.steps=3" in err


def test_help_exits_0_with_the_exit_codes(capsys):
  code, out, _ = _run(["--help"], capsys)
  assert code == 0 and "143" in out and "--workdir" in out


# ------------------------------------------------------------- bad data

DATA_CASES = {
  "NoLabelsTrainer": ["first training batch does not fit", "float32[8, 4]", "(x, y)"],
  "WrongShapeTrainer": ["first training batch does not fit", "float32[8, 3]"],
  "StringsTrainer": ["first training batch does not fit", "string[8, 4]"],
  "UnbatchedTrainer": ["yields scalars", "batch it"],
  "EmptyTrainer": ["empty dataset"],
  "NotADatasetTrainer": ["returned tuple, not a tf.data.Dataset"],
  "NotATrainer": ["config.trainer = 'NotATrainer'", "a subclass of safetrain.Trainer"],
}


@pytest.mark.parametrize("trainer", sorted(DATA_CASES))
def test_bad_datasets_fail_at_build_naming_what_was_expected(trainer, tmp_path, capsys):
  code, _, err = _run(
    [f"--config={DATA}", f"--workdir={tmp_path}", f"--config.trainer={trainer}"], capsys
  )
  _assert_one_clear_line(code, err, *DATA_CASES[trainer])
  assert not os.path.exists(tmp_path / "checkpoints")  # before any training


def _data_trainer(name, tmp_path, **overrides):
  module = experiment.load_module(DATA)
  config = module.get_config()
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  return getattr(module, name)(config, str(tmp_path))


def test_data_running_out_repeats_by_default(tmp_path):
  result = _data_trainer("ShortTrainer", tmp_path).fit()  # 3 batches, 10 steps
  assert result.step == 10 and result.stopped == "completed"


def test_data_running_out_with_repeat_off_stops_cleanly_and_stays_stopped(tmp_path, capsys):
  trainer = _data_trainer("ShortTrainer", tmp_path, **{"train.repeat_data": False})
  result = trainer.fit()
  assert result.stopped == "data_exhausted" and result.step == 3
  assert trainer.parts.checkpoints.latest_step() == 3
  again = _data_trainer("ShortTrainer", tmp_path, **{"train.repeat_data": False}).fit()
  assert again.stopped == "data_exhausted" and again.step == 3  # no hang, no error
  # The command: exit 0, with a note on stderr.
  code, _, err = _run(
    [f"--config={DATA}", f"--workdir={tmp_path / 'cli'}", "--config.train.repeat_data=False"],
    capsys,
  )
  assert code == 0 and "data ended at step 3" in err


def test_a_dataset_with_the_wrong_structure_is_a_bad_input_error_in_python(tmp_path):
  with pytest.raises(safetrain.BadInputError, match="does not fit") as e:
    _data_trainer("WrongShapeTrainer", tmp_path).fit()
  assert isinstance(e.value.__cause__, (ValueError, tf.errors.OpError))  # the original kept


# ------------------------------------------------------ the real command


def test_ctrl_c_while_the_command_imports_tensorflow_exits_143_without_a_traceback(tmp_path):
  # TensorFlow takes seconds to import; a Ctrl-C then, at two moments of it.
  for delay in (1.0, 2.0):
    workdir = tmp_path / f"run{delay}"
    p = subprocess.Popen(
      [sys.executable, "-m", "safetrain", f"--config={GOOD}", f"--workdir={workdir}"],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=dict(os.environ, PYTHONPATH=ROOT),
    )
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "stopped by a signal" in err
    assert not workdir.exists()  # it had not started


def test_the_real_command_prints_one_line_and_no_traceback(tmp_path):
  argv = [f"--config={GOOD}", "--config.train.stepz=3"]
  p = subprocess.run(
    [sys.executable, "-m", "safetrain", f"--workdir={tmp_path / 'run'}", *argv],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert p.returncode == 2, p.stderr
  assert "Traceback" not in p.stderr
  errors = [ln for ln in p.stderr.splitlines() if ln.startswith("safetrain: error:")]
  assert len(errors) == 1 and "no key 'stepz'" in errors[0], p.stderr
  assert p.stdout == ""
