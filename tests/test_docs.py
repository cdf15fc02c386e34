"""Docs that cannot rot: README.md and docs/*.md are run.

- Every ```python block runs, in page order, in one namespace per page, in a
  temporary directory (relative paths such as runs/mine land there; an
  `experiments` link points at the repository's). Training is shortened:
  every Trainer a page builds (safetrain.fit's too) trains at most
  `STEPS` steps.
- Every command of a ```sh block (and of the README's indented block) is run
  in-process, shortened the same way (`safetrain ...`, `python -m safetrain
  ...`, `safetrain export ...`, `safetrain report ...`), or matches COVERED,
  the list of commands other tests or `make run` run, each checked against
  the file that runs it. A training command runs up to its training (the
  experiment file loaded, the flags parsed, the config validated, the
  trainer built: what a renamed key or hook breaks), since
  tests/test_experiments.py trains every experiment through the command and
  the pages' own trainers train in their python blocks; a block marked
  `train` trains (a page whose next commands read the run's workdir).
  Commands quoted inline (`safetrain report WORKDIR`) must match COVERED too.
- Every relative link resolves (docs/storage.md and docs/errors.md are
  written by other engineers: linked before they exist), and every docs page
  is linked from the README.

An HTML comment just before a block tells the harness what it is:
`<!-- doctest: file=NAME.py -->` writes the block to NAME.py (an experiment
file, importable by the page's later blocks) instead of running it;
`<!-- doctest: exit=N -->` expects exit code N from its commands;
`<!-- doctest: steps=N -->` lets its training run N steps;
`<!-- doctest: train -->` makes its training commands train. At the top
of a page, `<!-- doctest: files-from=PAGE.md -->` writes that page's file
blocks first (an example that builds on another page's trainer).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import io
import os
import re
import shlex
import subprocess
import sys

import pytest
from common import ROOT

from safetrain.trainer import Trainer

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Pages other engineers write: links to them may come before the pages do.
LINKED_AHEAD = ("docs/storage.md", "docs/errors.md")
STEPS = 6  # the most steps any documented training runs here
README_MAX_LINES = 250

# Commands the docs show that this file does not run, and where they run:
# (a regex the command matches, the file that runs it, a text that file
# must contain, so that a renamed script or target fails here).
COVERED = [
  (r"^make run$", "Makefile", "\nrun:"),
  (r"^make test$", "Makefile", "\ntest:"),
  (r"^safetrain report runs/linear_regression$", "Makefile", "safetrain report $(WORKDIR)"),
  (
    r"^safetrain report WORKDIR$|^safetrain report$",
    "tests/records/test_report.py",
    "report.main(",
  ),
  (r"^safetrain export( WORKDIR)?$", "tests/training/test_export.py", "export_command"),
  (r"distribute\.strategy=multi_worker", "tests/test_multiworker.py", "TF_CONFIG"),
  (r"^safetrain export .*--format saved_model", "tests/training/test_export.py", '"saved_model"'),
  (r"^pytest -m multiworker$", "tests/test_multiworker.py", "pytest.mark.multiworker"),
  (r"^pytest -m slow$", "tests/test_applications.py", "pytest.mark.slow"),
  (r"^tensorboard --logdir ", "tests/records/test_tensorboard.py", "summary_iterator"),
  (r"bench_fit\.py", "tests/test_benchmarks.py", "bench_fit."),
  (r"bench_step\.py", "tests/test_benchmarks.py", "bench_step."),
  (r"bench_distribute\.py", "tests/test_benchmarks.py", "bench_distribute."),
  (r"bench_cold\.py", "tests/test_benchmarks.py", "bench_cold."),
  (r"bench_models\.py", "tests/test_benchmarks.py", "bench_models."),
  (r"drill_kill\.py", "tests/test_drills.py", "drill_kill"),
]
# What an inline code span must start with to be a command (with arguments).
ORIGINAL_FIT = Trainer.fit
PROGRAMS = ("safetrain ", "python -m ", ".venv/bin/python ", "make ", "pytest ", "tensorboard ")


@dataclasses.dataclass
class Block:
  page: str
  line: int
  lang: str  # "python", "sh" or other (output, not run)
  code: str
  options: dict


def rel(path: str) -> str:
  return os.path.relpath(path, ROOT)


_DIRECTIVE = re.compile(r"<!--\s*doctest:(.*?)-->")


def directives(text: str) -> dict:
  out = {}
  for m in _DIRECTIVE.finditer(text):
    for item in m.group(1).split():
      key, _, value = item.partition("=")
      out[key] = value
  return out


def blocks(path: str) -> list[Block]:
  """The code blocks of a page: fenced ones, and indented ones (shell)."""
  lines = open(path, encoding="utf-8").read().split("\n")
  out, i, pending = [], 0, {}
  while i < len(lines):
    line = lines[i]
    fence = re.match(r"^```(\w*)\s*$", line)
    if fence:
      lang, start, body = fence.group(1), i + 1, []
      i += 1
      while i < len(lines) and not lines[i].startswith("```"):
        body.append(lines[i])
        i += 1
      lang = {"bash": "sh", "shell": "sh", "console": "sh"}.get(lang, lang)
      out.append(Block(path, start, lang, "\n".join(body) + "\n", pending))
      pending = {}
    elif line.startswith("    ") and i > 0 and not lines[i - 1].strip():
      start, body = i + 1, []
      while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
        body.append(lines[i][4:])
        i += 1
      out.append(Block(path, start, "sh", "\n".join(body).strip() + "\n", pending))
      pending = {}
      continue
    elif _DIRECTIVE.search(line):
      pending = {**pending, **directives(line)}
    elif line.strip():
      pending = {}
    i += 1
  return out


def page_options(path: str) -> dict:
  """A page's own options (`files-from`), wherever its comment is."""
  text = open(path, encoding="utf-8").read()
  return {k: v for k, v in directives(text).items() if k == "files-from"}


def commands(code: str) -> list[str]:
  """The commands of a shell block: continuations joined, comments dropped."""
  out, current = [], ""
  for raw in code.split("\n"):
    line = raw.rstrip()
    if current:
      current += " " + line.strip()
    else:
      current = line.strip()
    if current.endswith("\\"):
      current = current[:-1].rstrip()
      continue
    try:
      words = shlex.split(current, comments=True)
    except ValueError:
      words = current.split()  # an unfinished quote: the next line continues it
      if current.count("'") % 2:
        continue
    if words:
      out.append(" ".join(shlex.quote(w) if " " in w else w for w in words))
    current = ""
  return out


def inline_commands(path: str) -> list[tuple[int, str]]:
  out = []
  in_fence = False
  for n, line in enumerate(open(path, encoding="utf-8"), 1):
    if line.startswith("```"):
      in_fence = not in_fence
      continue
    if in_fence or line.startswith("    "):
      continue
    for span in re.findall(r"`([^`]+)`", line):
      span = span.strip()
      if span.startswith(PROGRAMS) and " " in span.strip():
        out.append((n, span))
      elif re.match(r"^(bench_\w+|drill_kill)\.py\b", span):
        out.append((n, span))
  return out


def covered_by(command: str):
  for pattern, path, token in COVERED:
    if re.search(pattern, command):
      return path, token
  return None


def is_safetrain(command: str) -> bool:
  return command.startswith(("safetrain ", "python -m safetrain "))


# --------------------------------------------------------------- pages


def test_the_readme_fits_on_three_screens_and_keeps_the_two_commands():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split("\n")
  assert len(readme) <= README_MAX_LINES, len(readme)
  assert (
    "    make run     # creates .venv, installs safetrain, runs the default experiment end to end"
    in readme
  )
  assert (
    "    make test    # creates .venv with the dev tools, runs ruff and the test suite" in readme
  )


def test_every_link_resolves_and_every_page_is_linked_from_the_readme():
  broken = []
  for page in PAGES:
    text = open(page, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"^[a-z]+://", target) or target.startswith("#"):
        continue
      path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
      if not os.path.exists(path) and rel(path) not in LINKED_AHEAD:
        broken.append(f"{rel(page)}: {target}")
  assert not broken, broken
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  unlinked = [rel(p) for p in PAGES[1:] if f"]({rel(p)})" not in readme]
  assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_every_command_shown_is_run_here_or_by_the_test_named_for_it():
  """Each command in a shell block is a safetrain command (run by
  test_the_code_of_each_page_runs) or in COVERED; each inline one is in
  COVERED or in a shell block of the docs; COVERED's files hold their token."""
  shown = set()
  unknown = []
  for page in PAGES:
    for block in blocks(page):
      if block.lang != "sh":
        continue
      for command in commands(block.code):
        shown.add(command)
        if not covered_by(command) and not is_safetrain(command):
          unknown.append(f"{rel(page)}:{block.line}: {command}")
  for page in PAGES:
    for line, command in inline_commands(page):
      if command not in shown and not covered_by(command):
        unknown.append(f"{rel(page)}:{line}: `{command}`")
  assert not unknown, "commands neither run by test_docs.py nor in its COVERED list:\n" + "\n".join(
    unknown
  )
  for pattern, path, token in COVERED:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      assert token in f.read(), f"{path} no longer runs what {pattern!r} covers ({token!r})"


# ----------------------------------------------------------- running them


def runnable_pages() -> list[str]:
  return [
    rel(p)
    for p in PAGES
    if any(
      b.lang == "python" or (b.lang == "sh" and any(is_safetrain(c) for c in commands(b.code)))
      for b in blocks(p)
    )
  ]


@pytest.fixture
def shortened(monkeypatch):
  """Every Trainer built while it is on trains at most `cap["steps"]` steps
  (STEPS, or a block's `steps=N`)."""
  original = Trainer.__init__
  cap = {"steps": STEPS}

  def init(self, config, workdir, *args, **kwargs):
    config = copy.deepcopy(config)
    config.train.steps = min(config.train.steps, cap["steps"])
    original(self, config, workdir, *args, **kwargs)

  monkeypatch.setattr(Trainer, "__init__", init)
  return cap


class Validated(BaseException):
  """Raised instead of training: the command got as far as Trainer.fit."""


def run_command(command: str, where: str, monkeypatch, train: bool) -> tuple[int, str]:
  """A safetrain command in-process, in `where`: (exit code, its output).

  Unless `train`, a training command stops where training would start:
  exit code 0 when it got there."""
  from safetrain.cli import export as export_command
  from safetrain.cli import main as cli
  from safetrain.records import report

  words = shlex.split(command)
  if words[:3] == ["python", "-m", "safetrain"]:
    words = ["safetrain"] + words[3:]
  # Absolute scratch paths (/tmp/...) land in the page's directory too.
  words = [
    re.sub(r"(^|=)/tmp/", lambda m: m.group(1) + os.path.join(where, "tmp") + "/", w) for w in words
  ]
  if not train and words[1:2] not in (["report"], ["export"]):

    def build_only(trainer):
      trainer.build()
      raise Validated

    monkeypatch.setattr(Trainer, "fit", build_only)
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    if words[1:2] == ["report"]:
      code = report.main(words[2:])
    elif words[1:2] == ["export"]:
      code = export_command.main(words[2:])
    else:
      try:
        code = cli.main_with_exit_code(words)
      except Validated:
        code = 0
  monkeypatch.setattr(Trainer, "fit", ORIGINAL_FIT)
  return code, out.getvalue()


@pytest.mark.parametrize("page", runnable_pages())
def test_the_code_of_each_page_runs(page, tmp_path, monkeypatch, shortened):
  path = os.path.join(ROOT, page)
  where = str(tmp_path)
  os.symlink(os.path.join(ROOT, "experiments"), os.path.join(where, "experiments"))
  os.makedirs(os.path.join(where, "tmp"))  # where /tmp/... paths of commands land
  monkeypatch.chdir(where)
  monkeypatch.syspath_prepend(where)
  before = set(sys.modules)
  try:
    source = page_options(path).get("files-from")
    if source:
      for block in blocks(os.path.join(os.path.dirname(path), source)):
        if "file" in block.options:
          with open(os.path.join(where, block.options["file"]), "w") as f:
            f.write(block.code)
    namespace = {"__name__": "__doc_page__"}
    for block in blocks(path):
      where_shown = f"{page}:{block.line}"
      shortened["steps"] = int(block.options.get("steps", STEPS))
      if block.lang == "python" and "file" in block.options:
        with open(os.path.join(where, block.options["file"]), "w") as f:
          f.write(block.code)
      elif block.lang == "python":
        try:
          exec(compile(block.code, where_shown, "exec"), namespace)  # noqa: S102
        except Exception as e:
          raise AssertionError(f"the block at {where_shown} fails: {type(e).__name__}: {e}") from e
      elif block.lang == "sh":
        expected = int(block.options.get("exit", 0))
        for command in commands(block.code):
          if covered_by(command) or not is_safetrain(command):
            continue
          code, output = run_command(command, where, monkeypatch, train="train" in block.options)
          assert code == expected, f"{where_shown}: `{command}` exited {code}:\n{output[-3000:]}"
  finally:
    for name in set(sys.modules) - before:
      module = sys.modules.get(name)
      if os.path.dirname(os.path.abspath(getattr(module, "__file__", "") or "")) == where:
        del sys.modules[name]


# ------------------------------------------------------- the quiet start

# absl's prefix of a C++ line logged before absl::InitializeLog (TensorFlow's
# start-up), and of a Python log line.
NATIVE = re.compile(r"^[IWEF]0000 00:00:\d+\.\d+ +\d+ |^WARNING: All log messages before absl")
PYTHON_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.py:\d+\]")


def test_the_command_starts_with_safetrains_lines_and_logs_tensorflows(tmp_path):
  """The default experiment, as `make run` runs it (:smoke): stderr starts
  with safetrain's preflight line (the README's tour) and has no line of
  TensorFlow's start-up; log.txt begins with them (on this CPU-only machine:
  the oneDNN notice, the CUDA driver lines, the cuInit error)."""
  workdir = str(tmp_path / "run")
  argv = [
    sys.executable,
    "-m",
    "safetrain",
    f"--config={os.path.join(ROOT, 'experiments', 'linear_regression.py')}:smoke",
    f"--workdir={workdir}",
  ]
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert err[0].startswith("safetrain: warning: preflight: normalize x[:, 0]"), err[:3]
  assert all(ln.startswith(("safetrain:", "  ")) for ln in err), err
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  assert "\nsafetrain: warning: preflight: normalize x[:, 0]: range" in readme
  log = open(os.path.join(workdir, "log.txt"), encoding="utf-8").read().splitlines()
  first = next(i for i, ln in enumerate(log) if PYTHON_LOG.match(ln))
  held = [ln for ln in log[:first] if ln.strip()]
  assert any(NATIVE.match(ln) for ln in held), log[: first + 1]
  assert not set(held) & set(err)


def test_held_start_up_lines_go_to_log_txt_and_with_v_to_the_terminal_too(tmp_path):
  """What C++ code writes to fd 2 inside NativeStartup is held, Python's
  own stderr still shows at once; the held text is the preamble of log.txt,
  and of the terminal only with -v."""
  from safetrain.records import logs

  for verbose in (False, True):
    workdir = tmp_path / str(verbose)
    workdir.mkdir()
    script = (
      "import os, sys\n"
      "from safetrain.records import logs\n"
      "with logs.NativeStartup() as native:\n"
      "  os.write(2, b'E0000 00:00:1.5 42 cuda_platform.cc:52] failed call to cuInit\\n')\n"
      "  print('python: still shown', file=sys.stderr, flush=True)\n"
      f"with logs.command_logging({str(workdir)!r}, verbose={verbose}, preamble=native.text):\n"
      "  pass\n"
      "print('after: shown', file=sys.stderr, flush=True)\n"
      "os.write(2, b'E0001 a later error\\n')\n"
    )
    proc = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    log = open(workdir / logs.LOG_FILE, encoding="utf-8").read()
    assert "failed call to cuInit" in log
    assert ("failed call to cuInit" in proc.stderr) == verbose
    assert err[0] == "python: still shown" and err[-2:] == ["after: shown", "E0001 a later error"]
