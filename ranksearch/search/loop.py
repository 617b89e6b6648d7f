"""The search loop: storage, sampler, pruner, and ask -> launch -> report -> tell per trial.

The orchestrator owns Optuna (and, through the tracker, MLflow); each trial runs in a worker
process group started with `accelerate launch`. A crash, a NaN or an OOM fails one trial only;
the study stops after `budget.max_consecutive_failures` failures in a row.
"""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.answer.recommend import Answer, answer, count_states
from ranksearch.config import space
from ranksearch.config.paths import redact_url
from ranksearch.config.problems import StudyError
from ranksearch.config.schema import StudyConfig
from ranksearch.data.prepare import PreparedData
from ranksearch.search.budget import compute_line, stop_reason
from ranksearch.search.launch import (
    TrialFiles,
    WorkerProcess,
    accelerate_argv,
    resolve_mixed_precision,
    single_process_plan,
)
from ranksearch.search.packing import GpuPool, Slots, free_port, plan_slots, usable_cpus
from ranksearch.search.recovery import (
    ask_retry_first,
    fail_lost,
    requeue,
    requeue_lost,
    worker_host,
)
from ranksearch.search.repeats import search_over
from ranksearch.search.sampling import create_pruner, create_sampler, informed_start, search_budget
from ranksearch.search.storage import open_storage, study_lock
from ranksearch.search.supervise import Outcome, Pace, TrialRun
from ranksearch.search.trialspec import trial_spec
from ranksearch.search.warm import WarmPool, WarmTrial, serve_plan
from ranksearch.tracking.tracker import NullTracker, Tracker

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_SECONDS = 0.2
WAIT_SECONDS = 2.0  # between looks at a study whose last trials run elsewhere
WAIT = object()  # next_trial(): nothing to start now, but the study is not done
# trial attributes that belong to one run of a configuration, not to its result
RUN_ATTRS = ("config", "config_key", "host", "orchestrator_pid", "trial_dir", "mlflow_run_id")


class StudyStopped(Exception):
    """The study stopped before its budget, for the reason given."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: stop the running trial, record it, and leave."""


def open_study(cfg: StudyConfig, storage_url: str) -> optuna.Study:
    study = optuna.create_study(
        storage=open_storage(
            storage_url, cfg.launch.heartbeat_seconds, cfg.launch.stale_after_seconds
        ),
        study_name=cfg.study_name,
        direction="minimize",
        sampler=create_sampler(cfg),
        pruner=create_pruner(cfg),
        load_if_exists=True,
    )
    if study.metric_names is None:  # optuna-dashboard and the CLI show "val_loss"
        study.set_metric_names(["val_loss"])
    changed = space.changed_dimensions(study.get_trials(deepcopy=False), cfg.search)
    if changed:  # before any trial is asked: Optuna would refuse it mid-run
        raise StudyError(changed, f"study {cfg.study_name!r} in {redact_url(storage_url)}")
    if not study.get_trials(deepcopy=False):  # a new study: its informed first trial
        params = informed_start(cfg)
        if params:
            study.enqueue_trial(params, user_attrs={"informed_start": True}, skip_if_exists=True)
    for entry in cfg.enqueue:  # skip_if_exists: a resumed study does not queue them again
        study.enqueue_trial(space.enqueue_params(cfg.search, entry), skip_if_exists=True)
    return study


def record_answer(study: optuna.Study, tolerance: str | float) -> Answer:
    """The study's answer (recommend.answer), also stored as study user attributes
    (`best_trial`, `recommended_trial`, `tolerance`, `tolerance_rule`), where optuna-dashboard
    and `optuna` CLI users find it."""
    ans = answer(study.get_trials(deepcopy=False), tolerance)
    for name, value in (
        ("best_trial", ans.best.number if ans.best else None),
        ("recommended_trial", ans.recommended.number if ans.recommended else None),
        ("tolerance", ans.tolerance),
        ("tolerance_rule", ans.tolerance_rule or None),
    ):
        if study.user_attrs.get(name) != value:
            study.set_user_attr(name, value)
    return ans


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state, confirmation runs left out (they are not part of the search budget)."""
    return count_states(study.get_trials(deepcopy=False))


class Orchestrator:
    """Runs trials of one study until its budget is spent, `slots.parallel` at a time."""

    def __init__(
        self,
        cfg: StudyConfig,
        study_dir: Path,
        storage_url: str,
        data: PreparedData,
        view,
        device: str,
        bf16_supported: bool = False,
        tracker: Tracker | None = None,
        study_file: Path | None = None,
        slots: Slots | None = None,
        gpus: list[str] = (),
    ):
        self.cfg = cfg
        self.tracker: Tracker = tracker or NullTracker()  # NullTracker: MLflow off
        self.study_file = study_file
        self.study_dir = study_dir
        self.data = data
        self.view = view
        self.device = device
        self.mixed_precision = resolve_mixed_precision(
            cfg.training.mixed_precision, device, bf16_supported
        )
        # without a plan from `run` (tests, benchmarks): a CPU plan, by the rule `run` uses
        self.slots = slots or plan_slots(
            device="cpu",
            gpus=[],
            gpus_per_trial=cfg.launch.gpus_per_trial,
            parallel_trials=cfg.launch.parallel_trials,
            num_processes=cfg.launch.num_processes,
            cpu_count=usable_cpus(),
        )
        self.gpu_pool = GpuPool(list(gpus), self.slots.gpus_per_trial, self.slots.trials_per_gpu)
        self._ports: set[int] = set()  # main process ports of this process's running trials
        self._failures: list[str] = []  # reasons of the failures in a row, newest last
        self._waiting = False  # told the user we wait for trials running elsewhere
        self._stop_told = False  # told the user the compute budget ends the search
        self._active: list[TrialRun] = []  # this process's running trials
        self._warm = WarmPool(study_dir / "warm-workers.log")  # idle warm workers
        self._pace = Pace()  # how fast its trials report: a hung one is told by it
        self.study = open_study(cfg, storage_url)
        view.compute = partial(compute_line, cfg=cfg)  # compute spent, in the view's lines
        self.replay_duplicates = True  # a configuration the study finished is not retrained
        self._repeats = 0  # proposals of finished configurations in a row (repeats.py)
        self.budget = search_budget(cfg)
        if self.budget < cfg.budget.n_trials:
            view.message(
                f"{cfg.sampler.type}: the space has {self.budget} configurations; "
                f"budget.n_trials {cfg.budget.n_trials} -> {self.budget}"
            )

    # -- what to run next ----------------------------------------------------------------

    def run(self) -> optuna.Study:
        """Trials until `budget.n_trials` finished (complete + pruned) in the whole study."""
        return self._loop(self._next_search_trial)

    def _next_search_trial(self):
        """A new trial, WAIT while the last ones run elsewhere, or None once the study is done.

        Under the study lock, so that N processes on one study start exactly the trials the
        budget has left: trials running anywhere count, failed ones do not.
        """
        with study_lock(self.study._storage, self.study.study_name):
            fail_lost(self.study, self.cfg, self.tracker, self.view)
            c = trial_counts(self.study)
            finished = c["complete"] + c["pruned"]
            over = search_over(self.cfg, self.study.get_trials(deepcopy=False), self._repeats)
            if over:
                self.view.message(over)
            if finished >= self.budget or over or self._compute_spent():
                return None
            if finished + c["running"] >= self.budget:
                elsewhere = c["running"] - len(self._active)
                if elsewhere > 0 and not self._waiting:
                    self.view.message(
                        f"budget reached with {elsewhere} trial(s) running on other workers: "
                        "waiting for them (a failure there reopens the budget)"
                    )
                    self._waiting = True
                return WAIT
            self._waiting = False
            return ask_retry_first(self.study)

    def _compute_spent(self) -> bool:
        """Whether `budget.full_trials` or `budget.stop_when_converged` ends the search (said
        once). Trials running then, here or elsewhere, finish; none starts."""
        reason = stop_reason(self.study.get_trials(deepcopy=False), self.cfg)
        if reason is not None and not self._stop_told:
            self.view.message(f"search stops: {reason}")
            self._stop_told = True
        return reason is not None

    def confirm(self, jobs: list[dict[str, Any]]) -> optuna.Study:
        """Train each job's configuration again with its seed, at the full budget, unpruned.

        A second handle on the same study asks for them: a random sampler takes the enqueued
        parameters as they are (the study's own sampler may reject enqueued trials) and
        NopPruner lets every confirmation run to max_steps. Results are never replayed. A
        job's `attrs` replace the confirmation's attributes (a nested estimate's plain check).
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
            attrs = job.get("attrs") or {
                "confirmation": True, "confirm_of": job["origin"], "seed": job["seed"]
            }  # fmt: skip
            self.study.enqueue_trial(job["params"], user_attrs=attrs)
            return self.study.ask()

        return self._loop(next_trial)

    # -- the loop ------------------------------------------------------------------------

    def _loop(self, next_trial) -> optuna.Study:
        fail_lost(self.study, self.cfg, self.tracker, self.view)
        # under the study lock: the first process creates and describes the parent run, the
        # others find it described (no duplicate params or dataset inputs in the store)
        with study_lock(self.study._storage, self.study.study_name):
            self.tracker.start_study(self.study, self.cfg, self.study_file, self.data)
        self.view.study_started(self.study, self.budget)
        received: list[str] = []  # signals seen, also when their raise was swallowed

        def interrupt(signum, frame) -> None:
            received.append(signal.Signals(signum).name)
            raise Interrupted(received[-1])

        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._failures = []
        self._active = active = []
        try:
            done, idle_until = False, 0.0
            while True:
                while not done and len(active) < self.slots.parallel:
                    if time.monotonic() < idle_until:
                        break
                    trial = next_trial()
                    if trial is None:
                        done = True
                    elif trial is WAIT:
                        idle_until = time.monotonic() + WAIT_SECONDS
                    else:
                        started = self._start(trial)
                        if isinstance(started, TrialRun):
                            active.append(started)
                        else:
                            self._ended(trial, started)
                if done and not active:
                    break
                for run in list(active):
                    outcome = run.poll()
                    if outcome is not None:
                        active.remove(run)
                        self._release(run, outcome)
                        self._ended(run.trial, outcome)
                if received:  # its raise landed where Python ignores it (a GC callback)
                    raise Interrupted(received[-1])
                time.sleep(POLL_SECONDS)
        except BaseException as e:
            # Interrupted, or the study stopped: stop what still runs, record it, queue it again
            reason = "interrupted" if isinstance(e, Interrupted) else "study stopped"
            for run in active:
                run.stop()
                self._release(run, Outcome(TrialState.FAIL, reason=reason))
                frozen = self.study._storage.get_trial(run.trial._trial_id)
                self.tracker.end_trial(frozen)
                requeue(self.study, self.cfg, frozen)  # the next `ranksearch run` trains it first
            raise
        finally:
            self._warm.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.tracker.finish_study(
                self.study, record_answer(self.study, self.cfg.report.tolerance)
            )
        return self.study

    def _ended(self, trial: optuna.Trial, outcome: Outcome) -> None:
        frozen = self.study._storage.get_trial(trial._trial_id)
        self.tracker.end_trial(frozen)
        self.view.trial_finished(self.study, frozen)
        failed = outcome.state == TrialState.FAIL
        self._failures = self._failures + [outcome.reason] if failed else []
        if len(self._failures) >= self.cfg.budget.max_consecutive_failures:
            raise StudyStopped(
                f"{len(self._failures)} trials failed in a row; last reason:\n"
                f"{self._failures[-1]}\n"
                "Fix the cause (see the trial's worker.log), then rerun to resume."
            )

    # -- starting a trial ------------------------------------------------------------------

    def _start(self, trial: optuna.Trial) -> TrialRun | Outcome:
        """Launch the trial's worker, or answer it at once from a finished twin."""
        config = space.suggest(trial, self.cfg.search)
        check_rank = trial.user_attrs.get("rank_check_rank")
        if check_rank is not None:  # a nested estimate trained as the plain LoRA of its rank
            config = space.at_rank(config, check_rank, self.cfg.search)
        nested = space.nested_spec(self.cfg.search, config) if check_rank is None else None
        key = space.config_key(config)
        for name, value in (
            ("config", config.as_attr()),
            ("config_key", key),
            ("host", worker_host()),
            ("orchestrator_pid", os.getpid()),
        ):
            trial.set_user_attr(name, value)
        if nested:  # its ranks and their alphas: the worker's spec and the answer read them
            trial.set_user_attr("nested", nested)
        run_id = self.tracker.start_trial(trial.number, config)
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
        twin = self._find_twin(key, trial.number) if self.replay_duplicates else None
        self._repeats = self._repeats + 1 if twin is not None else 0
        if twin is not None:
            return self._replay(trial, twin)
        self.view.trial_started(trial.number, config)
        return self._launch(trial, config)

    def _find_twin(self, key: str, number: int) -> FrozenTrial | None:
        for t in self.study.get_trials(deepcopy=False, states=FINISHED):
            if (
                t.number != number
                and t.user_attrs.get("config_key") == key
                and not t.user_attrs.get("confirmation")
                and "rank_check_of" not in t.user_attrs  # plain, where the search is nested
            ):
                return t
        return None

    def _replay(self, trial: optuna.Trial, twin: FrozenTrial) -> Outcome:
        """A configuration the study already finished is answered from the stored result."""
        for step, value in sorted(twin.intermediate_values.items()):
            trial.report(value, step)
            self.tracker.log_report(trial.number, {"step": step, "val_loss": value})
        origin = twin.user_attrs.get("duplicate_of", twin.number)
        for name, value in twin.user_attrs.items():
            if name not in (*RUN_ATTRS, "retry_of", "retries"):
                trial.set_user_attr(name, value)
        trial.set_user_attr("duplicate_of", origin)
        trial.set_user_attr("wall_seconds", 0.0)
        outcome = Outcome(twin.state, twin.value)
        self._tell(trial, twin.value if twin.state == TrialState.COMPLETE else None, twin.state)
        return outcome

    def _launch(self, trial: optuna.Trial, config: space.TrialConfig) -> TrialRun:
        trial_dir = self.study_dir / "trials" / str(trial.number)
        if trial_dir.exists():  # a retried number in a fresh storage: start clean
            for f in ("reports.jsonl", "worker.log"):
                (trial_dir / f).unlink(missing_ok=True)
        trial_dir.mkdir(parents=True, exist_ok=True)
        spec_path = trial_dir / "spec.json"
        trial_spec(self.cfg, self.data, trial, config, trial_dir).write(spec_path)
        # relative to the study directory: readers resolve it from where the study is now
        trial.set_user_attr("trial_dir", str(trial_dir.relative_to(self.study_dir)))
        gpus = self.gpu_pool.take() if self.device != "cpu" else []
        if gpus is None:  # the loop starts no more trials than the pool holds
            raise RuntimeError("no free GPU set for a new trial")
        ranks = len(gpus) if gpus else self.cfg.launch.num_processes
        port = free_port(self._ports) if ranks > 1 else 0
        self._ports.add(port)
        plan = accelerate_argv(
            spec_path,
            num_processes=ranks,
            device=self.device,
            mixed_precision=self.mixed_precision,
            gpu_ids=gpus or None,
            main_process_port=port,
            cpu_threads=self.slots.threads,
        )
        plan = single_process_plan(plan) if ranks == 1 else plan
        if gpus:
            trial.set_user_attr("gpus", ",".join(gpus))
        log, reports = trial_dir / "worker.log", trial_dir / "reports.jsonl"
        warm = serve_plan(plan, self.study_dir) if self._reuse_workers(ranks) else None
        if warm is not None:
            worker = self._warm.take(warm).run(spec_path, TrialFiles(log, reports), plan.launcher)
        else:
            worker = WorkerProcess(plan, log, reports).start()
        return TrialRun(
            trial, config, worker, self.cfg, self.tracker, self.view, gpus, port, pace=self._pace
        )

    def _reuse_workers(self, ranks: int) -> bool:
        """Warm workers for one-process trials of an unquantized model (a 4-bit base is not
        restored between trials)."""
        launch = self.cfg.launch
        return launch.reuse_workers and ranks == 1 and self.cfg.model.quantization == "none"

    def _release(self, run: TrialRun, outcome: Outcome) -> None:
        """Record how the trial ended and give its GPUs and port back."""
        trial = run.trial
        trial.set_user_attr("wall_seconds", round(time.time() - run.started, 2))
        if outcome.reason:
            trial.set_user_attr("fail_reason", outcome.reason[-2000:])
        value = outcome.value if outcome.state == TrialState.COMPLETE else None
        self._tell(trial, value, outcome.state)
        if outcome.lost:  # its worker hung: the configuration runs again, as a lost trial's
            frozen = self.study._storage.get_trial(trial._trial_id)
            requeue_lost(self.study, self.cfg, frozen, self.view)
        if isinstance(run.worker, WarmTrial):
            self._warm.give_back(run.worker)
        if run.gpus:
            self.gpu_pool.give_back(run.gpus)
        self._ports.discard(run.port)

    def _tell(self, trial: optuna.Trial | int, value: float | None, state: TrialState) -> None:
        try:
            self.study.tell(trial, value, state=state, skip_if_finished=True)
        except RuntimeError as e:
            # Grid and brute-force samplers call Study.stop() once the space is exhausted, which
            # Optuna allows only inside optimize(). The trial is stored before that (tell's
            # `finally`), and this loop already caps the budget at the size of the space.
            if "Study.stop" not in str(e):
                raise
