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

from safetrain import (
  actions,
  checkpointing,
  distribute,
  forensics,
  health,
  incidents,
  kinds,
  metrics,
  preemption,
  preflight,
  quarantine,
  recovery,
  state,
  triage,
)
from safetrain import config as config_lib
from safetrain import data as data_lib
from safetrain import step as step_lib
from safetrain.errors import BadInputError, DivergenceError
from safetrain.loss_scale import DynamicLossScale
from safetrain.results import FitResult, summary_line
from safetrain.snapshots import SnapshotRing


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
  forensics: forensics.Context
  stash: forensics.Stash | None
  health: health.Health
  snapshots: SnapshotRing | None
  actions: actions.Actions | None = None  # the user's actions and Keras callbacks
  origin: dict | None = None  # the trainer's file and :ARG, for `safetrain export`
  train_metrics: object = None  # stateful_metrics.MetricSet of build_metrics(), or None


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
    self._health = parts.health
    self._snapshots = parts.snapshots
    self._quarantine: quarantine.QuarantineLog | None = None
    # The replay of the first quarantined batch of this process, reused after.
    self._bad_batch_diagnosis = ""
    # Loops in a row that stopped on bad batches without training a step.
    self._stuck_loops = 0
    self._actions = parts.actions or actions.Actions([])
    self._origin = parts.origin
    self._train_metrics = parts.train_metrics or None
    # True once the model holds the restored or initial state of the run.
    self.started = False
    self._log: metrics.RunLog | None = None
    self._incidents: incidents.IncidentLog | None = None
    self._recovery_actions: recovery.Recovery | None = None

  def fit(self) -> FitResult:
    """Trains to train.steps updates (see Trainer.fit)."""
    c = self.config
    self._start()
    progress = metrics.Progress(c.train.steps, c.train.log_every_steps)
    eval_metrics: dict = {}
    last_loss = float("nan")
    kept_loss: dict[int, float] = {}  # step -> the loss of the loop that ended there
    stopped, stop_reason = "completed", ""
    self._actions.begin(self._step())
    with preemption.SignalCatcher() as signals:
      while self._step() < c.train.steps:
        before = (int(self._data.position.numpy()), int(self._recovery.attempts.numpy()))
        incidents_before = len(self._incidents.records)
        step_before = self._step()
        self._actions.before_loop(self._step())
        if self._train_metrics is not None:
          self._train_metrics.reset()
        out, seconds = self._run_inner_loop()
        record = metrics.loop_record(
          out,
          step=self._step(),
          attempts=int(self._recovery.attempts.numpy()),
          lr_scale=float(self._recovery.lr_scale.numpy()),
          loss_scale=float(self._loss_scale.scale.numpy()),
          seconds=seconds,
        )
        if self._train_metrics is not None:
          shown = self._train_metrics.results() if int(out.applied) else {}
          record.update({k: shown.get(k) for k in self._train_metrics.names})
        try:
          rolled_back, quarantined = self._handle_incidents(out, before)
        except DivergenceError:
          # The abort's incident (with its diagnosis) is in TensorBoard too.
          attempts = int(self._recovery.attempts.numpy())
          self._log.summaries.incidents(attempts, self._incidents.records[incidents_before:])
          self._log.flush()
          raise
        record["quarantined"] = quarantined
        if rolled_back:
          # The state fields of a rollback's record are those the run goes on
          # from (the restored step, the lowered learning-rate scale); its
          # measurements (loss, grad_norm, lr, counts) are the undone loop's.
          record.update(
            rollback=True,
            step=self._step(),
            lr_scale=float(self._recovery.lr_scale.numpy()),
            loss_scale=float(self._loss_scale.scale.numpy()),
          )
        else:
          self._take_snapshot()
        # The loss of the state that was kept: an undone loop's is not, and a
        # rollback takes the run back to the state some earlier loop ended at.
        kept_loss = {k: v for k, v in kept_loss.items() if k <= self._step()}
        if not rolled_back and out.applied:
          kept_loss[self._step()] = record["loss"]
        last_loss = kept_loss.get(self._step(), float("nan"))
        evaluated = None
        if self._eval_due() and not rolled_back:
          eval_metrics = evaluated = self._evaluate()
          record.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        self._log.write(record, self._incidents.records[incidents_before:])
        if not rolled_back:
          self._maybe_histograms(step_before, record["attempts"])
        progress.update(
          self._step(),
          seconds,
          int(out.applied),
          record["loss"],
          {k: record[k] for k in self._train_metrics.names} if self._train_metrics else None,
        )
        # Before the save, so what an action changed (a lowered base rate) is in it.
        stop_request = self._actions.after_loop(
          record=record,
          incidents=self._incidents.records[incidents_before:],
          eval_metrics=evaluated,
          rolled_back=rolled_back,
        )
        if self._num_workers > 1 and self._actions.active:
          stop_request = self._agreed_stop(stop_request)
        if self._step() % c.checkpoint.every_steps == 0 or signals.received:
          self._save_checkpoint()
        stopped = self._stop_reason(out, signals)
        if stopped == "completed" and stop_request and self._step() < c.train.steps:
          stopped, stop_reason = "action", stop_request
        if stopped != "completed":
          break
    progress.close()
    if stopped != "preempted":
      self._save_checkpoint()
      final_eval = self._evaluate()
      eval_metrics = final_eval or eval_metrics
      if eval_metrics:
        self._log.write_final_eval(self._step(), eval_metrics, int(self._recovery.attempts.numpy()))
      self._actions.final(self._step(), final_eval)
    self._log.flush()
    result = self._result(last_loss, eval_metrics, stopped)
    result.stop_reason = stop_reason
    self._actions.end()
    logging.info("%s", summary_line(result))
    return result

  def _start(self) -> None:
    """Opens the run's records, restores or starts the run, writes config.json."""
    self._log = metrics.RunLog(self.workdir, enabled=self._is_chief)
    self._incidents = incidents.IncidentLog(
      os.path.join(self.workdir, "incidents.jsonl"),
      enabled=self._is_chief,
      counter=self._recovery.incidents_total,
    )
    self._quarantine = quarantine.QuarantineLog(
      os.path.join(self.workdir, "quarantine.jsonl"), enabled=self._is_chief
    )
    self._recovery_actions = recovery.Recovery(
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
      diagnose=self._diagnose,
      snapshots=self._snapshots,
    )
    resumed = self._restore_latest()
    self.started = True
    if resumed is not None:
      iterator = self._data.resume(
        self._train_data,
        checkpointed=self._iterator_in_checkpoint,
        iterator_restored=self._checkpoints.iterator_restored,
      )
      if iterator is not None:
        self.iterator = iterator
        self._checkpoints.replace_objects(iterator=iterator)
      elif not self._iterator_in_checkpoint:
        self._seek_data()
      self._resume_precision()
    if self._is_chief:
      metrics.write_config(
        self.workdir, self.config, self._trainer_name, resumed, experiment=self._origin
      )
    if self._snapshots is not None and self._snapshots.enabled:
      logging.info(
        "In-memory snapshots: %d x %.2f MB (recovery.snapshots, recovery.snapshots_max_mb).",
        len(self._snapshots.slots),
        self._snapshots.bytes_per_slot / 2**20,
      )
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

  def _run_inner_loop(self) -> tuple[step_lib.LoopOutput, float]:
    """One call of the compiled loop; returns its output and its seconds."""
    step0 = self._step()
    n = self._next_loop_length(step0)
    t0 = time.perf_counter()
    try:
      out = self._loop(self.iterator, n)
    except tf.errors.OpError as e:
      cause = data_lib.pipeline_failure(e)
      if cause is None:
        raise
      # The loop's updates are in the variables but not in the counters:
      # nothing of it is saved, the last checkpoint stays the resume point.
      raise BadInputError(
        f"the training data pipeline failed after step {step0} ({cause}). The last "
        f"checkpoint ({self._checkpoints.latest_path()}) is intact: fix the data and run "
        "the same command to resume."
      ) from None
    return out, time.perf_counter() - t0

  def _handle_incidents(self, out: step_lib.LoopOutput, before: tuple[int, int]):
    """Records the loop's incidents and runs recovery.

    Returns (whether it rolled back, the batches it quarantined). The action
    follows the cause: a bad batch is quarantined; a diverging state (the
    guard's open run of failures, judged by `triage`; non-finite variables;
    frequent bad batches; a stall or dead units) is rolled back.
    """
    params_ok = bool(self._all_finite())
    stopped = int(out.stop) == step_lib.STOP_ROLLBACK
    kind = incidents.last_divergence(out)
    verdict = None
    if int(out.applied):
      self._stuck_loops = 0
    if stopped and params_ok:
      verdict = triage.open_run(
        self._forensics,
        kind=kind,
        batch=self._stash.batch() if self._stash is not None else None,
        step=self._step() + 1,
        count=int(self._run.consecutive_bad.numpy()),
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
    open_bad = verdict is not None and verdict.bad_batch
    lr_scale = float(self._recovery.lr_scale.numpy())
    quarantined = self._incidents.add_loop(
      out,
      leaf_names=self._train_data.leaf_names,
      bad_inputs=self.config.guard.bad_inputs,
      lr_scale=lr_scale,
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
    r.skipped_total.assign_add(int(out.attempts) - int(out.applied))
    r.examples_dropped_total.assign_add(int(out.dropped_examples))
    frequent = self._recovery_actions.note_bad_batches(quarantined, int(out.attempts))
    if int(out.stop) == step_lib.STOP_RAISE:
      self._save_checkpoint()
      raise BadInputError(
        f"non-finite input at step {self._step() + 1}: "
        f"{incidents.bad_leaves(out, self._train_data.leaf_names)} (guard.bad_inputs=raise). "
        "The last healthy state is checkpointed; use guard.bad_inputs=drop_rows or "
        "skip_batch to train past it."
      )
    roll_back = self._recovery_actions.roll_back
    if not params_ok:
      roll_back("nonfinite_params", why="a variable is non-finite after an update")
    elif stopped and not open_bad:
      roll_back(kind, why=verdict.why if verdict else "", diagnosis=verdict.diagnosis or None)
    elif frequent:
      why = self._recovery_actions.frequent_bad_batches_text()
      r.bad_batch_rate.assign(0.0)
      roll_back(kind, why=why, diagnosis=self._bad_batch_diagnosis or None)
    else:
      finding = self._health.check(int(out.applied), float(out.norm_sum))
      if finding is None:
        self._recovery_actions.refill_budget()
        return False, quarantined
      roll_back(
        finding.kind,
        why="the run stopped learning without a non-finite value",
        diagnosis=finding.diagnosis,
      )
    self._recovery_actions.refill_budget()
    return True, quarantined

  def _describe_bad_batches(self, out: step_lib.LoopOutput) -> str:
    """What the replay of a quarantined batch found: once per process, on the
    first loop with one (the batch is stashed with one replica only)."""
    if self._bad_batch_diagnosis or self._stash is None:
      return self._bad_batch_diagnosis
    kind = incidents.last_divergence(out)
    if kinds.KINDS.index(kind) not in kinds.BATCH_BOUND or not any(
      int(out.kind_counts[k]) for k in kinds.BATCH_BOUND
    ):
      return ""
    batch = self._stash.batch()
    if batch is None:
      return ""
    self._bad_batch_diagnosis = forensics.diagnose(
      self._forensics, kind=kind, batch=batch, step=self._step() + 1
    )
    return self._bad_batch_diagnosis

  def _take_snapshot(self) -> None:
    """Snapshots the state in memory when it is healthy."""
    if self._snapshots is None or not self._snapshots.enabled or not self._healthy():
      return
    self._snapshots.take(self._step(), int(self._data.position.numpy()))

  def _healthy(self) -> bool:
    """Only these states are saved, snapshotted, rolled back to: no open
    divergence, every variable finite, a loss not far above its best."""
    if int(self._run.consecutive_bad.numpy()) != 0:
      return False
    if self._health.far_above_best():
      return False
    return bool(self._all_finite())

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

  def _stop_reason(self, out: step_lib.LoopOutput, signals: preemption.SignalCatcher) -> str:
    """Why fit() stops after this loop: "completed" (not yet) unless the data
    ended, a signal came, or no batch was usable (BadInputError)."""
    if int(out.stop) == step_lib.STOP_DATA_END:
      logging.warning(
        "The training data ended at step %d before train.steps=%d; "
        "stopping cleanly (train.repeat_data is False).",
        self._step(),
        self.config.train.steps,
      )
      return "data_exhausted"
    if not int(out.applied) and int(out.counts[kinds.SKIPPED_BATCH]) == int(out.attempts):
      self._save_checkpoint()
      raise BadInputError(
        f"no usable batch in {int(out.attempts)} consecutive batches after step "
        f"{self._step()}: every one had non-finite inputs "
        f"({incidents.bad_leaves(out, self._train_data.leaf_names)}); clean the data or check the "
        "input pipeline"
      )
    return "preempted" if signals.received else "completed"

  def _step(self) -> int:
    return int(self._run.step.numpy())

  def _next_loop_length(self, step: int) -> int:
    """Up to train.steps_per_loop, ending at the next checkpoint or eval."""
    c = self.config
    bounds = [c.train.steps, _next_multiple(step, c.checkpoint.every_steps)]
    if c.eval.every_steps:
      bounds.append(_next_multiple(step, c.eval.every_steps))
    return max(1, min(min(bounds) - step, c.train.steps_per_loop))

  def _result(self, last_loss: float, eval_metrics: dict, stopped: str) -> FitResult:
    r = self._recovery
    return FitResult(
      step=self._step(),
      loss=last_loss,
      incidents=self._incidents.all(),
      rollbacks=int(r.rollbacks_total.numpy()),
      lr_scale=float(r.lr_scale.numpy()),
      attempts=int(r.attempts.numpy()),
      skipped_steps=int(r.skipped_total.numpy()),
      batches_skipped=int(r.batches_skipped.numpy()),
      quarantined=int(r.quarantined_total.numpy()),
      examples_dropped=int(r.examples_dropped_total.numpy()),
      loss_scale=float(self._loss_scale.scale.numpy()),
      eval_metrics=eval_metrics,
      stopped=stopped,
    )

  # ------------------------------------------------- resume and checkpoints

  def _restore_latest(self) -> str | None:
    """Restores the newest healthy checkpoint; returns its path or None.

    With several workers the chief picks it (repairing the directory if need
    be) and the others restore the same one from the chief's directory.
    """
    healthy = lambda: bool(self._all_finite())  # noqa: E731
    if self._num_workers == 1:
      path = self._checkpoints.restore_latest(healthy=healthy)
    else:
      path = self._checkpoints.restore_latest(healthy=healthy) if self._is_chief else None
      path = self._agreed_checkpoint(path)
      if path is not None and not self._is_chief:
        self._checkpoints.restore_path(path)
    if path is not None and self._step() > self.config.train.steps:
      logging.warning(
        "The workdir is at step %d, past train.steps=%d: nothing to train (a lower "
        "train.steps never undoes steps).",
        self._step(),
        self.config.train.steps,
      )
    return path

  def _agreed_checkpoint(self, path: str | None) -> str | None:
    """The chief's choice of checkpoint, on every worker (a collective)."""
    if self._num_workers == 1:
      return path
    step = -1 if path is None else checkpointing.step_of(path)
    step = distribute.broadcast_from_chief(self._strategy, step, self._is_chief)
    if self._is_chief:
      return path
    return None if step < 0 else checkpointing.path_of(self._checkpoints.directory, step)

  def _resume_precision(self) -> None:
    saved = config_lib.POLICIES[int(self._run.precision.numpy())]
    policy = self.config.precision.policy
    if saved != policy:
      self._loss_scale.reset()
      logging.warning(
        "Resuming a %s checkpoint under precision.policy=%s: the loss scale starts afresh at %g.",
        saved,
        policy,
        float(self._loss_scale.scale.numpy()),
      )
      self._run.precision.assign(config_lib.POLICIES.index(policy))

  def _seek_data(self) -> None:
    """Re-creates an iterator that is not checkpointed at `data.position`."""
    self.iterator = self._train_data.iterator(int(self._data.position.numpy()))

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

  def _diagnose(self, kind: str) -> str:
    """Forensics on the offending batch (never raises)."""
    batch = self._stash.batch() if self._stash is not None and kind != "nonfinite_params" else None
    return forensics.diagnose(self._forensics, kind=kind, batch=batch, step=self._step() + 1)

  def _run_preflight(self) -> None:
    g = self.config.guard
    preflight.check(
      self._forensics,
      self._train_data.first_batch,
      mode=g.preflight,
      bad_inputs=g.bad_inputs,
      fp16_margin=g.preflight_fp16_margin,
    )


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every
