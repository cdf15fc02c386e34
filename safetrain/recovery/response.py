"""The response to one loop's incidents: record them, then quarantine a bad
batch or roll a diverging state back.

The controller hands each loop's output to `Response.handle`; the decision
(which cause gets which action) is made here, apart from the compiled step
and from the mechanics of a rollback (`recovery.Recovery`).
"""

from __future__ import annotations

from absl import logging

from safetrain.core import kinds, variables
from safetrain.core.errors import BadInputError
from safetrain.diagnosis import forensics
from safetrain.records import incidents, quarantine
from safetrain.recovery import health, policy, triage
from safetrain.recovery import rollback as recovery
from safetrain.recovery.keeper import Keeper
from safetrain.recovery.precision import Float32Fallback
from safetrain.recovery.scalar_rows import ScalarRows
from safetrain.step import registry
from safetrain.step.loop_state import STOP_DATA_END, STOP_RAISE, STOP_ROLLBACK, LoopOutput
from safetrain.training import state
from safetrain.training.feed import Feed


class Response:
  """Decides and carries out what a loop's incidents call for.

  Args:
    run, recovery_state: the run's and recovery's variables.
    incidents, quarantine_log: the run's incident and quarantine records.
    actions: the recovery mechanics (rollback, budget, bad-batch rate).
    examiner: forensics on the stashed offending batch.
    health: the stall and dead-unit checks.
    pieces: the run's guard pieces (each says what its incidents were).
    train_steps: `train.steps`.
    feed: the training data (the position a bad input is named at).
    keeper: the kept states (a stop on bad data saves the healthy state).
    float32_fallback: the precision remedy (`recovery.precision`), tried on
      the offending batch before a diverging state is rolled back, or None.
    scalar_rows: the bad-rows remedy of a scalar loss
      (`recovery/scalar_rows.py`, under guard.drop_examples), tried on a
      quarantined batch, or None.
  """

  def __init__(
    self,
    *,
    run: state.RunState,
    recovery_state: recovery.RecoveryState,
    incidents: incidents.IncidentLog,
    quarantine_log: quarantine.QuarantineLog,
    actions: recovery.Recovery,
    examiner: forensics.Examiner,
    health: health.Health,
    pieces: registry.Pieces,
    train_steps: int,
    feed: Feed,
    keeper: Keeper,
    float32_fallback: Float32Fallback | None = None,
    scalar_rows: ScalarRows | None = None,
  ):
    self._run = run
    self._recovery = recovery_state
    self._incidents = incidents
    self._quarantine = quarantine_log
    self._actions = actions
    self._examiner = examiner
    self._health = health
    self._pieces = pieces
    self._train_steps = train_steps
    self._feed = feed
    self._keeper = keeper
    self._float32_fallback = float32_fallback
    self._scalar_rows = scalar_rows
    # The replay of the first quarantined batch of this process, reused after.
    self._bad_batch_diagnosis = ""
    # Loops in a row that stopped on bad batches without training a step.
    self._stuck_loops = 0

  def resume(self, records: list[dict]) -> None:
    """A resumed run keeps the remedies its records say were applied."""
    if self._scalar_rows is not None:
      self._scalar_rows.resume(records)

  def check_precision(self, batch, *, step: int) -> None:
    """At the start of a process, before the first trace: whether a layer
    overflows float16 on `batch` from this state (the float32 fallback)."""
    if self._float32_fallback is not None:
      self._float32_fallback(batch, step=step)

  def handle(self, out: LoopOutput, before: tuple[int, int]) -> tuple[bool, int]:
    """Records the loop's incidents and runs recovery.

    Returns (whether it rolled back, the batches it quarantined). In order:
    triage judges the open run of failures that ended the loop, if any; the
    records (incidents, quarantine, counters); the evidence goes to
    `policy.decide`, and the decision is carried out.
    """
    params_ok = bool(out.params_finite)
    stopped = int(out.stop) == STOP_ROLLBACK
    kind = incidents.last_divergence(out)
    if int(out.applied):
      self._stuck_loops = 0
    verdict = self._judge_open_run(out, kind) if stopped and params_ok else None
    open_bad = verdict is not None and verdict.bad_batch
    quarantined = self._record(out, before, stopped=stopped, verdict=verdict)
    if quarantined and self._scalar_rows is not None and self._examiner.stash is not None:
      # The stash holds the loop's last divergent batch: the open run's, or
      # an isolated bad batch's (whose rows the remedy probes itself).
      self._scalar_rows(
        self._examiner.batch(), step=self._step() + 1, rows=verdict.rows if open_bad else None
      )
    frequent = self._actions.note_bad_batches(quarantined, int(out.attempts))
    if int(out.stop) == STOP_RAISE:
      self._keeper.save()
      raise BadInputError(
        f"{self._bad_input(out)} (guard.bad_inputs=raise). "
        "The last healthy state is checkpointed; use guard.bad_inputs=drop_rows or "
        "skip_batch to train past it."
      )
    decision = policy.decide(
      policy.Evidence(
        params_finite=params_ok,
        open_run=stopped,
        open_run_bad_batches=open_bad,
        frequent_bad_batches=frequent,
        last_kind=kind,
      ),
      unhealthy=lambda: self._health.check(
        int(out.applied),
        float(out.sums["norm"]),
        step=self._step(),
        loss_sum=float(out.sums["loss"]),
      ),
    )
    self._carry_out(decision, verdict)
    self._actions.refill_budget()
    return decision.rollback, quarantined

  def _judge_open_run(self, out: LoopOutput, kind: str) -> triage.Verdict:
    """Triage's verdict on the run of failures that ended the loop."""
    verdict = triage.open_run(
      self._examiner.ctx,
      kind=kind,
      batch=self._examiner.batch(),
      step=self._step() + 1,
      count=int(variables.number(self._run.consecutive_bad)),
    )
    # Bad data is bad batches among good ones: when a loop trained on
    # nothing, after another such, no batch from this state trains at all.
    self._stuck_loops += int(verdict.bad_batch and not int(out.applied))
    if verdict.bad_batch and self._stuck_loops >= 2:
      self._stuck_loops = 0
      verdict = triage.diverging(
        f"{2 * int(self._run.consecutive_bad.numpy())} batches in a row failed, each with "
        "some rows non-finite, and no batch trained: the state, not the data, is suspect",
        verdict.diagnosis,
      )
    if verdict.bad_batch:
      self._run.consecutive_bad.assign(0)
      self._bad_batch_diagnosis = self._bad_batch_diagnosis or verdict.diagnosis
    return verdict

  def _record(self, out: LoopOutput, before, *, stopped: bool, verdict) -> int:
    """The loop's incidents, quarantine records and counters; returns the
    batches quarantined."""
    open_bad = verdict is not None and verdict.bad_batch
    quarantined = self._incidents.add_loop(
      out,
      pieces=self._pieces,
      lr_scale=float(variables.number(self._recovery.lr_scale)),
      open_bad_batch=open_bad,
      bad_batch_diagnosis=self._describe_bad_batches(out),
    )
    self._quarantine.write_loop(
      out,
      before,
      stopped=stopped,
      open_bad=open_bad,
      rows=verdict.rows if open_bad else None,
      diagnosis=self._bad_batch_diagnosis,
    )
    r = self._recovery
    # A clean loop adds nothing: no eager op for it (the host's time per loop).
    skipped = int(out.attempts) - int(out.applied)
    if skipped:
      r.skipped_total.assign_add(skipped)
    dropped_examples = int(out.sums["dropped_examples"])
    if dropped_examples:
      r.examples_dropped_total.assign_add(dropped_examples)
    return quarantined

  def _carry_out(self, decision: policy.Decision, verdict) -> None:
    """Rolls back as `decision` says, with the why and diagnosis its cause has."""
    roll_back = self._actions.roll_back
    if decision.cause in ("diverging_state", "frequent_bad_batches") and self._precision_fixed():
      return  # the failing steps were skipped: training goes on from this state
    if decision.cause == "nonfinite_params":
      roll_back("nonfinite_params", why="a variable is non-finite after an update")
    elif decision.cause == "diverging_state":
      roll_back(
        decision.kind, why=verdict.why if verdict else "", diagnosis=verdict.diagnosis or None
      )
    elif decision.cause == "frequent_bad_batches":
      why = self._actions.frequent_bad_batches_text()
      self._recovery.bad_batch_rate.assign(0.0)
      roll_back(decision.kind, why=why, diagnosis=self._bad_batch_diagnosis or None)
    elif decision.kind == "not_learning" and decision.finding.futile:
      self._actions.abort(
        "not_learning",
        self._step() + 1,
        decision.finding.diagnosis,
        "a lower learning rate was tried for this and did not help; it is not tried again",
        float(self._recovery.lr_scale.numpy()),
        why="its running loss is no better than the trivial predictor's",
        cause=kinds.NOT_LEARNING,
      )
    elif decision.cause == "not_learning" and decision.kind == "not_learning":
      roll_back(
        decision.kind,
        cause=kinds.NOT_LEARNING,
        why="its running loss is no better than the trivial predictor's",
        diagnosis=decision.finding.diagnosis,
        probe=True,
      )
    elif decision.cause == "not_learning":
      roll_back(
        decision.kind,
        why="the run stopped learning without a non-finite value",
        diagnosis=decision.finding.diagnosis,
        probe=True,
      )

  def _precision_fixed(self) -> bool:
    """Whether a float16 overflow on the offending batch was remedied by
    computing its layers in float32 (checked by a replay first)."""
    if self._float32_fallback is None or self._examiner.stash is None:
      return False
    return self._float32_fallback(self._examiner.batch(), step=self._step() + 1)

  def _describe_bad_batches(self, out: LoopOutput) -> str:
    """What the replay of a quarantined batch found: once per process, on the
    first loop with one (the batch is stashed with one replica only)."""
    if self._bad_batch_diagnosis or self._examiner.stash is None:
      return self._bad_batch_diagnosis
    kind = incidents.last_divergence(out)
    if kind not in registry.BATCH_BOUND or not any(out.count(k) for k in registry.BATCH_BOUND):
      return ""
    batch = self._examiner.batch()
    if batch is None:
      return ""
    # The stash holds the kind's last batch: its own step, not the loop's end.
    step = int(out.kind_last[registry.code(kind)]) or self._step() + 1
    self._bad_batch_diagnosis = self._examiner.diagnose(kind, step)
    return self._bad_batch_diagnosis

  def _bad_input(self, out: LoopOutput) -> str:
    """The batch that ended the loop under guard.bad_inputs=raise, in words:
    what was bad, the step and the batch's data position."""
    inputs = self._pieces.get("inputs")
    step, position = self._step() + 1, self._feed.position() - 1
    kind = inputs.last_kind(out) if inputs is not None else "nonfinite_inputs"
    what = {
      "nonfinite_inputs": "non-finite input",
      "bad_labels": "bad class labels",
      "bad_shapes": "a batch of another shape",
    }[kind]
    detail = "the inputs" if inputs is None else inputs.where(out)
    if kind != "nonfinite_inputs":
      detail = inputs.describe(kind, out)
    return f"{what} at step {step}: {detail}; the batch at data position {position}"

  def _bad_inputs_what(self, out: LoopOutput) -> str:
    inputs = self._pieces.get("inputs")
    if inputs is None:
      return "the inputs"
    kinds_seen = [k.name for k in inputs.kinds if out.count(k.name)]
    return "; ".join(inputs.describe(k, out) for k in kinds_seen) or "the inputs"

  def _step(self) -> int:
    return int(variables.number(self._run.step))

  def stopped_by(self, out: LoopOutput, *, signaled: bool) -> str | None:
    """Why fit() stops after this loop, as `FitResult.stopped` says it
    ("data_exhausted", "preempted"), or None: it goes on. No usable batch
    raises BadInputError."""
    if int(out.stop) == STOP_DATA_END:
      logging.warning(
        "The training data ended at step %d before train.steps=%d; "
        "stopping cleanly (train.repeat_data is False).",
        self._step(),
        self._train_steps,
      )
      return "data_exhausted"
    if not int(out.applied) and int(out.counts[kinds.SKIPPED_BATCH]) == int(out.attempts):
      self._keeper.save()
      raise BadInputError(
        f"no usable batch in {int(out.attempts)} consecutive batches after step "
        f"{self._step()}: every one had bad inputs "
        f"({self._bad_inputs_what(out)}); clean the data or check the "
        "input pipeline"
      )
    return "preempted" if signaled else None
