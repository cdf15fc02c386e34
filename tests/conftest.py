"""Shared test set-up.

The CPU is split into two logical devices before TensorFlow initialises, so
MirroredStrategy runs in-process on this CPU-only machine; single-device runs
use the default strategy on the first one and are unaffected.
"""

import gc
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
  _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)
tf.config.experimental.enable_op_determinism()

from common import BASE, TinyTrainer, tiny_config  # noqa: E402


@pytest.fixture
def workdir(tmp_path):
  return str(tmp_path / "run")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A TinyTrainer workdir at step 25 with ckpt-15, ckpt-20 and ckpt-25
  (common.BASE), trained once per test module that uses it."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  TinyTrainer(tiny_config(**BASE), str(workdir)).fit()
  return workdir


@pytest.fixture
def run(trained, tmp_path):
  """A copy of `trained` for one test to damage."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


@pytest.fixture(autouse=True)
def _collect_garbage():
  """Collects each test's garbage when it ends, and freezes what survives.

  TensorFlow keeps about 9,000 objects of every trainer's traced graphs alive
  for the life of the process; by the end of the suite the heap held 1.5
  million objects, and each full collection Python's collector started in
  the middle of a later test walked all of them (up to 90 s of one test's
  time). Frozen objects are never walked again.
  """
  yield
  gc.collect()
  gc.freeze()
