"""What a finished `Trainer.fit()` reports: `FitResult` and its summary line."""

from __future__ import annotations

import dataclasses

from safetrain.training import eval_guard, evaluation


@dataclasses.dataclass
class FitResult:
  """What `Trainer.fit()` returns.

  Attributes:
    step: applied updates (skipped steps do not count).
    loss: mean training loss over the good steps of the loop whose end
      state the run finished with (never a loop a rollback undid); NaN when
      no loop of this process ended at that state (none ran, as on a workdir
      already at train.steps, or a rollback restored a state from before
      this process started).
    incidents: the incident records of the run (as in incidents.jsonl).
    rollbacks: rollbacks performed over the whole run, resumes included.
    lr_scale: the learning-rate scale recovery left in force.
    attempts: steps attempted, skipped ones included.
    skipped_steps: attempts that did not update the model.
    batches_skipped: batches passed over by rollbacks with recovery.data=skip.
    quarantined: bad batches skipped and recorded in quarantine.jsonl.
    examples_dropped: examples left out of per-example losses (non-finite).
    loss_scale: the loss scale at the end (1.0 unless mixed_float16).
    eval_metrics: the last evaluation's metrics ({} if none ran).
    stopped: "completed", "preempted", "data_exhausted", or "action" (an
      action's `record.stop()` or `model.stop_training`, before train.steps).
    stop_reason: why an action stopped the run ("" otherwise).
    exported: the model file fit() wrote (WORKDIR/export/model.keras), or
      None (preempted, a non-chief worker, or the export failed: see the log).
  """

  step: int
  loss: float
  incidents: list
  rollbacks: int
  lr_scale: float
  attempts: int = 0
  skipped_steps: int = 0
  batches_skipped: int = 0
  quarantined: int = 0
  examples_dropped: int = 0
  loss_scale: float = 1.0
  eval_metrics: dict = dataclasses.field(default_factory=dict)
  stopped: str = "completed"
  stop_reason: str = ""
  exported: str | None = None


def from_state(recovery_state, *, step: int, loss: float, **fields) -> FitResult:
  """The result of a run whose recovery counters are `recovery_state` (a
  `recovery.RecoveryState`); `fields` are FitResult's other fields."""
  r = recovery_state
  return FitResult(
    step=step,
    loss=loss,
    rollbacks=int(r.rollbacks_total.numpy()),
    lr_scale=float(r.lr_scale.numpy()),
    attempts=int(r.attempts.numpy()),
    skipped_steps=int(r.skipped_total.numpy()),
    batches_skipped=int(r.batches_skipped.numpy()),
    quarantined=int(r.quarantined_total.numpy()),
    examples_dropped=int(r.examples_dropped_total.numpy()),
    **fields,
  )


def summary_line(result: FitResult) -> str:
  """One line about a finished fit(): incidents, recovery, the last eval."""
  text = (
    f"step {result.step}: {len(result.incidents)} incidents, "
    f"{result.rollbacks} rollbacks, lr scale {result.lr_scale:.4g}, "
    f"{result.batches_skipped} batches skipped, {result.skipped_steps} steps skipped"
  )
  if result.quarantined or result.examples_dropped:
    text += (
      f", {result.quarantined} bad batches quarantined, {result.examples_dropped} examples dropped"
    )
  ev = dict(result.eval_metrics)
  n = ev.pop(evaluation.EXAMPLES, None)
  dropped = ev.pop(eval_guard.DROPPED, None)
  left_out = f" ({dropped} rows with NaN or Inf left out)" if dropped else ""
  if n is not None:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(ev.items(), key=lambda kv: kv[0] != "loss"))
    text += f"; eval on {n} examples{left_out}: {shown}"
  elif dropped:
    text += f"; eval: all {dropped} rows had NaN or Inf, nothing evaluated"
  return text
