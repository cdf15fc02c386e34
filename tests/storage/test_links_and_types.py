"""Nothing is written through a link, and a path of the wrong type is one line
(issue 25, items 1, 2 and 8): the command on a workdir whose `.lock` is a
link, whose `events/train` is a file, whose entries link elsewhere, and a
repair that finds `checkpoints/corrupt` as a file."""

import hashlib
import os

import pytest
from common import TinyTrainer, tiny_config
from test_drills import _ckpt_dir, _flip_bytes
from test_lose_nothing import GOOD, _cli, _files, _one_error_line

import safetrain
from safetrain.storage import files as storage
from safetrain.storage import lock as lock_lib

# The command, shortened: a run of the drill experiment to step 30.
SHORT = ("--config.train.steps=30",)


def _sha(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_is_byte_identical(tmp_path, capsys):
  target = tmp_path / "data.bin"
  target.write_bytes(os.urandom(10_000))
  before = _sha(target)
  work = tmp_path / "run"
  work.mkdir()
  os.symlink(target, work / ".lock")
  code, _, err = _cli([f"--config={GOOD}", f"--workdir={work}", *SHORT], capsys)
  _one_error_line(code, err, f"{work}/.lock is a symbolic link (to {target})", "never writes")
  assert _sha(target) == before and target.stat().st_size == 10_000
  assert sorted(os.listdir(work)) == [".lock"]  # a refused run wrote nothing
  # The lock alone (O_NOFOLLOW), without the entries' check, refuses it too.
  with pytest.raises(safetrain.WorkdirError, match="is a symbolic link"):
    lock_lib.WorkdirLock(str(work))._acquire_flock()
  assert _sha(target) == before


@pytest.mark.parametrize(
  "entry, make",
  [
    ("events/train", "file"),  # item 8: was "I/O error on ?: Not a directory"
    ("checkpoints", "file"),
    ("metrics.jsonl", "directory"),
    ("log.txt", "link"),
    ("checkpoints", "link"),
  ],
)
def test_a_workdir_entry_of_the_wrong_type_or_a_link_is_exit_2_naming_it(
  tmp_path, capsys, entry, make
):
  work = tmp_path / "run"
  path = work / entry
  path.parent.mkdir(parents=True)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  if make == "file":
    path.write_text("mine")
  elif make == "directory":
    path.mkdir()
  else:
    os.symlink(elsewhere, path)
  before = _files(work)
  code, _, err = _cli([f"--config={GOOD}", f"--workdir={work}", *SHORT], capsys)
  want = (
    "is a symbolic link"
    if make == "link"
    else f"where safetrain keeps a {'file' if make == 'directory' else 'directory'}"
  )
  _one_error_line(code, err, f"{work}/{entry} ", want)
  assert _files(work) == before and os.listdir(elsewhere) == []


def test_checkpoints_corrupt_existing_as_a_file_is_moved_aside_and_the_run_resumes(run, capsys):
  """Item 2: a damaged checkpoint must go to corrupt/, which is a file: the
  file is kept inside the new corrupt/ and the damage beside it."""
  d = _ckpt_dir(run)
  with open(os.path.join(d, "corrupt"), "w") as f:
    f.write("someone's notes")
  _flip_bytes(os.path.join(d, "ckpt-25.data-00000-of-00001"))
  result = TinyTrainer(tiny_config(**{"train.steps": 30}), str(run)).fit()
  assert result.step == 30
  corrupt = os.path.join(d, "corrupt")
  names = sorted(os.listdir(corrupt))
  assert any(n.startswith("ckpt-25.") for n in names), names
  kept = [n for n in names if n.startswith("corrupt-entry-")]
  assert len(kept) == 1 and open(os.path.join(corrupt, kept[0])).read() == "someone's notes"


def test_the_storage_layer_never_writes_through_a_link(tmp_path):
  target = tmp_path / "target"
  target.write_text("keep")
  link = tmp_path / "link"
  os.symlink(target, link)
  with pytest.raises(safetrain.WorkdirError, match="is a symbolic link"):
    storage.append(str(link), "x\n")
  storage.write(str(link), "new")  # replaces the link itself
  assert target.read_text() == "keep" and not link.is_symlink() and link.read_text() == "new"
  with pytest.raises(safetrain.WorkdirError, match="where safetrain keeps a directory"):
    storage.makedirs(str(target / "sub"))
