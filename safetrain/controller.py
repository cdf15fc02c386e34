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
import os
import time
from collections.abc import Callable

import ml_collections
import tensorflow as tf
from absl import logging

from safetrain import results
from safetrain.checkpoint import resume
from safetrain.checkpoint import store as checkpointing
from safetrain.core import boundary, distribute, errors, preemption, variables
from safetrain.core.errors import BadInputError, DivergenceError
from safetrain.diagnosis import forensics, preflight
from safetrain.diagnosis import replay as replay_lib
from safetrain.records import incidents, logs, quarantine
from safetrain.records import run_log as metrics
from safetrain.recovery import health, precision, response, scalar_rows
from safetrain.recovery import rate_probe as rate_probe_lib
from safetrain.recovery import rollback as recovery
from safetrain.recovery.snapshots import SnapshotRing
from safetrain.results import FitResult, summary_line
from safetrain.step import loop as step_lib
from safetrain.step import loop_state
from safetrain.step.loss_scale import DynamicLossScale
from safetrain.training import actions, state
from safetrain.training import data as data_lib


@dataclasses.dataclass
class Parts:
  """What the trainer built, as the controller uses it."""

  config: ml_collections.ConfigDict
  workdir: str
  trainer_name: str
  strategy: tf.distribute.Strategy
  is_chief: bool
  num_workers: int
  run: state.RunState
  data: state.DataState
  recovery: recovery.RecoveryState
  loss_scale: DynamicLossScale
  train_data: data_lib.TrainData
  iterator: object
  iterator_in_checkpoint: bool
  checkpoints: checkpointing.CheckpointStore
  rollback_objects: dict
  loop: step_lib.GuardedLoop
  all_finite: Callable[[], bool]
  evaluate: Callable[[], dict]
  forensics: replay_lib.Context
  stash: forensics.Stash | None
  retrace: Callable[[], None]  # drops the compiled graphs after a layer's dtype changed
  health: health.Health
  snapshots: SnapshotRing | None
  actions: actions.Actions | None = None  # the user's actions and Keras callbacks
  origin: dict | None = None  # the trainer's file and :ARG, for `safetrain export`
  train_metrics: object = None  # stateful_metrics.MetricSet of build_metrics(), or None
  rate_probe: rate_probe_lib.RateProbe | None = None  # a not_learning rollback's rate choice


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
    self.config = parts.config
    self.workdir = parts.workdir
    self._trainer_name = parts.trainer_name
    self._strategy = parts.strategy
    self._is_chief = parts.is_chief
    self._num_workers = parts.num_workers
    self._run = parts.run
    self._data = parts.data
    self._recovery = parts.recovery
    self._loss_scale = parts.loss_scale
    self._train_data = parts.train_data
    self.iterator = parts.iterator
    self._iterator_in_checkpoint = parts.iterator_in_checkpoint
    self._checkpoints = parts.checkpoints
    self._rollback_objects = parts.rollback_objects
    self._loop = parts.loop
    self._all_finite = parts.all_finite
    self._evaluate = parts.evaluate
    self._forensics = parts.forensics
    self._stash = parts.stash
    self._retrace = parts.retrace
    self._health = parts.health
    self._snapshots = parts.snapshots
    self._actions = parts.actions or actions.Actions([])
    self._origin = parts.origin
    self._train_metrics = parts.train_metrics or None
    self._rate_probe = parts.rate_probe
    # True once the model holds the restored or initial state of the run.
    self.started = False
    self._log: metrics.RunLog | None = None
    self._incidents: incidents.IncidentLog | None = None
    self._response: response.Response | None = None
    # Whether every variable is finite, while known: the loop reports it, and
    # whatever changes variables outside the loop forgets it.
    self._finite: bool | None = None

  def fit(self) -> FitResult:
    """Trains to train.steps updates (see Trainer.fit)."""
    self._start()
    run = _FitState(
      progress=metrics.Progress(self.config.train.steps, self.config.train.log_every_steps)
    )
    self._actions.begin(self._step())
    with preemption.SignalCatcher() as signals:
      while self._step() < self.config.train.steps:
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
    c = self.config
    before = (
      int(variables.number(self._data.position)),
      int(variables.number(self._recovery.attempts)),
    )
    incidents_before = len(self._incidents.records)
    step_before = self._step()
    self._actions.before_loop(step_before)
    if self._train_metrics is not None:
      self._train_metrics.reset()
    out, seconds = self._run_inner_loop()
    self._finite = bool(out.params_finite)
    record = metrics.loop_record(out, seconds=seconds, **self._state_fields())
    if self._train_metrics is not None:
      shown = self._train_metrics.results() if int(out.applied) else {}
      record.update({k: shown.get(k) for k in self._train_metrics.names})
    rolled_back, record["quarantined"] = self._respond(out, before, incidents_before)
    if rolled_back:
      self._finite = None
      # The state fields of a rollback's record are those the run goes on
      # from (the restored step, the lowered learning-rate scale); its
      # measurements (loss, grad_norm, lr, counts) are the undone loop's.
      record.update(rollback=True, **self._state_fields())
    else:
      self._take_snapshot()
    run.keep_loss(self._step(), None if rolled_back or not out.applied else record["loss"])
    evaluated = None
    if self._eval_due() and not rolled_back:
      run.eval_metrics = evaluated = self._evaluate()
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
      self._finite = None  # an action or callback may have set weights
    if self._num_workers > 1 and self._actions.active:
      stop_request = self._agreed_stop(stop_request)
    if self._step() % c.checkpoint.every_steps == 0 or signals.received:
      self._save_checkpoint()
    run.stopped = self._response.stop_reason(out, signaled=bool(signals.received))
    if run.stopped == "completed" and stop_request and self._step() < c.train.steps:
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
      self._save_checkpoint()
      final_eval = self._evaluate()
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
      loss_scale=float(self._loss_scale.scale.numpy()),
      eval_metrics=eval_metrics,
      stopped=run.stopped,
      stop_reason=run.stop_reason,
    )
    self._actions.end()
    logging.info("%s", summary_line(result))
    return result

  def _start(self) -> None:
    """Opens the run's records, restores or starts the run, writes config.json."""
    self._incidents = incidents.IncidentLog(
      os.path.join(self.workdir, "incidents.jsonl"),
      enabled=self._is_chief,
      counter=self._recovery.incidents_total,
    )
    recovery_actions = recovery.Recovery(
      policy=recovery.Policy.from_config(self.config.recovery),
      state=self._recovery,
      run=self._run,
      data=self._data,
      checkpoints=self._checkpoints,
      rollback_objects=self._rollback_objects,
      replay_objects=lambda: dict(
        data=self._data, **({"iterator": self.iterator} if self._iterator_in_checkpoint else {})
      ),
      reseek=None if self._iterator_in_checkpoint else self._seek_data,
      healthy=lambda: bool(self._all_finite()),
      agree=self._agreed_checkpoint,
      is_chief=self._is_chief,
      incidents=self._incidents,
      diagnose=lambda kind: response.diagnose(
        self._forensics, self._stash, kind=kind, step=self._step() + 1
      ),
      reproduces=lambda: response.reproduces(self._forensics, self._stash),
      snapshots=self._snapshots,
      probe=self._rate_probe,
      single_worker=self._num_workers == 1,
    )
    fallback = None
    if self.config.recovery.float32_fallback and self.config.recovery.enabled:
      fallback = precision.Float32Fallback(
        ctx=self._forensics,
        incidents=self._incidents,
        loss_scale=self._loss_scale,
        retrace=self._retrace,
        lr_scale=self._recovery.lr_scale,
      )
    rows_remedy = scalar_rows.ScalarRows(
      ctx=self._forensics,
      piece=self._loop.pieces.get("per_example")
      if self.config.recovery.scalar_rows and self.config.recovery.enabled
      else None,
      scalar_loss=lambda: self._loop.scalar_loss,
      single_replica=self._strategy.num_replicas_in_sync == 1,
      retrace=self._retrace,
      incidents=self._incidents,
      lr_scale=self._recovery.lr_scale,
    )
    self._quarantine = quarantine.QuarantineLog(
      os.path.join(self.workdir, "quarantine.jsonl"), enabled=self._is_chief
    )
    self._response = response.Response(
      run=self._run,
      recovery_state=self._recovery,
      incidents=self._incidents,
      quarantine_log=self._quarantine,
      actions=recovery_actions,
      forensics_ctx=self._forensics,
      stash=self._stash,
      health=self._health,
      pieces=self._loop.pieces,
      train_steps=self.config.train.steps,
      step=self._step,
      save=self._save_checkpoint,
      position=lambda: int(variables.number(self._data.position)),
      float32_fallback=fallback,
      scalar_rows=rows_remedy,
    )
    resumed = self._restore_latest()
    # The workdir is this run's (a refused one has raised): now it is written.
    logs.accept_workdir()
    self._log = metrics.RunLog(self.workdir, enabled=self._is_chief)
    self.started = True
    if resumed is not None:
      # The steps after the checkpoint run again: their records, if a killed
      # process wrote them, are not written twice.
      replayed = self._incidents.expect_replay(self._step())
      replayed += self._quarantine.expect_replay(self._step())
      if replayed:
        logging.info("%d records of steps after %d may be replayed", replayed, self._step())
      self.iterator = resume.reposition(
        self._data,
        self._train_data,
        self._checkpoints,
        checkpointed=self._iterator_in_checkpoint,
        current=self.iterator,
      )
      resume.match_precision(self._run, self._loss_scale, self.config.precision.policy)
      rows_remedy.resume(self._incidents.all())
    if self._is_chief:
      metrics.write_config(
        self.workdir, self.config, self._trainer_name, resumed, experiment=self._origin
      )
    if fallback is not None and self._num_workers == 1:
      # Every process builds the model with the policy's dtypes (a resume
      # too): the first batch tells, before the first trace, whether a layer
      # overflows float16 from this state. One worker only: the workers'
      # first batches differ, and their dtypes must not.
      fallback(self._train_data.first_batch, step=self._step())
    if self._snapshots is not None:
      self._snapshots.log_cost()
    if resumed is None:
      self._run_preflight()
      self._save_checkpoint()  # the initial state is always a target
    else:
      logging.info(
        "Resumed from %s at step %d (lr scale %.4g, %d rollbacks used).",
        resumed,
        self._step(),
        self._recovery.lr_scale.numpy(),
        self._recovery.rollbacks_used.numpy(),
        extra={"safetrain_terminal": True},  # on the command's terminal too
      )
    self._take_snapshot()

  def _run_inner_loop(self) -> tuple[loop_state.LoopOutput, float]:
    """One call of the compiled loop; returns its output and its seconds."""
    step0 = self._step()
    c = self.config
    n = loop_state.loop_length(
      step0,
      train_steps=c.train.steps,
      steps_per_loop=c.train.steps_per_loop,
      every=(c.checkpoint.every_steps, c.eval.every_steps),
    )
    t0 = time.perf_counter()
    try:
      out = self._loop(self.iterator, n)
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
          position=int(variables.number(self._data.position)),
          checkpoint_step=self._checkpoints.latest_step(),
        ) from e
      # The loop's updates are in the variables but not in the counters:
      # nothing of it is saved, the last checkpoint stays the resume point.
      raise BadInputError(
        f"the training data pipeline failed after step {step0} ({cause}). The last "
        f"checkpoint ({self._checkpoints.latest_path()}) is intact: fix the data and run "
        "the same command to resume."
      ) from None
    return out, time.perf_counter() - t0

  def _take_snapshot(self) -> None:
    """Snapshots the state in memory when it is healthy."""
    if self._snapshots is None or not self._snapshots.enabled or not self._healthy():
      return
    self._snapshots.take(self._step(), int(variables.number(self._data.position)))

  def _healthy(self) -> bool:
    """Only these states are saved, snapshotted, rolled back to: no open
    divergence, every variable finite, a loss not far above its best."""
    if int(variables.number(self._run.consecutive_bad)) != 0:
      return False
    if self._health.far_above_best():
      return False
    if self._finite is None:
      self._finite = bool(self._all_finite())
    return self._finite

  def _maybe_histograms(self, step_before: int, attempts: int) -> None:
    """Weight histograms and layer gradient norms when the loop crossed a
    multiple of train.histogram_every_steps (the chief only)."""
    every = self.config.train.histogram_every_steps
    if not every or not self._is_chief or self._step() // every <= step_before // every:
      return
    f = self._forensics
    self._log.summaries.histograms(attempts, f.model, f.compute_loss, self._train_data.first_batch)

  def _agreed_stop(self, reason: str | None) -> str | None:
    """The chief's actions decide for every worker whether the run stops (a
    collective), so no worker trains on into collectives the others left."""
    stop = distribute.broadcast_from_chief(self._strategy, int(bool(reason)), self._is_chief)
    return (reason or "the chief's actions asked to stop") if stop else None

  def _eval_due(self) -> bool:
    every, step = self.config.eval.every_steps, self._step()
    return bool(every) and step % every == 0 and step < self.config.train.steps

  def _step(self) -> int:
    return int(variables.number(self._run.step))

  def _state_fields(self) -> dict:
    """The run's state as a loop record states it."""
    return dict(
      step=self._step(),
      attempts=int(variables.number(self._recovery.attempts)),
      lr_scale=float(variables.number(self._recovery.lr_scale)),
      loss_scale=float(variables.number(self._loss_scale.scale)),
    )

  # ------------------------------------------------- resume and checkpoints

  def _restore_latest(self) -> str | None:
    """Restores the newest healthy checkpoint; returns its path or None."""
    path = resume.restore_latest(
      self._checkpoints,
      healthy=lambda: bool(self._all_finite()),
      agree=self._agreed_checkpoint,
      num_workers=self._num_workers,
      is_chief=self._is_chief,
    )
    if path is not None:
      resume.warn_if_past_the_end(self._step(), self.config.train.steps)
    return path

  def _agreed_checkpoint(self, path: str | None) -> str | None:
    return resume.agreed_checkpoint(
      self._strategy,
      self._checkpoints.directory,
      path,
      num_workers=self._num_workers,
      is_chief=self._is_chief,
    )

  def _seek_data(self) -> None:
    """Re-creates an iterator that is not checkpointed at `data.position`."""
    self.iterator = resume.seek(self._data, self._train_data)

  def _save_checkpoint(self) -> None:
    """Saves the state if it is healthy and not durable yet.

    A state whose step was just saved, resumed from, or rolled back to is
    durable already (a rollback's side state holds what differs): a
    committed checkpoint is never written again.
    """
    if not self._healthy():
      return  # only healthy states are saved
    step = self._step()
    if self._checkpoints.current_step() == step:
      return
    self._checkpoints.save(step)

  def _run_preflight(self) -> None:
    g = self.config.guard
    preflight.check(
      self._forensics,
      self._train_data.first_batch,
      mode=g.preflight,
      bad_inputs=g.bad_inputs,
      fp16_margin=g.preflight_fp16_margin,
    )
