"""Append-only JSON-lines files (metrics.jsonl, incidents.jsonl).

Each record is written with one `write` of a complete line, then fsynced: a
killed process (even kill -9) never leaves half a line, since the kernel
finishes a write it has started. Only a crash of the machine can: then
`read_jsonl` skips the torn last line, and the next writer cuts it off before
appending, so every line in the file stays one complete JSON object.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging


class JsonlWriter:
  """Appends one JSON object per line to `path`, durably."""

  def __init__(self, path: str, *, enabled: bool = True):
    self.path = path
    self.enabled = enabled
    if enabled:
      _cut_torn_line(path)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = dict(record)
    record.setdefault("time", time.time())
    line = json.dumps(record, sort_keys=False, default=_default) + "\n"
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      try:
        data = line.encode()
        while data:  # a short write (disk full, a signal) continues, never tears
          data = data[os.write(fd, data) :]
        os.fsync(fd)
      finally:
        os.close(fd)
    except OSError as e:
      if e.filename is None:  # os.write's errors name no file: name ours
        e.filename = self.path
      raise


def _cut_torn_line(path: str) -> None:
  """Truncates `path` after its last newline, dropping a torn last record."""
  try:
    size = os.path.getsize(path)
  except FileNotFoundError:
    return
  if size == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return
    # Find the last newline, reading backwards in blocks.
    end = size
    keep = 0
    while end > 0:
      start = max(0, end - 65536)
      f.seek(start)
      block = f.read(end - start)
      i = block.rfind(b"\n")
      if i >= 0:
        keep = start + i + 1
        break
      end = start
    f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())
  logging.warning("%s: dropped a torn last record (%d bytes) left by a crash", path, size - keep)


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
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.endswith("\n"):
        continue
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
