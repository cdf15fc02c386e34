"""The outer loop: what `Trainer.fit()` does between calls of the compiled
inner loop, in eager Python, as Orbit's `Controller.train` does.

Per inner loop: run `step.GuardedLoop` once; record its incidents and hand a
divergence to `recovery.Recovery`; write the loop's record (metrics.jsonl,
TensorBoard) and the progress line; evaluate and checkpoint when due; stop on
a signal, at the end of the data or at `train.steps`. The controller receives
the parts the trainer built (`Parts`), never the Trainer itself.
"""

from __future__ import annotations

import dataclasses
import time

import ml_collections
import tensorflow as tf
from absl import logging

from safetrain import results
from safetrain.checkpoint import resume
from safetrain.checkpoint import store as checkpointing
from safetrain.core import boundary, distribute, errors, preemption, variables
from safetrain.core.errors import BadInputError, DivergenceError
from safetrain.diagnosis import preflight
from safetrain.diagnosis import replay as replay_lib
from safetrain.records import incidents, logs, quarantine
from safetrain.records import run_log as metrics
from safetrain.recovery import response
from safetrain.recovery import rollback as recovery
from safetrain.recovery.keeper import Keeper
from safetrain.results import FitResult, summary_line
from safetrain.step import loop_state
from safetrain.step.loss_scale import DynamicLossScale
from safetrain.training import actions, state
from safetrain.training import data as data_lib
from safetrain.training.compiled import Compiled
from safetrain.training.feed import Feed


@dataclasses.dataclass(frozen=True)
class Logs:
  """The run's incident and quarantine records (opened when fit() starts)."""

  incidents: incidents.IncidentLog
  quarantine: quarantine.QuarantineLog


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the outer loop does what: the config's `train`, `checkpoint` and
  `eval` cadence, as the controller reads it (`from_config`, at build)."""

  steps: int
  steps_per_loop: int
  log_every: int
  checkpoint_every: int
  eval_every: int
  histogram_every: int
  policy: str  # precision.policy: a resume under another one resets the loss scale

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> Schedule:
    return cls(
      steps=c.train.steps,
      steps_per_loop=c.train.steps_per_loop,
      log_every=c.train.log_every_steps,
      checkpoint_every=c.checkpoint.every_steps,
      eval_every=c.eval.every_steps,
      histogram_every=c.train.histogram_every_steps,
      policy=c.precision.policy,
    )


@dataclasses.dataclass
class Parts:
  """What the trainer built, as the controller uses it: a few owned objects
  (`Trainer.build` builds each; the controller builds none)."""

  config: ml_collections.ConfigDict  # written to config.json, as it is
  schedule: Schedule
  preflight: preflight.Preflight  # the audit of the first batch before step 1
  workdir: str
  trainer_name: str
  origin: dict | None  # the trainer's file and :ARG, for `safetrain export`
  workers: distribute.Workers
  run: state.RunState
  recovery: recovery.RecoveryState
  loss_scale: DynamicLossScale
  feed: Feed
  checkpoints: checkpointing.CheckpointStore
  compiled: Compiled  # the guarded loop, the evaluator, the all-finite check
  keeper: Keeper  # which states are saved and snapshotted
  logs: Logs
  response: response.Response  # a loop's incidents -> records and recovery
  forensics: replay_lib.Context  # the replay (histograms, preflight)
  actions: actions.Actions  # the user's actions and Keras callbacks
  train_metrics: object = None  # stateful_metrics.MetricSet of build_metrics(), or None


@dataclasses.dataclass
class _FitState:
  """What one fit() carries from loop to loop on the host."""

  progress: metrics.Progress
  eval_metrics: dict = dataclasses.field(default_factory=dict)
  last_loss: float = float("nan")
  # step -> the loss of the loop that ended there (only states that were kept)
  kept: dict = dataclasses.field(default_factory=dict)
  stopped: str = "completed"
  stop_reason: str = ""

  def keep_loss(self, step: int, loss: float | None) -> None:
    """The loss of the state that was kept: an undone loop's is not, and a
    rollback takes the run back to the state some earlier loop ended at."""
    self.kept = {k: v for k, v in self.kept.items() if k <= step}
    if loss is not None:
      self.kept[step] = loss
    self.last_loss = self.kept.get(step, float("nan"))


class Controller:
  """Runs `fit()` on the parts a trainer built.

  Args:
    parts: the built parts.
  """

  def __init__(self, parts: Parts):
    self.parts = parts
    self.config = parts.config
    self._schedule = parts.schedule
    self.workdir = parts.workdir
    # The objects each loop uses, by their short names.
    self._run, self._recovery, self._feed = parts.run, parts.recovery, parts.feed
    self._keeper, self._response, self._actions = parts.keeper, parts.response, parts.actions
    self._incidents = parts.logs.incidents
    self._train_metrics = parts.train_metrics
    # True once the model holds the restored or initial state of the run.
    self.started = False
    self._log: metrics.RunLog | None = None

  def fit(self) -> FitResult:
    """Trains to train.steps updates (see Trainer.fit)."""
    self._start()
    run = _FitState(progress=metrics.Progress(self._schedule.steps, self._schedule.log_every))
    self._actions.begin(self._step())
    with preemption.SignalCatcher() as signals:
      while self._step() < self._schedule.steps:
        self._one_loop(run, signals)
        if run.stopped != "completed":
          break
    run.progress.close()
    return self._finish(run)

  def _one_loop(self, run: _FitState, signals) -> None:
    """One inner loop and what follows it on the host, in order: the
    response to its incidents, a snapshot, an evaluation when due, the
    records, the progress line, the user's actions, a checkpoint when due,
    and whether fit() stops."""
    c = self._schedule
    before = (self._feed.position(), int(variables.number(self._recovery.attempts)))
    incidents_before = len(self._incidents.records)
    step_before = self._step()
    self._actions.before_loop(step_before)
    if self._train_metrics is not None:
      self._train_metrics.reset()
    out, seconds = self._run_inner_loop()
    self._keeper.knows(bool(out.params_finite))
    record = metrics.loop_record(out, seconds=seconds, **self._state_fields())
    if self._train_metrics is not None:
      shown = self._train_metrics.results() if int(out.applied) else {}
      record.update({k: shown.get(k) for k in self._train_metrics.names})
    rolled_back, record["quarantined"] = self._respond(out, before, incidents_before)
    if rolled_back:
      self._keeper.knows(None)
      # The state fields of a rollback's record are those the run goes on
      # from (the restored step, the lowered learning-rate scale); its
      # measurements (loss, grad_norm, lr, counts) are the undone loop's.
      record.update(rollback=True, **self._state_fields())
    else:
      self._keeper.snapshot()
    run.keep_loss(self._step(), None if rolled_back or not out.applied else record["loss"])
    evaluated = None
    if self._eval_due() and not rolled_back:
      run.eval_metrics = evaluated = self.parts.compiled.evaluator()
      record.update({f"eval_{k}": v for k, v in evaluated.items()})
    new_incidents = self._incidents.records[incidents_before:]
    self._log.write(record, new_incidents)
    if not rolled_back:
      self._maybe_histograms(step_before, record["attempts"])
    names = self._train_metrics.names if self._train_metrics else None
    run.progress.update(
      self._step(),
      seconds,
      int(out.applied),
      record["loss"],
      {k: record[k] for k in names} if names else None,
    )
    # Before the save, so what an action changed (a lowered base rate) is in it.
    stop_request = self._actions.after_loop(
      record=record, incidents=new_incidents, eval_metrics=evaluated, rolled_back=rolled_back
    )
    if self._actions.active:
      self._keeper.knows(None)  # an action or callback may have set weights
      stop_request = self.parts.workers.agreed_stop(stop_request)
    if self._step() % c.checkpoint_every == 0 or signals.received:
      self._keeper.save()
    stopped = self._response.stopped_by(out, signaled=bool(signals.received))
    if stopped is not None:
      run.stopped = stopped
    elif stop_request and self._step() < c.steps:
      run.stopped, run.stop_reason = "action", stop_request

  def _respond(self, out, before, incidents_before: int) -> tuple[bool, int]:
    try:
      return self._response.handle(out, before)
    except DivergenceError:
      # The abort's incident (with its diagnosis) is in TensorBoard too.
      attempts = int(self._recovery.attempts.numpy())
      self._log.summaries.incidents(attempts, self._incidents.records[incidents_before:])
      self._log.flush()
      raise

  def _finish(self, run: _FitState) -> FitResult:
    """The final save, evaluation and records of a fit, and its result."""
    eval_metrics = run.eval_metrics
    if run.stopped != "preempted":
      self._keeper.save()
      final_eval = self.parts.compiled.evaluator()
      eval_metrics = final_eval or eval_metrics
      if eval_metrics:
        self._log.write_final_eval(self._step(), eval_metrics, int(self._recovery.attempts.numpy()))
      self._actions.final(self._step(), final_eval)
    self._log.flush()
    result = results.from_state(
      self._recovery,
      step=self._step(),
      loss=run.last_loss,
      incidents=self._incidents.all(),
      loss_scale=float(self.parts.loss_scale.scale.numpy()),
      eval_metrics=eval_metrics,
      stopped=run.stopped,
      stop_reason=run.stop_reason,
    )
    self._actions.end()
    logging.info("%s", summary_line(result))
    return result

  def _start(self) -> None:
    """Opens the run's records, restores or starts the run, writes config.json."""
    p = self.parts
    p.logs.incidents.open()
    p.logs.quarantine.open()
    resumed = self._restore_latest()
    # The workdir is this run's (a refused one has raised): now it is written.
    logs.accept_workdir()
    self._log = metrics.RunLog(self.workdir, enabled=p.workers.is_chief)
    self.started = True
    if resumed is not None:
      # The steps after the checkpoint run again: their records, if a killed
      # process wrote them, are not written twice.
      replayed = p.logs.incidents.expect_replay(self._step())
      replayed += p.logs.quarantine.expect_replay(self._step())
      if replayed:
        logging.info("%d records of steps after %d may be replayed", replayed, self._step())
      self._feed.reposition(p.checkpoints)
      resume.match_precision(self._run, p.loss_scale, self._schedule.policy)
      self._response.resume(self._incidents.all())
    if p.workers.is_chief:
      metrics.write_config(self.workdir, self.config, p.trainer_name, resumed, experiment=p.origin)
    if p.workers.single:
      # Every process builds the model with the policy's dtypes (a resume
      # too): the first batch tells, before the first trace, whether a layer
      # overflows float16 from this state. One worker only: the workers'
      # first batches differ, and their dtypes must not.
      self._response.check_precision(self._feed.first_batch, step=self._step())
    if self._keeper.snapshots is not None:
      self._keeper.snapshots.log_cost()
    if resumed is None:
      self._run_preflight()
      self._keeper.save()  # the initial state is always a target
    else:
      logging.info(
        "Resumed from %s at step %d (lr scale %.4g, %d rollbacks used).",
        resumed,
        self._step(),
        self._recovery.lr_scale.numpy(),
        self._recovery.rollbacks_used.numpy(),
        extra={"safetrain_terminal": True},  # on the command's terminal too
      )
    self._keeper.snapshot()

  def _run_inner_loop(self) -> tuple[loop_state.LoopOutput, float]:
    """One call of the compiled loop; returns its output and its seconds."""
    step0 = self._step()
    c = self._schedule
    n = loop_state.loop_length(
      step0,
      train_steps=c.steps,
      steps_per_loop=c.steps_per_loop,
      every=(c.checkpoint_every, c.eval_every),
    )
    t0 = time.perf_counter()
    try:
      out = self.parts.compiled.loop(self._feed.iterator, n)
    except tf.errors.OpError as e:
      cause = data_lib.pipeline_failure(e)
      if cause is None:
        if errors.io_fault(e) is not None:
          raise  # a file error: the command's I/O policy names the path
        # Not a numerical incident (the guard sees those without an error):
        # the loop's updates are in the variables but not in the counters,
        # nothing of it is saved, the last checkpoint is the resume point.
        raise boundary.LoopError(
          e,
          first_step=step0 + 1,
          last_step=step0 + int(n),
          position=self._feed.position(),
          checkpoint_step=self.parts.checkpoints.latest_step(),
        ) from e
      # The loop's updates are in the variables but not in the counters:
      # nothing of it is saved, the last checkpoint stays the resume point.
      raise BadInputError(
        f"the training data pipeline failed after step {step0} ({cause}). The last "
        f"checkpoint ({self.parts.checkpoints.latest_path()}) is intact: fix the data and run "
        "the same command to resume."
      ) from None
    return out, time.perf_counter() - t0

  def _maybe_histograms(self, step_before: int, attempts: int) -> None:
    """Weight histograms and layer gradient norms when the loop crossed a
    multiple of train.histogram_every_steps (the chief only)."""
    every = self._schedule.histogram_every
    if (
      not every or not self.parts.workers.is_chief or self._step() // every <= step_before // every
    ):
      return
    f = self.parts.forensics
    self._log.summaries.histograms(attempts, f.model, f.compute_loss, self._feed.first_batch)

  def _eval_due(self) -> bool:
    every, step = self._schedule.eval_every, self._step()
    return bool(every) and step % every == 0 and step < self._schedule.steps

  def _step(self) -> int:
    return int(variables.number(self._run.step))

  def _state_fields(self) -> dict:
    """The run's state as a loop record states it."""
    return dict(
      step=self._step(),
      attempts=int(variables.number(self._recovery.attempts)),
      lr_scale=float(variables.number(self._recovery.lr_scale)),
      loss_scale=float(variables.number(self.parts.loss_scale.scale)),
    )

  # ------------------------------------------------- resume and checkpoints

  def _restore_latest(self) -> str | None:
    """Restores the newest healthy checkpoint; returns its path or None."""
    path = resume.restore_latest(
      self.parts.checkpoints, healthy=self._keeper.all_finite, workers=self.parts.workers
    )
    if path is not None:
      resume.warn_if_past_the_end(self._step(), self._schedule.steps)
    return path

  def _run_preflight(self) -> None:
    self.parts.preflight(self.parts.forensics, self._feed.first_batch)
