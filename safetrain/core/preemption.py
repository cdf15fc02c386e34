"""Preemption: SIGTERM or SIGINT during training finishes the current inner
loop, checkpoints and stops (the command then exits 143)."""

from __future__ import annotations

import signal

from absl import logging


class SignalCatcher:
  """While active, SIGTERM and SIGINT set `received` instead of killing.

  The outer loop checks `received` between inner loops. Outside the main
  thread (where Python cannot install handlers) signals are left alone.
  """

  def __init__(self):
    self.received: int | None = None
    self._previous: dict = {}

  def _handler(self, signum, frame) -> None:
    del frame
    self.received = signum
    logging.warning("Received signal %d: finishing this loop, checkpointing, stopping.", signum)

  def __enter__(self) -> SignalCatcher:
    self.received = None
    try:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handler)
    except ValueError:  # not the main thread
      self._previous = {}
    return self

  def __exit__(self, *exc) -> bool:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
