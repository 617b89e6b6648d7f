"""MLflow: one experiment and one parent run per study, one nested run per trial.

Only the orchestrator logs (through `MlflowClient`, no global active run); workers never import
MLflow. `NullTracker` stands in when tracking is off, so the loop never asks "is MLflow on?".
Several orchestrators may share a study and a tracking store: creation races converge (the
earliest parent run wins) and SQLite's "database is locked" is retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from optuna.trial import FrozenTrial, TrialState

from ranksearch.answer.marks import config_label, run_name, trial_label
from ranksearch.answer.recommend import Answer
from ranksearch.config.paths import trial_dir
from ranksearch.search.storage import init_lock
from ranksearch.worker.spec import LOGGED_PER_STEP

if TYPE_CHECKING:
    from ranksearch.config.space import TrialConfig


from ranksearch.answer.recommend import count_states
from ranksearch.tracking.describe import dataset_inputs, study_params
from ranksearch.tracking.store import (
    ANSWER,
    ROLE,
    credentials_to_env,
    rebase_artifacts,
    retry,
    set_tag,
    study_parents,
    tracking_uri,
)
from ranksearch.tracking.sysmetrics import finish_watch, watch

_log = logging.getLogger(__name__)
# a pruned trial ended as the study planned: FINISHED, told apart by its `optuna.state` tag
STATUS = {
    TrialState.COMPLETE: "FINISHED",
    TrialState.PRUNED: "FINISHED",
    TrialState.FAIL: "FAILED",
}
FINAL_METRICS = (
    "trainable_params",
    "trainable_fraction",
    "wall_seconds",
    "peak_memory_mb",
    "pruned_at_step",
    "best_val_loss",
)


class Tracker(Protocol):
    """What the orchestrator logs a study through: `MlflowTracker`, or `NullTracker` when
    tracking is off. Two implementations, neither inheriting from the other; a test holds
    their signatures equal."""

    @property
    def uri(self) -> str | None: ...  # where the runs go; None when tracking is off

    def start_study(self, study, cfg, study_file: Path, data) -> None: ...
    def start_trial(self, trial_number: int, config: TrialConfig) -> str | None: ...
    def log_report(self, trial_number: int, record: dict[str, Any]) -> None: ...
    def end_trial(self, trial: FrozenTrial, run_id: str | None = None) -> None: ...
    def finish_study(self, study, ans: Answer) -> None: ...


class NullTracker:
    """Tracking off (`tracking: none` or `--no-mlflow`): every call does nothing."""

    uri: str | None = None

    def start_study(self, study, cfg, study_file: Path, data) -> None: ...
    def start_trial(self, trial_number: int, config: TrialConfig) -> str | None: ...
    def log_report(self, trial_number: int, record: dict[str, Any]) -> None: ...
    def end_trial(self, trial: FrozenTrial, run_id: str | None = None) -> None: ...
    def finish_study(self, study, ans: Answer) -> None: ...


class MlflowTracker:
    """One experiment and one parent run per study, one nested run per trial."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        log_adapters: str,
        study_dir: Path,
        register: str | None = None,
        overrides: tuple[str, ...] = (),
        system_metrics_seconds: float | None = None,
        publish: Callable[[MlflowTracker, Any, Answer], None] | None = None,
    ):
        from mlflow import MlflowClient

        self.uri = uri
        rebase_artifacts(uri, study_dir)  # the study may have been copied or moved
        self._client_uri = credentials_to_env(uri)
        with init_lock(uri):  # the store's schema is created or migrated on first use
            self.client = MlflowClient(tracking_uri=self._client_uri)
            self.client.search_experiments(max_results=1)
        self.experiment_name = experiment
        self.log_adapters = log_adapters
        self.register = register
        self.overrides = list(overrides)  # `--set`s: the logged model records its command
        self.study_dir = study_dir
        self.study_file: Path | None = None
        self.experiment_id = ""
        self.parent_id = ""
        self._runs: dict[int, str] = {}
        self.system_metrics_seconds = system_metrics_seconds
        self._monitors: dict[int, Any] = {}  # trial number -> its SystemMetricsMonitor
        self.fixed_params: dict[str, Any] = {}
        self.publish = publish  # logs the answer's model at the study's end; None: no model

    # -- the study ---------------------------------------------------------------------------

    def start_study(self, study, cfg, study_file: Path, data) -> None:
        self.study_name = study.study_name
        self.study_file = study_file
        keys = (
            "max_steps",
            "eval_every",
            "batch_size",
            "gradient_accumulation_steps",
            "warmup_ratio",
            "lr_scheduler",
            "weight_decay",
            "max_grad_norm",
            "seed",
            "mixed_precision",
            "gradient_checkpointing",
            "group_by_length",
        )
        self.fixed_params = {f"training.{k}": getattr(cfg.training, k) for k in keys}
        self.fixed_params["data.max_length"] = cfg.data.max_length
        self.experiment_id = self._experiment()
        self.parent_id = self._parent(study.study_name)
        retry(self.client.update_run, self.parent_id, status="RUNNING")
        study.set_user_attr("mlflow_parent_run_id", self.parent_id)
        self._close_stale_runs(study)
        run = self.client.get_run(self.parent_id)
        if "budget.n_trials" not in run.data.params:  # first start: describe the study once
            self._describe_study(cfg, study_file, data)

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        artifacts = (self.study_dir / "mlartifacts").resolve().as_uri()
        location = None if self.uri.startswith("http") else artifacts
        # a fine-tuning study: the UI opens its runs table, not the GenAI overview
        tags = {"mlflow.experimentKind": "custom_model_development"}
        try:
            return retry(self.client.create_experiment, self.experiment_name, location, tags)
        except Exception:  # noqa: BLE001 - another orchestrator created it first
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    def _parents(self, study_name: str) -> list:
        return study_parents(self.client, self.experiment_id, study_name)

    def _has_run(self, run_id: str, what: str) -> bool:
        """Whether this store holds `run_id`. Nodes that share an Optuna study but not a tracking
        server record run ids of their own stores in the study: those are skipped, with a
        warning, never looked up as this store's."""
        from mlflow.exceptions import MlflowException

        try:
            retry(self.client.get_run, run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            _log.warning(
                "%s: MLflow run %s is in another MLflow store (another node's); not updated here",
                what,
                run_id,
            )
            return False
        return True

    def _parent(self, study_name: str) -> str:
        """The study's parent run: re-attached if it exists; the earliest wins a creation race."""
        parents = self._parents(study_name)
        if parents:
            return parents[0].info.run_id
        mine = retry(
            self.client.create_run,
            self.experiment_id,
            run_name=study_name,
            tags={ROLE: "study", "optuna.study_name": study_name},
        )
        winner = self._parents(study_name)[0].info.run_id
        if winner != mine.info.run_id:
            retry(self.client.delete_run, mine.info.run_id)
        return winner

    def _describe_study(self, cfg, study_file: Path, data) -> None:
        from mlflow.entities import Param

        params = study_params(cfg, study_file)
        try:
            retry(
                self.client.log_batch,
                self.parent_id,
                params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            )
        except Exception:  # noqa: BLE001 - the store's duplicate-key error, whatever its type
            if "budget.n_trials" in self.client.get_run(self.parent_id).data.params:
                return  # another orchestrator described the study at the same moment
            raise
        retry(self.client.log_artifact, self.parent_id, str(study_file))
        try:
            retry(self.client.log_inputs, self.parent_id, dataset_inputs(cfg, data))
        except Exception as e:  # noqa: BLE001 - the inputs are a description, never fatal
            # a server retrying a slow request, or another orchestrator, inserted them first
            _log.warning("dataset inputs not logged to MLflow: %s", e)

    def _close_stale_runs(self, study) -> None:
        """Trial runs left RUNNING by a killed orchestrator: close them with the trial's state."""
        stale = retry(
            self.client.search_runs,
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{self.parent_id}' and attributes.status = 'RUNNING'",
        )
        for run in stale:
            number = int(run.data.tags.get("optuna.trial_number", -1))
            trials = study.get_trials(deepcopy=False)
            if 0 <= number < len(trials) and trials[number].state != TrialState.RUNNING:
                self.end_trial(trials[number], run.info.run_id)

    # -- trials ------------------------------------------------------------------------------

    def start_trial(self, trial_number: int, config: TrialConfig) -> str | None:
        from mlflow.entities import Param

        existing = retry(
            self.client.search_runs,
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{self.parent_id}' and "
            f"tags.`optuna.trial_number` = '{trial_number}'",
        )
        if existing:
            run_id = existing[0].info.run_id
        else:
            run = retry(
                self.client.create_run,
                self.experiment_id,
                run_name=config_label(trial_number, config),  # `#9 r8 qv lr 1.5e-3`
                tags={
                    "mlflow.parentRunId": self.parent_id,
                    ROLE: "trial",
                    "optuna.trial_number": str(trial_number),
                    "optuna.study_name": self.study_name,
                },
            )
            run_id = run.info.run_id
            modules = config.modules
            shown = modules if isinstance(modules, str) else ",".join(modules)
            params = {
                **config.shown(),
                "target_modules": f"{config.target_modules} ({shown})",
                **self.fixed_params,
            }
            retry(
                self.client.log_batch, run_id, params=[Param(k, str(v)) for k, v in params.items()]
            )
        self._runs[trial_number] = run_id
        if self.system_metrics_seconds:
            self._monitors[trial_number] = watch(
                run_id, self.system_metrics_seconds, self._client_uri, resume=bool(existing)
            )
        return run_id

    def log_report(self, trial_number: int, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(record.get("time", time.time()) * 1000)
        step = int(record["step"])
        metrics = [Metric(k, float(record[k]), now, step) for k in LOGGED_PER_STEP if k in record]
        for rank, per_rank in record.get("ranks", {}).items():  # a nested trial: every rank
            metrics += [
                Metric(f"{k}_r{rank}", float(per_rank[k]), now, step)
                for k in LOGGED_PER_STEP
                if k in per_rank
            ]
        retry(self.client.log_batch, self._runs[trial_number], metrics=metrics)

    def end_trial(self, trial: FrozenTrial, run_id: str | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        started_here = self._runs.pop(trial.number, None)
        monitor = self._monitors.pop(trial.number, None)
        if monitor is not None:
            finish_watch(monitor)
        run_id = run_id or started_here
        if run_id is None:
            return
        if run_id != started_here and not self._has_run(run_id, f"trial {trial.number}"):
            return
        a, now = trial.user_attrs, int(time.time() * 1000)
        metrics = [Metric(k, float(a[k]), now, 0) for k in FINAL_METRICS if a.get(k) is not None]
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            # complete trials only: sorting by it never mixes in a pruned trial's partial loss
            metrics.append(Metric("final_val_loss", float(trial.value), now, 0))
        tags = [RunTag("optuna.state", trial.state.name)]
        for key in ("fail_reason", "duplicate_of", "note", "confirmation", "confirm_of", "seed"):
            if key in a:
                tags.append(RunTag(key, str(a[key])[-5000:]))
        retry(self.client.log_batch, run_id, metrics=metrics, tags=tags)
        if self.log_adapters == "all" and trial.state == TrialState.COMPLETE:
            self._log_adapter(trial, run_id)
        retry(self.client.set_terminated, run_id, STATUS.get(trial.state, "FAILED"))

    def finish_study(self, study, ans: Answer) -> None:
        """Close the parent run with the study's counts and its answer: `best_trial` and
        `recommended_trial` as tags and metrics on the parent, `ranksearch.answer` on those
        trials' runs (moved when a resumed study changes its answer), and their adapters."""
        from mlflow.entities import Metric, RunTag

        trials = study.get_trials(deepcopy=False)
        counts = count_states(trials)
        now, step = int(time.time() * 1000), counts["complete"]
        metrics = [
            Metric(f"n_{k}", v, now, 0)
            for k, v in counts.items()
            if k in ("complete", "pruned", "fail", "confirmation")
        ]
        tags = []
        for role, trial in (("best", ans.best), ("recommended", ans.recommended)):
            if trial is None:
                continue
            metrics += [
                Metric(f"{role}_val_loss", trial.value, now, step),
                Metric(f"{role}_trial", trial.number, now, step),
            ]
            tags.append(RunTag(f"{role}_trial", str(trial.number)))
        if ans.tolerance is not None:
            metrics.append(Metric("tolerance", ans.tolerance, now, step))
            tags.append(RunTag("tolerance_rule", ans.tolerance_rule))
        retry(self.client.log_batch, self.parent_id, metrics=metrics, tags=tags)
        self._mark_answer(ans, trials)
        if self.publish is not None:
            self.publish(self, study, ans)  # the answer's MLflow model (answer/publish.py)
        retry(self.client.set_terminated, self.parent_id, "FINISHED")

    def _mark_answer(self, ans: Answer, trials: list[FrozenTrial]) -> None:
        """Tag and name the best and recommended trials' runs (`ranksearch.answer`; `★ best
        #9 r8 qv lr 1e-3`) and keep their adapters as `tracking.log_adapters` asks; tag and
        marks leave runs no longer in the answer."""
        roles: dict[int, list[str]] = {}
        for role, trial in (("best", ans.best), ("recommended", ans.recommended)):
            if trial is not None:
                roles.setdefault(trial.number, []).append(role)
        tagged = retry(
            self.client.search_runs,
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.`{ANSWER}` LIKE '%'",
        )
        for run in tagged:
            number = int(run.data.tags.get("optuna.trial_number", -1))
            if number not in roles:
                retry(self.client.delete_tag, run.info.run_id, ANSWER)
                if 0 <= number < len(trials):
                    name = trial_label(trials[number])
                    retry(self.client.update_run, run.info.run_id, name=name)
        keep = {"answer": {"best", "recommended"}, "best": {"best"}}.get(self.log_adapters, set())
        for trial in {t.number: t for t in (ans.best, ans.recommended) if t}.values():
            run_id = trial.user_attrs.get("mlflow_run_id")
            if not run_id or not self._has_run(run_id, f"trial {trial.number} of the answer"):
                continue
            set_tag(self.client, run_id, ANSWER, ",".join(roles[trial.number]))
            name = run_name(trial_label(trial), roles[trial.number])
            retry(self.client.update_run, run_id, name=name)
            if keep & set(roles[trial.number]):
                self._log_adapter(trial, run_id)

    def _log_adapter(self, trial: FrozenTrial, run_id: str) -> None:
        adapter = trial_dir(self.study_dir, trial) / "adapter"
        if adapter.is_dir() and not retry(self.client.list_artifacts, run_id, "adapter"):
            retry(self.client.log_artifacts, run_id, str(adapter), "adapter")


def make_tracker(
    cfg,
    study_dir: Path,
    uri_option: str | None,
    disabled: bool,
    overrides: list[str] = (),
    publish: Callable[[MlflowTracker, Any, Answer], None] | None = None,
) -> Tracker:
    """CLI option > study file > MLFLOW_TRACKING_URI > SQLite in the study directory."""
    t = cfg.tracking
    if disabled or not t.enabled:
        return NullTracker()
    return MlflowTracker(
        tracking_uri(cfg, study_dir, uri_option),
        t.experiment or cfg.study_name,
        t.log_adapters,
        study_dir,
        t.registered_model,
        tuple(overrides),
        t.system_metrics_seconds,
        publish,
    )
