"""One running trial: its worker process group, its reports, and how it ends.

Unlike launch.py (builds the command, starts and stops the process), this watches a trial run.

The orchestrator polls every running trial in turn (one thread, however many run at once):
`poll()` moves the worker's new reports into Optuna and MLflow, asks the pruner, beats the
trial's heartbeat, fails a trial whose worker stopped reporting (hung), and returns an
`Outcome` once the trial is over.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from ranksearch.answer import losses
from ranksearch.config.schema import StudyConfig
from ranksearch.search.launch import WorkerProcess
from ranksearch.search.sampling import asks_pruner
from ranksearch.search.warm import WarmTrial
from ranksearch.worker.spec import KEPT_FROM_EVENTS, KEPT_PER_EVALUATION

EXIT_GRACE_SECONDS = 20  # after a worker's final report, before it is stopped
REASON_CHARS = 2000  # a fail reason's length, as stored on the trial
# A worker silent for STALL_FACTOR x the slowest interval between reports seen is hung (a wedged
# GPU call, a hung collective, a stopped process), and never sooner than STALL_FLOOR_MINUTES:
# 10 x leaves room for an interval slowed by trials sharing the machine, an evaluation longer
# than the steps before it, or a slower configuration; the floor covers the intervals not
# measured yet (loading the model, the first `eval_every` steps and evaluation) and is the
# time torch.distributed gives a hung NCCL collective. `launch.stall_minutes` replaces both.
STALL_FACTOR = 10
STALL_FLOOR_MINUTES = 10


@dataclass
class Outcome:
    state: TrialState
    value: float | None = None
    reason: str = ""
    lost: bool = False  # its worker was lost (hung): the configuration runs again


@dataclass
class Pace:
    """The slowest interval between two signs of progress of a trial (its launch, its `start`
    event, its evaluations) over the trials of one orchestrator, who share it: what a
    worker's silence is measured against."""

    slowest: float = 0.0

    def allowed_seconds(self, stall_minutes: float | None) -> float:
        """How long a worker may send nothing before its trial counts as hung."""
        if stall_minutes is not None:
            return stall_minutes * 60
        return max(STALL_FLOOR_MINUTES * 60, STALL_FACTOR * self.slowest)


@dataclass
class TrialRun:
    """A trial whose worker runs, with what it holds (GPUs, port) until it ends."""

    trial: optuna.Trial
    config: dict[str, Any]
    worker: WorkerProcess | WarmTrial
    cfg: StudyConfig
    tracker: Any
    view: Any
    gpus: list[str] = field(default_factory=list)
    port: int = 0
    started: float = field(default_factory=time.time)
    _deadline: float = math.inf
    _beat: float = -math.inf
    _ended: float = math.inf  # when the final report arrived
    _last: dict[str, Any] = field(default_factory=dict)
    pace: Pace = field(default_factory=Pace)
    _progress: float = field(default_factory=time.monotonic)  # the last sign of progress

    def __post_init__(self) -> None:
        timeout = self.cfg.launch.trial_timeout_minutes
        if timeout:
            self._deadline = time.monotonic() + timeout * 60

    def stop(self, retire: bool = False) -> None:
        """Stop the trial's worker (`retire`: and never reuse it, when its state is in doubt)."""
        self.worker.stop(self.cfg.launch.stop_grace_seconds, retire=retire)

    def poll(self) -> Outcome | None:
        """Take in what the worker reported since the last call; the outcome once it is over."""
        trial, launch = self.trial, self.cfg.launch
        rc = self.worker.poll()  # read the exit code first: no report can follow it
        for rec in self._reports():
            if rec.get("event"):
                self._record_event(rec)
                if rec["event"] == "end":
                    self._ended = time.monotonic()
                continue
            self._last = rec
            self._record_report(rec)
            if not math.isfinite(rec["val_loss"]):
                self.stop()
                return Outcome(
                    TrialState.FAIL, reason=f"val_loss is {rec['val_loss']} at step {rec['step']}"
                )
            if asks_pruner(rec["step"], self.cfg.training.max_steps) and trial.should_prune():
                self.stop()
                trial.set_user_attr("pruned_at_step", rec["step"])
                return Outcome(TrialState.PRUNED, rec["val_loss"])
        now = time.monotonic()
        if rc is None and now - self._ended > EXIT_GRACE_SECONDS:
            # The result is in; a rank stuck in its distributed shutdown must not hold the
            # study. Stop the group and keep the result.
            self.stop(retire=True)
            trial.set_user_attr("note", "worker stopped after its final report (hung at exit)")
            rc = 0
        if rc is None and self._ended == math.inf and (stalled := self._stalled(now)):
            return stalled
        if rc is None and now > self._deadline:
            self.stop(retire=True)
            return Outcome(
                TrialState.FAIL, reason=f"timed out after {launch.trial_timeout_minutes} minutes"
            )
        if rc is None:
            if now - self._beat >= launch.heartbeat_seconds:
                trial.study._storage.record_heartbeat(trial._trial_id)
                self._beat = now
            return None
        self.worker.reap()
        return self._exit_outcome(rc)

    def _reports(self) -> list[dict]:
        """The worker's new reports; each is a sign of progress, timed for the pace."""
        records = self.worker.read_reports()
        if records:
            now = time.monotonic()
            self.pace.slowest = max(self.pace.slowest, now - self._progress)
            self._progress = now
            # what `ranksearch status` shows: how long ago the worker last said anything
            self.trial.set_user_attr("last_report_time", time.time())
        return records

    def _stalled(self, now: float) -> Outcome | None:
        """FAIL, its worker killed (a warm one replaced), once the worker has sent nothing for
        longer than the pace allows; its configuration runs again as a lost trial's does."""
        allowed = self.pace.allowed_seconds(self.cfg.launch.stall_minutes)
        if now - self._progress <= allowed:
            return None
        self.stop(retire=True)
        return Outcome(
            TrialState.FAIL,
            reason=f"no progress for {allowed / 60:.3g} minutes at step "
            f"{self._last.get('step', 0)}: its worker sent no report and was killed "
            "(launch.stall_minutes sets this limit)",
            lost=True,
        )

    def _exit_outcome(self, rc: int) -> Outcome:
        max_steps = self.cfg.training.max_steps
        if rc == 0 and self._last.get("step") == max_steps:
            return Outcome(TrialState.COMPLETE, self._last["val_loss"])
        if rc == 0:
            return Outcome(
                TrialState.FAIL,
                reason=f"worker exited at step {self._last.get('step', 0)} "
                f"of {max_steps} without an error",
            )
        return Outcome(TrialState.FAIL, reason=exit_reason(rc, self.worker))

    def _record_event(self, rec: dict) -> None:
        for name in KEPT_FROM_EVENTS:
            if name in rec:
                self.trial.set_user_attr(name, rec[name])
        if "val_losses" in rec:
            losses.store(self.trial, rec["val_losses"])
        for rank, per_example in rec.get("rank_val_losses", {}).items():  # a nested trial's
            losses.store(self.trial, per_example, rank=int(rank))
        if "trainable_params" in rec:
            self.trial.set_user_attr(
                "trainable_fraction", rec["trainable_params"] / rec["total_params"]
            )

    def _record_report(self, rec: dict) -> None:
        trial = self.trial
        trial.report(rec["val_loss"], rec["step"])
        trial.set_user_attr("last_step", rec["step"])
        for name in KEPT_PER_EVALUATION:
            if name in rec:
                trial.set_user_attr(name, rec[name])
        best = trial.user_attrs.get("best_val_loss", math.inf)
        trial.set_user_attr("best_val_loss", min(best, rec["val_loss"]))
        self.tracker.log_report(trial.number, rec)
        self.view.trial_report(trial.number, rec)


def exit_reason(rc: int, worker: WorkerProcess) -> str:
    """Why a worker failed: its exit code or signal (OOM when the kernel says so), then the
    last lines it wrote."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        how = killed_reason(name, worker.pid, _kernel_log() if name == "SIGKILL" else None)
    else:
        how = f"worker exited with code {rc}"
    tail = worker.log_tail() or "(no output)"
    return f"{how}{LOG_QUOTED}\n{tail[-(REASON_CHARS - len(how) - 30) :]}"


def killed_reason(name: str, pid: int | None, kernel_log: str | None) -> str:
    """`worker killed by <signal>`; for SIGKILL, whether the kernel log shows its OOM killer
    killing that pid (`kernel_log` None: the log cannot be read here, so OOM stays a guess)."""
    if name != "SIGKILL":
        return f"worker killed by {name}"
    if kernel_log is None:
        return (
            "worker killed by SIGKILL (likely out of memory: the kernel's OOM killer sends it; "
            "dmesg cannot be read here to tell)"
        )
    if pid is not None and re.search(rf"[Kk]illed process {pid}\b", kernel_log):
        return "worker killed by SIGKILL: out of memory (the kernel's OOM killer, see dmesg)"
    return "worker killed by SIGKILL (not by the OOM killer, says dmesg)"


def _kernel_log() -> str | None:
    """The kernel's ring buffer, or None where it is not readable (often in containers)."""
    try:
        r = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


LOG_QUOTED = "; worker.log ends with:"  # what joins a failure's head to the log it quotes


def reason_head(reason: str) -> str:
    """What a stored fail reason says in one line (the live line, the tables' note): how the
    worker ended (`exit_reason`: its exit code or signal) without the log lines it quotes,
    whose last one is often a warning, not the cause; a one-line reason as it is."""
    lines = [line for line in str(reason).splitlines() if line.strip()]
    return lines[0].split(LOG_QUOTED)[0].strip() if lines else "failed"
