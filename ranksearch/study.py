"""The search loop: storage, sampler, pruner, and ask -> launch -> report -> tell per trial.

The orchestrator owns Optuna (and, through the tracker, MLflow); each trial runs in a worker
process group started with `accelerate launch`. A crash, a NaN or an OOM fails one trial only;
the study stops after `budget.max_consecutive_failures` failures in a row.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch import space
from ranksearch.config import StudyConfig
from ranksearch.data import PreparedData, model_location
from ranksearch.launch import WorkerProcess, accelerate_argv, resolve_mixed_precision
from ranksearch.recommend import count_states
from ranksearch.storage import open_storage
from ranksearch.tracking import NullTracker

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_SECONDS = 0.2
HEARTBEAT_SECONDS = 10
EXIT_GRACE_SECONDS = 20  # after a worker's final report, before it is stopped


class StudyStopped(Exception):
    """The study stopped before its budget, for the reason given."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: stop the running trial, record it, and leave."""


def create_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    if s.type == "grid":
        return optuna.samplers.GridSampler(space.grid(cfg.search), seed=s.seed)
    if s.type == "bruteforce":
        return optuna.samplers.BruteForceSampler(seed=s.seed)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    with warnings.catch_warnings():  # multivariate TPE is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # multivariate: rank, alpha and learning rate interact; model them jointly
        return optuna.samplers.TPESampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=True
        )


def create_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """Pruners whose resource is optimizer steps, taken from the study file (never `auto`)."""
    p, t = cfg.pruner, cfg.training
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_steps, max_resource=t.max_steps, reduction_factor=p.reduction_factor
        )
    if p.type == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_steps, reduction_factor=p.reduction_factor
        )
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=3, n_warmup_steps=p.min_steps, interval_steps=t.eval_every
        )
    return optuna.pruners.NopPruner()


def space_size(cfg: StudyConfig) -> int | None:
    """Number of distinct configurations, or None when a dimension is continuous."""
    sizes = [len(d) if isinstance(d, list) else 1 for d in space.dimensions(cfg.search).values()]
    if any(
        isinstance(d, space.Range) and space.is_searched(d)
        for d in space.dimensions(cfg.search).values()
    ):
        return None
    return math.prod(sizes)


def open_study(cfg: StudyConfig, storage_url: str) -> optuna.Study:
    study = optuna.create_study(
        storage=open_storage(storage_url),
        study_name=cfg.study_name,
        direction="minimize",
        sampler=create_sampler(cfg),
        pruner=create_pruner(cfg),
        load_if_exists=True,
    )
    for entry in cfg.enqueue:  # skip_if_exists: a resumed study does not queue them again
        study.enqueue_trial(space.enqueue_params(cfg.search, entry), skip_if_exists=True)
    return study


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state, confirmation runs left out (they are not part of the search budget)."""
    return count_states(study.get_trials(deepcopy=False))


@dataclass
class Outcome:
    state: TrialState
    value: float | None = None
    reason: str = ""


class Orchestrator:
    """Runs trials of one study until its budget is spent, in this process."""

    def __init__(
        self,
        cfg: StudyConfig,
        study_dir: Path,
        storage_url: str,
        data: PreparedData,
        view,
        device: str,
        bf16_supported: bool = False,
        tracker: NullTracker | None = None,
        study_file: Path | None = None,
    ):
        self.cfg = cfg
        self.tracker = tracker or NullTracker()  # NullTracker: MLflow off
        self.study_file = study_file
        self.study_dir = study_dir
        self.data = data
        self.view = view
        self.device = device
        self.mixed_precision = resolve_mixed_precision(
            cfg.training.mixed_precision, device, bf16_supported
        )
        self.study = open_study(cfg, storage_url)
        self.replay_duplicates = True  # a configuration the study finished is not retrained
        self.budget = cfg.budget.n_trials
        size = space_size(cfg)
        if cfg.sampler.type in ("grid", "bruteforce") and size is not None and size < self.budget:
            view.message(
                f"{cfg.sampler.type}: the space has {size} configurations; "
                f"budget.n_trials {self.budget} -> {size}"
            )
            self.budget = size

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> optuna.Study:
        """Trials until `budget.n_trials` finished (complete + pruned) in the whole study."""
        return self._loop(lambda: self.study.ask() if self._remaining() > 0 else None)

    def confirm(self, jobs: list[dict[str, Any]]) -> optuna.Study:
        """Train each job's configuration again with its seed, at the full budget, unpruned.

        A second handle on the same study asks for them: a random sampler takes the enqueued
        parameters as they are (the study's own sampler may reject enqueued trials) and
        NopPruner lets every confirmation run to max_steps. Results are never replayed.
        """
        self.study = optuna.load_study(
            study_name=self.study.study_name,
            storage=self.study._storage,
            sampler=optuna.samplers.RandomSampler(),
            pruner=optuna.pruners.NopPruner(),
        )
        self.replay_duplicates = False
        queue = list(jobs)

        def next_trial() -> optuna.Trial | None:
            if not queue:
                return None
            job = queue.pop(0)
            self.study.enqueue_trial(
                job["params"],
                user_attrs={"confirmation": True, "confirm_of": job["origin"], "seed": job["seed"]},
            )
            return self.study.ask()

        return self._loop(next_trial)

    def _loop(self, next_trial) -> optuna.Study:
        self._fail_orphans()
        failures: list[str] = []
        self.tracker.start_study(self.study, self.cfg, self.study_file, self.data)
        self.view.study_started(self.study, self.budget)
        previous = {
            sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            while (trial := next_trial()) is not None:
                try:
                    outcome = self._run_trial(trial)
                finally:  # also when interrupted: its MLflow run is closed with its state
                    frozen = self.study._storage.get_trial(trial._trial_id)
                    self.tracker.end_trial(frozen)
                self.view.trial_finished(self.study, frozen)
                failures = failures + [outcome.reason] if outcome.state == TrialState.FAIL else []
                if len(failures) >= self.cfg.budget.max_consecutive_failures:
                    raise StudyStopped(
                        f"{len(failures)} trials failed in a row; last reason:\n{failures[-1]}\n"
                        "Fix the cause (see the trial's worker.log), then rerun to resume."
                    )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.tracker.finish_study(self.study)
        return self.study

    def _remaining(self) -> int:
        """Trials still to start; other processes' running trials count, so N workers stop at N."""
        optuna.storages.fail_stale_trials(self.study)
        c = trial_counts(self.study)
        return self.budget - c["complete"] - c["pruned"] - c["running"]

    def _fail_orphans(self) -> None:
        """RUNNING trials of a dead orchestrator on this host (killed, crashed): mark them FAIL."""
        host = socket.gethostname()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("orchestrator_pid")
            if t.user_attrs.get("host") == host and pid and not _pid_alive(pid):
                self.study._storage.set_trial_user_attr(
                    t._trial_id, "fail_reason", "orchestrator died while it ran (killed or crashed)"
                )
                self._tell(t.number, None, TrialState.FAIL)
                self.view.message(f"trial {t.number}: left RUNNING by a dead orchestrator -> FAIL")

    def _run_trial(self, trial: optuna.Trial) -> Outcome:
        config = space.suggest(trial, self.cfg.search)
        key = space.config_key(config)
        for name, value in (
            ("config", config),
            ("config_key", key),
            ("host", socket.gethostname()),
            ("orchestrator_pid", os.getpid()),
        ):
            trial.set_user_attr(name, value)
        run_id = self.tracker.start_trial(trial.number, config)
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
        twin = self._find_twin(key, trial.number) if self.replay_duplicates else None
        if twin is not None:
            return self._replay(trial, twin)
        self.view.trial_started(trial.number, config)
        return self._train(trial, config)

    # -- a configuration already evaluated is answered from the stored result ---------------

    def _find_twin(self, key: str, number: int) -> FrozenTrial | None:
        for t in self.study.get_trials(deepcopy=False, states=FINISHED):
            if (
                t.number != number
                and t.user_attrs.get("config_key") == key
                and not t.user_attrs.get("confirmation")
            ):
                return t
        return None

    def _replay(self, trial: optuna.Trial, twin: FrozenTrial) -> Outcome:
        for step, value in sorted(twin.intermediate_values.items()):
            trial.report(value, step)
            self.tracker.log_report(trial.number, {"step": step, "val_loss": value})
        origin = twin.user_attrs.get("duplicate_of", twin.number)
        for name, value in twin.user_attrs.items():
            if name not in (
                "config",
                "config_key",
                "host",
                "orchestrator_pid",
                "trial_dir",
                "mlflow_run_id",
            ):
                trial.set_user_attr(name, value)
        trial.set_user_attr("duplicate_of", origin)
        trial.set_user_attr("wall_seconds", 0.0)
        self._tell(trial, twin.value if twin.state == TrialState.COMPLETE else None, twin.state)
        return Outcome(twin.state, twin.value)

    # -- a real fine-tune --------------------------------------------------------------------

    def _spec(self, trial: optuna.Trial, config: dict[str, Any], trial_dir: Path) -> dict:
        cfg = self.cfg
        return {
            "study": cfg.study_name,
            "trial": trial.number,
            "task": cfg.task,
            "model": {
                "path": model_location(cfg.model.path),
                "quantization": cfg.model.quantization,
                "trust_remote_code": cfg.model.trust_remote_code,
            },
            "data": {
                "path": str(self.data.path),
                "num_labels": self.data.num_labels,
                "pad_token_id": self.data.pad_token_id,
            },
            "lora": space.lora_kwargs(config, cfg.task),
            "training": {
                **cfg.training.model_dump(),
                "learning_rate": config["learning_rate"],
                "seed": trial.user_attrs.get("seed", cfg.training.seed),  # confirmation seeds
            },
            "reports": str(trial_dir / "reports.jsonl"),
            "orchestrator_pid": os.getpid(),  # the worker exits if this process is gone
            "adapter_dir": str(trial_dir / "adapter"),
        }

    def _train(self, trial: optuna.Trial, config: dict[str, Any]) -> Outcome:
        trial_dir = self.study_dir / "trials" / str(trial.number)
        if trial_dir.exists():  # a retried number in a fresh storage: start clean
            for f in ("reports.jsonl", "worker.log"):
                (trial_dir / f).unlink(missing_ok=True)
        trial_dir.mkdir(parents=True, exist_ok=True)
        spec_path = trial_dir / "spec.json"
        spec_path.write_text(json.dumps(self._spec(trial, config, trial_dir), indent=2))
        trial.set_user_attr("trial_dir", str(trial_dir))
        plan = accelerate_argv(
            spec_path,
            num_processes=self.cfg.launch.num_processes,
            device=self.device,
            mixed_precision=self.mixed_precision,
            cpu_threads=max(1, (os.cpu_count() or 1) // self.cfg.launch.num_processes),
        )
        worker = WorkerProcess(plan, trial_dir / "worker.log", trial_dir / "reports.jsonl")
        started = time.time()
        try:
            outcome = self._supervise(trial, worker.start())
        except Interrupted:
            worker.stop(self.cfg.launch.stop_grace_seconds)
            self._finish(trial, started, Outcome(TrialState.FAIL, reason="interrupted"))
            # queued again so that the next `ranksearch run` trains it first (a grid revisits
            # unfinished points by itself, and Optuna's GridSampler rejects enqueued trials)
            if self.cfg.sampler.type != "grid":
                self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            raise
        worker.reap()
        if outcome.state == TrialState.FAIL and not outcome.reason:
            outcome.reason = worker.log_tail()
        self._finish(trial, started, outcome)
        return outcome

    def _supervise(self, trial: optuna.Trial, worker: WorkerProcess) -> Outcome:
        timeout = self.cfg.launch.trial_timeout_minutes
        deadline = time.monotonic() + timeout * 60 if timeout else math.inf
        beat = 0.0
        ended = math.inf  # when the final report arrived
        last: dict[str, Any] = {}
        while True:
            rc = worker.poll()  # read the exit code first: no report can follow it
            for rec in worker.read_reports():
                if rec.get("event"):
                    self._record_event(trial, rec)
                    ended = time.monotonic() if rec["event"] == "end" else ended
                    continue
                last = rec
                self._record_report(trial, rec)
                if not math.isfinite(rec["val_loss"]):
                    worker.stop(self.cfg.launch.stop_grace_seconds)
                    return Outcome(
                        TrialState.FAIL,
                        reason=f"val_loss is {rec['val_loss']} at step {rec['step']}",
                    )
                if trial.should_prune():
                    worker.stop(self.cfg.launch.stop_grace_seconds)
                    trial.set_user_attr("pruned_at_step", rec["step"])
                    return Outcome(TrialState.PRUNED, rec["val_loss"])
            if rc is not None:
                break
            if time.monotonic() - ended > EXIT_GRACE_SECONDS:
                # The result is in; a rank stuck in its distributed shutdown must not hold the
                # study. Stop the group and keep the result.
                worker.stop(self.cfg.launch.stop_grace_seconds)
                trial.set_user_attr("note", "worker stopped after its final report (hung at exit)")
                rc = 0
                break
            if time.monotonic() > deadline:
                worker.stop(self.cfg.launch.stop_grace_seconds)
                return Outcome(TrialState.FAIL, reason=f"timed out after {timeout} minutes")
            if time.monotonic() - beat > HEARTBEAT_SECONDS:
                self.study._storage.record_heartbeat(trial._trial_id)
                beat = time.monotonic()
            time.sleep(POLL_SECONDS)
        if rc == 0 and last.get("step") == self.cfg.training.max_steps:
            return Outcome(TrialState.COMPLETE, last["val_loss"])
        if rc == 0:
            return Outcome(
                TrialState.FAIL,
                reason=f"worker exited at step {last.get('step', 0)} "
                f"of {self.cfg.training.max_steps} without an error",
            )
        return Outcome(TrialState.FAIL)

    def _record_event(self, trial: optuna.Trial, rec: dict) -> None:
        keep = (
            "trainable_params",
            "total_params",
            "peak_memory_mb",
            "train_seconds",
            "eval_seconds",
        )
        for name in keep:
            if name in rec:
                trial.set_user_attr(name, rec[name])
        if "trainable_params" in rec:
            trial.set_user_attr("trainable_fraction", rec["trainable_params"] / rec["total_params"])

    def _record_report(self, trial: optuna.Trial, rec: dict) -> None:
        trial.report(rec["val_loss"], rec["step"])
        trial.set_user_attr("last_step", rec["step"])
        for name in (
            "val_loss",
            "val_loss_se",
            "accuracy",
            "f1",
            "perplexity",
            "train_loss",
            "train_seconds",
        ):
            if name in rec:
                trial.set_user_attr(name, rec[name])
        best = trial.user_attrs.get("best_val_loss", math.inf)
        trial.set_user_attr("best_val_loss", min(best, rec["val_loss"]))
        self.tracker.log_report(trial.number, rec)
        self.view.trial_report(trial.number, rec)

    def _finish(self, trial: optuna.Trial, started: float, outcome: Outcome) -> None:
        trial.set_user_attr("wall_seconds", round(time.time() - started, 2))
        if outcome.reason:
            trial.set_user_attr("fail_reason", outcome.reason[-2000:])
        value = outcome.value if outcome.state == TrialState.COMPLETE else None
        self._tell(trial, value, outcome.state)

    def _tell(self, trial: optuna.Trial | int, value: float | None, state: TrialState) -> None:
        try:
            self.study.tell(trial, value, state=state, skip_if_finished=True)
        except RuntimeError as e:
            # Grid and brute-force samplers call Study.stop() once the space is exhausted, which
            # Optuna allows only inside optimize(). The trial is stored before that (tell's
            # `finally`), and this loop already caps the budget at the size of the space.
            if "Study.stop" not in str(e):
                raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)
