"""Append-only JSON-lines files (metrics.jsonl, incidents.jsonl).

Each record is written with one `write` of a complete line, then fsynced
(on an object store, the object is rewritten whole: see files.py): a
killed process (even kill -9) never leaves half a line, since the kernel
finishes a write it has started. Only a crash of the machine can: then
`read_jsonl` skips the torn last line, and the next writer cuts it off before
appending, so every line in the file stays one complete JSON object.
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any

from absl import logging

from safetrain.storage import files


class JsonlWriter:
  """Appends one JSON object per line to `path`, durably.

  Args:
    path: the file.
    enabled: False writes nothing (a non-chief worker).
    key: the fields that identify a record of a step (`step` first), for
      `expect_replay`; None for a file whose records are never replayed.
  """

  def __init__(self, path: str, *, enabled: bool = True, key: tuple[str, ...] | None = None):
    self.path = path
    self.enabled = enabled
    self.key = key
    self._replayed: collections.Counter = collections.Counter()
    self._opened = False

  def open(self) -> None:
    """Readies the file for appending, when the run starts writing the
    workdir (not when the parts are built): a torn last record a crash left
    is cut off. The first write opens a writer not opened yet."""
    if self.enabled and not self._opened:
      _cut_torn_line(self.path)
    self._opened = True

  def expect_replay(self, after_step: int) -> int:
    """A resume from step `after_step` replays the steps after it: the records
    an earlier process wrote for them (before a kill, or an I/O fault that
    stopped it before its next checkpoint) are already in the file, so the
    replay's identical records are not written twice. Returns how many
    records may be replayed."""
    if not self.enabled or self.key is None:
      return 0
    self._replayed = collections.Counter(
      self._key(r)
      for r in read_jsonl(self.path)
      if isinstance(r.get("step"), int) and r["step"] > after_step
    )
    return sum(self._replayed.values())

  def diverge(self) -> None:
    """The run left the replayed timeline (a rollback): what follows is new."""
    self._replayed.clear()

  def _key(self, record: dict[str, Any]) -> tuple:
    return tuple(json.dumps(record.get(k), default=_default) for k in self.key)

  def write(self, record: dict[str, Any]) -> bool:
    """Appends `record`; False when it was not written (disabled, or the
    replay of a record already in the file)."""
    if not self.enabled:
      return False
    self.open()
    if self._replayed:
      k = self._key(record)
      if self._replayed[k] > 0:
        self._replayed[k] -= 1
        return False
    record = dict(record)
    record.setdefault("time", time.time())
    line = json.dumps(record, sort_keys=False, default=_default) + "\n"
    files.append(self.path, line)
    return True


def _cut_torn_line(path: str) -> None:
  """Truncates `path` after its last newline, dropping a torn last record."""
  if not files.exists(path):
    return
  data = files.read_bytes(path)
  if not data or data.endswith(b"\n"):
    return
  keep = data.rfind(b"\n") + 1
  files.truncate(path, keep)
  logging.warning(
    "%s: dropped a torn last record (%d bytes) left by a crash", path, len(data) - keep
  )


def _default(x):
  try:
    return x.item()
  except AttributeError:
    return str(x)


def read_jsonl(path: str, skipped: list[str] | None = None) -> list[dict[str, Any]]:
  """Returns every complete record (JSON object) in `path`.

  A torn last line (a write in progress, or a crash) is skipped. A complete
  line that does not parse, or holds JSON that is not an object (`42`, a
  list), is skipped with a warning, also described in `skipped` when a list
  is given.
  """
  if not files.exists(path):
    return []
  out = []
  text = files.read_text(path)
  # Split on newlines only (str.splitlines also splits on other breaks);
  # what follows the last newline is a torn line, or nothing.
  for number, line in enumerate(text.split("\n")[:-1], 1):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      why = "not JSON"
    else:
      if isinstance(record, dict):
        out.append(record)
        continue
      why = f"not a JSON object ({_clip(line.strip())})"
    note = f"{path}:{number}: {why}; skipped"
    logging.warning("%s", note)
    if skipped is not None:
      skipped.append(note)
  return out


def _clip(text: str, n: int = 40) -> str:
  return text if len(text) <= n else text[: n - 3] + "..."
