"""The guard piece protocol: everything the system needs to know about one
in-graph guard piece, declared in the piece's own module.

A piece is a `Piece` subclass in a module of `safetrain/step/`;
`step.registry` finds it there. It declares:

- `name` and `order` (where its hooks and conditions run among the others);
- `kinds`: the incident kinds it raises (`core.kinds.Kind`: name, one-line
  text, report colour, batch-bound or not); their codes are derived;
- `config_keys`: the keys of `default_config()` it reads (documentation, and
  a test holds the list to what `build` reads);
- `sums`: named per-step numbers summed over a loop (`LoopOutput.sums`);
- `build(config, ctx)`: the piece for a run, or None when the config turns it
  off (one place turns its config into the object);

and overrides only the hooks it needs. In-graph hooks, in the order the
replica step calls them (replica context unless said otherwise):

- `inputs(step)`: after the drill, before the forward pass (may change
  `step.batch`, `step.weight`, `step.skip`);
- `reduce_loss(step, losses)`: inside the gradient tape, per-example losses
  to the step's loss (the first piece that returns a value wins);
- `gradients(step)`: after the backward pass, before the all-reduce;
- `conditions(step)`: the piece's `Condition`s in the step's classification;
- `occurred(step)`: kinds counted for this attempt whatever its class;
- `outcome(step)`: what the piece folds into its loop-carried state;
- `apply_args(step)` / `clip(grads, norm, args)`: what the update needs,
  and the gradients it applies (cross-replica, per replica, on a good step);
- `on_update(applied, step_class)`: cross-replica, once an attempt after the
  update was applied (`applied` True) or skipped: the piece's own
  bookkeeping of it, written without a branch (`applied` is a constant in
  the cond form of `train.skip_update`, a tensor in the select form).

Loop-carried state (named, never positional): `carry()` reads it from the
piece's variables at the start of a loop, `fold(carried, outcome, core)`
moves it after each attempt, `write(carried)` stores it at the end,
`report(carried)` is what the host reads (`LoopOutput.pieces[name]`).

Host hooks (between loops, eager): `explain(kind, out)` (the record's
diagnosis), `action(kind, out)`, `records(out)` (extra records, for example
dropped examples), `fields(out)` (numbers for metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import tensorflow as tf

from safetrain.core import kinds as kinds_lib


class Condition(NamedTuple):
  """One row of the step's classification: when `test` holds (and no row of a
  lower `order` does), the step is `step_class` with incident `kind` (None:
  no incident, as a routine float16 overflow)."""

  order: float
  step_class: int
  kind: str | None
  test: tf.Tensor


class Core(NamedTuple):
  """What every attempt tells the pieces' `fold` (replica 0's values)."""

  good: tf.Tensor  # bool: the update was applied
  step_class: tf.Tensor  # int32
  kind: tf.Tensor  # int32 code, or NO_KIND
  loss: tf.Tensor  # the attempt's loss
  norm_good: tf.Tensor  # the pre-clip norm of a good step, else 0
  attempt: tf.Tensor  # int64: the run's attempt number
  step: tf.Tensor  # int64: the step number it was (applied + 1)


@dataclasses.dataclass
class Step:
  """One replica's attempted step, as the pieces see and change it.

  Attributes:
    batch: what the model sees (a piece may drop rows).
    ctx: the replica context.
    attempt: int64, the run's attempt number.
    carried: {piece name: its loop-carried state} at this attempt.
    weight: this replica's share of the global loss, or None on one replica.
    skip: bool, the inputs are unusable: the step is skipped.
    loss, metrics: the step's (reduced) loss and compute_loss's metrics.
    scale: the loss scale under mixed_float16, else None.
    grads: the dense float32 gradients of the trainable variables present.
    norm, grads_finite: their global norm, and whether all are finite.
    non_trainable_before: the non-trainable values before the forward pass.
    replica_state: the float non-trainable variables the forward pass updates
      per replica, and replica_mean: their values averaged over replicas.
    regrad: (batch, total rows) -> (loss, gradients) on `batch` alone (the
      loop's forward and backward pass again, for a piece that drops examples).
    row_losses: batch -> float32[B], compute_loss of each row alone
      (inference mode), for a piece that finds the bad rows of a scalar loss.
    findings: {name: tensor} a piece leaves for another's conditions.
    step_class, kind: the classification, once made.
    branchless: `train.skip_update=select`: a hook selects rather than
      branches where it can (each branch's predicate goes to the host on a GPU).
    lean: the loop is traced without its rare paths: a hook that would take
      one sets `pending` instead (the attempt is redone with them built).
    pending: bool, this attempt needs a rare path the lean loop lacks.
  """

  batch: Any
  ctx: Any
  attempt: tf.Tensor
  carried: dict
  weight: tf.Tensor | None = None
  skip: tf.Tensor = None
  loss: tf.Tensor = None
  metrics: dict = dataclasses.field(default_factory=dict)
  scale: tf.Tensor | None = None
  grads: list = dataclasses.field(default_factory=list)
  norm: tf.Tensor = None
  grads_finite: tf.Tensor = None
  non_trainable_before: list = dataclasses.field(default_factory=list)
  replica_state: list = dataclasses.field(default_factory=list)
  replica_mean: list = dataclasses.field(default_factory=list)
  regrad: Any = None
  row_losses: Any = None
  findings: dict = dataclasses.field(default_factory=dict)
  step_class: tf.Tensor = None
  kind: tf.Tensor = None
  branchless: bool = False
  lean: bool = False
  pending: tf.Tensor = None

  @property
  def replicas(self) -> int:
    return self.ctx.num_replicas_in_sync


@dataclasses.dataclass
class BuildContext:
  """What a piece may need to build itself (the trainer fills it once)."""

  model: Any = None
  leaf_names: tuple[str, ...] = ()
  fp16: bool = False
  num_replicas: int = 1
  loss_scale: Any = None  # the run's DynamicLossScale (checkpointed state)
  spike: Any = None  # the run's SpikeDetector
  clip: Any = None  # the run's GradientClip
  replica_state: list = dataclasses.field(default_factory=list)
  labels: Any = None  # batch_checks.Labels: the sparse labels to range-check, or None
  shapes: Any = None  # batch_checks.Shapes: the first batch's shapes to hold to, or None


class Piece:
  """Base of a guard piece: declare the class attributes, override hooks."""

  name: ClassVar[str]
  order: ClassVar[float]
  kinds: ClassVar[tuple[kinds_lib.Kind, ...]] = ()
  config_keys: ClassVar[tuple[str, ...]] = ()
  sums: ClassVar[tuple[str, ...]] = ()

  @classmethod
  def build(cls, config, ctx: BuildContext) -> Piece | None:
    """The piece `config` asks for, or None when it is off."""
    raise NotImplementedError

  # ------------------------------------------------ in-graph hooks
  def inputs(self, step: Step) -> None:
    pass

  def reduce_loss(self, step: Step, losses: tf.Tensor) -> tf.Tensor | None:
    return None

  def gradients(self, step: Step) -> None:
    pass

  def conditions(self, step: Step) -> list[Condition]:
    return []

  def occurred(self, step: Step) -> dict[str, tf.Tensor]:
    """{kind: bool}: kinds this attempt counts as an occurrence of even when
    the classification chose another (rows dropped, and the step trained)."""
    return {}

  def outcome(self, step: Step) -> Any:
    """What this attempt adds to the piece's state (None: nothing)."""
    return None

  def step_sums(self, step: Step) -> dict[str, tf.Tensor]:
    """{name in `sums`: float32} of this attempt."""
    return {}

  def apply_args(self, step: Step) -> Any:
    """What the piece's `clip` needs in the update (None: nothing)."""
    return None

  def clip(self, grads: list, norm: tf.Tensor, args: Any) -> list:
    """The gradients the update applies (cross-replica, per replica)."""
    return grads

  def compiles_with_xla(self) -> bool:
    """Whether the piece's lean hooks keep static shapes, so the lean step
    may be one XLA program (`train.jit_compile`)."""
    return True

  def on_update(self, applied: tf.Tensor, step_class: tf.Tensor) -> None:
    """After the update (cross-replica): `applied` (bool) whether it was kept,
    `step_class` the step's class. Select, never branch: under
    `train.skip_update=select` it runs on every attempt, and a `tf.cond`
    here would make a GPU wait for its predicate on the host."""

  # ------------------------------------------ loop-carried state
  def carry(self) -> Any:
    """The state carried through the loop, at its start (None: stateless)."""
    return None

  def fold(self, carried: Any, outcome: Any, core: Core) -> Any:
    return carried

  def write(self, carried: Any) -> None:
    pass

  def report(self, carried: Any) -> Any:
    """What the host reads of the state once a loop (None: nothing)."""
    return None

  # ------------------------------------------------- host hooks
  def explain(self, kind: str, out) -> str:
    """The diagnosis of a record of `kind` (host, between loops)."""
    return kinds_lib.text(kind)

  def action(self, kind: str, out) -> str:
    return "skipped_step"

  def records(self, out, *, bad_batch_diagnosis: str) -> list[dict]:
    """Records beyond one per kind (host)."""
    return []
