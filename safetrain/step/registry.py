"""The registered guard pieces, and everything derived from their declarations.

Every `piece.Piece` subclass defined in a module of `safetrain/step/` is a
piece; nothing lists them by hand. From their declarations come the in-graph
kinds and their codes (`KINDS`, `code`), the loop's named sums (`SUMS`), the
batch-bound kinds, which piece owns a kind (`owner`), and, once built for a
run (`build`), the step's classification (`Pieces.classify`).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import tensorflow as tf

from safetrain.core import kinds
from safetrain.step import piece as piece_lib

# Modules of the step wing that hold no piece (the loop and the protocol).
_NOT_PIECES = {"piece", "registry", "loop", "loop_state", "drill"}
# The loop's own sums over good steps: the loss and the pre-clip norm.
CORE_SUMS = ("loss", "norm")


def _discover() -> tuple[type[piece_lib.Piece], ...]:
  import safetrain.step as package

  found = {}
  for info in pkgutil.iter_modules(package.__path__):
    if info.name in _NOT_PIECES:
      continue
    module = importlib.import_module(f"{package.__name__}.{info.name}")
    for _, cls in inspect.getmembers(module, inspect.isclass):
      if (
        issubclass(cls, piece_lib.Piece)
        and cls is not piece_lib.Piece
        and cls.__module__ == module.__name__
      ):
        found[cls.name] = cls
  return tuple(sorted(found.values(), key=lambda c: c.order))


PIECES = _discover()
KINDS: tuple[str, ...] = tuple(k.name for p in PIECES for k in p.kinds)
SUMS: tuple[str, ...] = CORE_SUMS + tuple(s for p in PIECES for s in p.sums)
BATCH_BOUND: tuple[str, ...] = tuple(k.name for p in PIECES for k in p.kinds if k.batch_bound)
DIVERGING: tuple[str, ...] = tuple(k.name for p in PIECES for k in p.kinds if k.diverges)
_OWNER = {k.name: p for p in PIECES for k in p.kinds}
_CODE = {name: i for i, name in enumerate(KINDS)}


def code(kind: str) -> int:
  """The in-graph code of a kind."""
  return _CODE[kind]


def owner(kind: str) -> type[piece_lib.Piece]:
  """The piece class that raises `kind`."""
  return _OWNER[kind]


class Pieces:
  """The pieces of one run, in order, and the derived step decisions."""

  def __init__(self, pieces: list[piece_lib.Piece]):
    self.all = list(pieces)
    self.by_name = {p.name: p for p in self.all}

  def __iter__(self):
    return iter(self.all)

  def get(self, name: str) -> piece_lib.Piece | None:
    return self.by_name.get(name)

  def classify(self, step: piece_lib.Step) -> tuple[tf.Tensor, tf.Tensor]:
    """(step class, kind code) of an attempt: the first condition that holds,
    by order, among every piece's; else good. A handful of vector ops: this
    runs on every step."""
    rows = sorted((c for p in self.all for c in p.conditions(step)), key=lambda c: c.order)
    classes = [c.step_class for c in rows] + [kinds.GOOD]
    codes = [kinds.NO_KIND if c.kind is None else code(c.kind) for c in rows] + [kinds.NO_KIND]
    tests = tf.stack([tf.convert_to_tensor(c.test, tf.bool) for c in rows] + [tf.constant(True)])
    first = tf.argmax(tf.cast(tests, tf.int32), output_type=tf.int32)
    return tf.gather(tf.constant(classes), first), tf.gather(tf.constant(codes), first)


def build(config, ctx: piece_lib.BuildContext) -> Pieces:
  """The pieces `config` asks for (each piece's `build` maps its own keys)."""
  built = [cls.build(config, ctx) for cls in PIECES]
  return Pieces([p for p in built if p is not None])
