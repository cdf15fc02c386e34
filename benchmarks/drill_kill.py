"""Kill drill: kill -9 a training run at random moments, then check the result.

Runs `tests/fixtures/configs/kill_drill.py` (dropout, a reshuffled dataset, a
checkpoint every loop of 5 steps, train.deterministic=True) twice: once
without interruption, once killed with SIGKILL `--kills` times at random
moments and restarted with the same command each time. Then it checks that

* every restart resumed (the run reached train.steps, exit code 0);
* the final checkpoints hold bit-identical variables (model, optimizer, step,
  loss scale, spike detector, recovery state, data position);
* for every step, the last metrics record of the killed run has the same loss,
  gradient norm and learning rate as the uninterrupted run;
* metrics.jsonl and incidents.jsonl hold only complete JSON lines.

It counts kills that landed in the middle of a checkpoint save: those leave a
`ckpt-N_temp` directory, uncommitted `ckpt-N.*` files, or a listed checkpoint
with files missing, all of which the next start cleans up.

  .venv/bin/python benchmarks/drill_kill.py --kills 20 --steps 3000 --seed 0

Where the kills land: every fifth during start-up (import, restore, clean-up),
at a random time before the previous start's first record; every fourth is
aimed at a save (it waits until a `ckpt-N_temp` directory appears, then up to
20 ms more); the rest at a uniform random time up to `--max-delay` seconds
after the restarted run has written its first metrics record.

With `--rollbacks` the run also diverges on purpose (`ROLLBACK_DRILL`: NaN
losses at eleven moments, two of which escalate a rollback one checkpoint
further back), and every third kill is aimed at a rollback: it waits for the
rollback's incident record, then kills at the next change in `checkpoints/`
(the rollback's side state being written) or at its commit (`rollback.json`
replaced), alternately, timed on the file change by polling in a tight loop.

  .venv/bin/python benchmarks/drill_kill.py --kills 20 --steps 3000 --rollbacks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "tests", "fixtures", "configs", "kill_drill.py")
sys.path.insert(0, ROOT)

from safetrain.checkpoint import store as checkpointing  # noqa: E402

# Keys whose value legitimately differs between the two runs.
_SKIP_KEYS = ("save_counter/", "_CHECKPOINTABLE_OBJECT_GRAPH")

# NaN losses at attempts 303-305 (a rollback to ckpt-300), then at 308-310 (a
# second incident before the run got past ckpt-300: escalated to ckpt-295,
# and ckpt-300 retired), and so every 300 attempts, escalated again at 2108:
# eleven rollbacks, spread over the run so that every kill aimed at a rollback
# finds one. A gentler backoff and a larger budget let the run survive them.
ROLLBACK_DRILL = (
  "--config.drill.loss_steps=303-305,308-310,603-605,903-905,1203-1205,1503-1505,"
  "1803-1805,2103-2105,2108-2110,2403-2405,2703-2705",
  "--config.recovery.lr_backoff=0.9",
  "--config.recovery.max_rollbacks=20",
)


@dataclasses.dataclass
class DrillReport:
  kills: int = 0
  startup_kills: int = 0
  aimed_kills: int = 0
  rollback_kills: int = 0
  rollback_traces: list = dataclasses.field(default_factory=list)
  mid_checkpoint_kills: int = 0
  resumes: int = 0
  traces: list = dataclasses.field(default_factory=list)
  final_exit_code: int | None = None
  seconds: float = 0.0


def command(workdir: str, steps: int, extra=()) -> list[str]:
  return [
    sys.executable,
    "-m",
    "safetrain",
    f"--config={EXPERIMENT}",
    f"--workdir={workdir}",
    f"--config.train.steps={steps}",
    *extra,
  ]


def start(workdir: str, steps: int, log, extra=()) -> subprocess.Popen:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
  return subprocess.Popen(
    command(workdir, steps, extra),
    cwd=ROOT,
    stdout=log,
    stderr=subprocess.STDOUT,
    env=env,
  )


def metrics_lines(workdir: str) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
      return f.read().count(b"\n")
  except FileNotFoundError:
    return 0


def wait_for_progress(
  p: subprocess.Popen, workdir: str, timeout: float = 300, base: int | None = None
) -> bool:
  """Waits until `p` writes a metrics record (more than `base` lines, by
  default the count now); False if it exits first."""
  base = metrics_lines(workdir) if base is None else base
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if p.poll() is not None:
      return False
    if metrics_lines(workdir) > base:
      return True
    time.sleep(0.02)
  raise TimeoutError(f"no progress in {timeout} s")


def wait_for_save(p: subprocess.Popen, ckpt_dir: str, timeout: float = 120) -> bool:
  """Polls until `p` is writing a checkpoint; False if it exits first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if p.poll() is not None:
      return False
    try:
      if any(n.endswith("_temp") for n in os.listdir(ckpt_dir)):
        return True
    except FileNotFoundError:
      pass
    time.sleep(0.001)
  raise TimeoutError(f"no checkpoint save in {timeout} s")


def rollbacks_recorded(workdir: str) -> int:
  """Complete rollback records in incidents.jsonl."""
  try:
    with open(os.path.join(workdir, "incidents.jsonl"), "rb") as f:
      return sum(1 for line in f if line.endswith(b"\n") and b'"action": "rollback"' in line)
  except FileNotFoundError:
    return 0


def _listing(directory: str) -> dict:
  out = {}
  try:
    with os.scandir(directory) as it:
      for e in it:
        try:
          st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
          continue
        out[e.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
  except FileNotFoundError:
    pass
  return out


def kill_at_rollback(
  p: subprocess.Popen, workdir: str, moment: str, nth: int = 1, timeout: float = 300
) -> dict | None:
  """Waits for `p` to record its `nth` new rollback, then kills it with
  SIGKILL at `moment`: "change" (the next change of any file in
  checkpoints/, i.e. the rollback's first write) or "commit" (rollback.json
  replaced). Polls in a tight loop, so the kill lands within a fraction of a
  millisecond of the change. Returns what the kill left (None if `p` ended
  first)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  pointer = os.path.join(ckpt_dir, checkpointing.ROLLBACK_FILE)
  target = rollbacks_recorded(workdir) + nth
  deadline = time.monotonic() + timeout
  # `before` is a listing taken before a look at incidents.jsonl that did not
  # show the rollback yet, so it predates the rollback's incident record, and
  # with it every write of the rollback.
  before = _listing(ckpt_dir)
  while True:
    listing = _listing(ckpt_dir)
    if rollbacks_recorded(workdir) >= target:
      break
    before = listing
    if p.poll() is not None:
      return None
    if time.monotonic() > deadline:
      raise TimeoutError(f"no rollback in {timeout} s")
    time.sleep(0.0005)
  old = before.get(checkpointing.ROLLBACK_FILE)
  now = before
  while True:
    if p.poll() is not None:
      return None
    if moment == "change":
      now = _listing(ckpt_dir)
      if now != before:
        break
    else:
      try:
        st = os.stat(pointer)
        if old is None or (st.st_ino, st.st_mtime_ns) != old[:2]:
          break
      except FileNotFoundError:
        pass
    if time.monotonic() > deadline:
      raise TimeoutError("the rollback wrote nothing")
  p.send_signal(signal.SIGKILL)
  p.wait()
  found = checkpointing.scan(ckpt_dir)
  changed = [n for n in sorted(set(now) | set(before)) if now.get(n) != before.get(n)]
  try:
    with open(pointer, encoding="utf-8") as f:
      committed = json.load(f)  # the rollback state a restart will apply
  except (OSError, ValueError):
    committed = None
  return {
    "moment": moment,
    "first_change": changed if moment == "change" else [checkpointing.ROLLBACK_FILE],
    "leftovers": found.leftovers,
    "rollback": committed,
    "listed": list(found.listed),
  }


def run_uninterrupted(workdir: str, steps: int, log, extra=()) -> int:
  return start(workdir, steps, log, extra).wait()


def run_with_kills(
  workdir: str,
  steps: int,
  kills: int,
  seed: int,
  log,
  max_delay: float = 1.5,
  extra=(),
  rollback_every: int = 0,
) -> DrillReport:
  """Kills the run `kills` times with SIGKILL, then lets it finish.

  With `rollback_every` = k > 0, every k-th kill is aimed at a rollback
  (`kill_at_rollback`; `extra` must make the run roll back).
  """
  rng = random.Random(seed)
  report = DrillReport()
  t0 = time.monotonic()
  startup = 8.0  # refined from the first start
  ckpt_dir = os.path.join(workdir, "checkpoints")
  while report.kills < kills:
    began = time.monotonic()
    p = start(workdir, steps, log, extra)
    if rollback_every and report.kills % rollback_every == rollback_every - 1:
      moment = ("change", "commit")[report.rollback_kills % 2]
      trace = kill_at_rollback(p, workdir, moment)
      if trace is None:
        break  # no rollback left before the end
      report.kills += 1
      report.rollback_kills += 1
      report.rollback_traces.append(dict(trace, kill=report.kills))
      continue
    if report.kills % 5 == 2:
      time.sleep(rng.uniform(0, startup))
      report.startup_kills += 1
    else:
      if not wait_for_progress(p, workdir):
        break  # finished before the kill
      startup = time.monotonic() - began
      if report.kills % 4 == 0:
        if not wait_for_save(p, ckpt_dir):
          break
        time.sleep(rng.uniform(0, 0.02))
        report.aimed_kills += 1
      else:
        time.sleep(rng.uniform(0, max_delay))
    if p.poll() is not None:
      break
    p.send_signal(signal.SIGKILL)
    p.wait()
    report.kills += 1
    found = checkpointing.scan(ckpt_dir)
    if found.interrupted_save:
      report.mid_checkpoint_kills += 1
      report.traces.append(
        {
          "kill": report.kills,
          "leftovers": found.leftovers,
          "uncommitted": found.unlisted,
          "incomplete": found.incomplete,
        }
      )
  p = start(workdir, steps, log, extra)
  report.final_exit_code = p.wait()
  report.resumes = report.kills
  report.seconds = time.monotonic() - t0
  return report


def final_checkpoint(workdir: str, steps: int) -> str:
  path = os.path.join(workdir, "checkpoints", f"ckpt-{steps}")
  if not os.path.exists(path + ".index"):
    raise AssertionError(f"no final checkpoint {path}")
  return path


def compare_checkpoints(a: str, b: str) -> int:
  """Asserts every variable of two checkpoints is bit-identical; returns how
  many were compared."""
  import tensorflow as tf  # noqa: PLC0415

  keys_a = {k for k, _ in tf.train.list_variables(a) if not k.startswith(_SKIP_KEYS)}
  keys_b = {k for k, _ in tf.train.list_variables(b) if not k.startswith(_SKIP_KEYS)}
  if keys_a != keys_b:
    raise AssertionError(f"different variables: {sorted(keys_a ^ keys_b)}")
  compared = 0
  reader_a, reader_b = tf.train.load_checkpoint(a), tf.train.load_checkpoint(b)
  dtypes = reader_a.get_variable_to_dtype_map()
  for key in sorted(keys_a):
    if dtypes[key] == tf.variant:
      continue  # the serialized iterator; its position is compared as data/position
    np.testing.assert_array_equal(reader_a.get_tensor(key), reader_b.get_tensor(key), err_msg=key)
    compared += 1
  return compared


def check_records(workdir: str) -> list[dict]:
  """Every line of the jsonl files is one complete JSON object."""
  out = []
  for name in ("metrics.jsonl", "incidents.jsonl"):
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      continue
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if not line.endswith("\n"):
          raise AssertionError(f"{path}:{i}: torn last line")
        record = json.loads(line)
        if name == "metrics.jsonl":
          out.append(record)
  return out


def compare_metrics(killed: str, reference: str) -> int:
  """For every step, the last record of the killed run matches the reference
  run's record bit for bit (loss, gradient norm, learning rate).

  Records of loops that ended in a rollback are left out: they describe steps
  the rollback undid, and a kill right after the rollback's commit may come
  before that record is written.
  """
  last = {}
  for rec in check_records(killed):
    if "loss" in rec and not rec.get("rollback"):
      last[rec["step"]] = rec
  ref = {
    rec["step"]: rec
    for rec in check_records(reference)
    if "loss" in rec and not rec.get("rollback")
  }
  if set(last) != set(ref):
    raise AssertionError(f"steps differ: {sorted(set(last) ^ set(ref))[:10]}")
  for step, rec in ref.items():
    for key in ("loss", "grad_norm", "lr"):
      if last[step][key] != rec[key]:
        raise AssertionError(f"step {step}: {key} {last[step][key]} != {rec[key]}")
  return len(ref)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--kills", type=int, default=20)
  ap.add_argument("--steps", type=int, default=3000)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--max-delay", type=float, default=1.5)
  ap.add_argument("--workdir", default=None, help="kept afterwards if given")
  ap.add_argument(
    "--rollbacks",
    action="store_true",
    help="inject divergences (ROLLBACK_DRILL) and aim every third kill at a rollback",
  )
  args = ap.parse_args()
  extra = ROLLBACK_DRILL if args.rollbacks else ()
  root = args.workdir or tempfile.mkdtemp(prefix="safetrain-drill-")
  os.makedirs(root, exist_ok=True)
  ref_dir, killed_dir = os.path.join(root, "reference"), os.path.join(root, "killed")
  for d in (ref_dir, killed_dir):
    shutil.rmtree(d, ignore_errors=True)
  with open(os.path.join(root, "drill.log"), "ab") as log:
    t = time.monotonic()
    rc = run_uninterrupted(ref_dir, args.steps, log, extra)
    print(f"reference run: exit {rc} in {time.monotonic() - t:.0f} s")
    report = run_with_kills(
      killed_dir,
      args.steps,
      args.kills,
      args.seed,
      log,
      args.max_delay,
      extra=extra,
      rollback_every=3 if args.rollbacks else 0,
    )
  print(
    f"killed run: {report.kills} kills ({report.startup_kills} during start-up, "
    f"{report.aimed_kills} aimed at a save, {report.rollback_kills} at a rollback; "
    f"{report.mid_checkpoint_kills} left the traces of an interrupted save), final exit "
    f"{report.final_exit_code}, {report.seconds:.0f} s"
  )
  for trace in report.traces:
    print("  mid-checkpoint:", trace)
  for trace in report.rollback_traces:
    print("  at a rollback:", trace)
  if args.rollbacks:
    ref_rb, killed_rb = rollbacks_recorded(ref_dir), rollbacks_recorded(killed_dir)
    print(f"rollback records: reference {ref_rb}, killed run {killed_rb} (redone ones included)")
  ok = rc == 0 and report.final_exit_code == 0 and report.kills == args.kills
  n_vars = compare_checkpoints(
    final_checkpoint(ref_dir, args.steps), final_checkpoint(killed_dir, args.steps)
  )
  n_steps = compare_metrics(killed_dir, ref_dir)
  print(
    f"bit-identical: {n_vars} checkpoint variables and the metrics of {n_steps} loops; "
    f"{report.resumes} of {report.kills} resumes exact"
  )
  print("PASS" if ok else "FAIL", f"(workdirs under {root})")
  if not args.workdir and ok:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
