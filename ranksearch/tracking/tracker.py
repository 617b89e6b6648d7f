"""MLflow: one experiment and one parent run per study, one nested run per trial.

Only the orchestrator logs (through `MlflowClient`, no global active run); workers never import
MLflow. `NullTracker` stands in when tracking is off, so the loop never asks "is MLflow on?".
Several orchestrators may share a study and a tracking store: creation races converge (the
earliest parent run wins) and SQLite's "database is locked" is retried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from optuna.trial import FrozenTrial, TrialState

from ranksearch.answer.recommend import Answer
from ranksearch.config.paths import redact_url, trial_dir
from ranksearch.search.storage import init_lock
from ranksearch.worker.spec import LOGGED_PER_STEP

if TYPE_CHECKING:
    from ranksearch.config.space import TrialConfig

T = TypeVar("T")
_log = logging.getLogger(__name__)
ROLE = "ranksearch.role"
ANSWER = "ranksearch.answer"  # on the best and recommended trials' runs: best, recommended
# on the parent run: the logged model of the recommendation, its trial, its registered version
MODEL_URI, MODEL_TRIAL, MODEL_VERSION = (
    "ranksearch.model_uri",
    "ranksearch.model_trial",
    "ranksearch.registered_model",
)
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


class TrackingError(Exception):
    """The tracking store (or the UI on it) cannot be used: `key` is the setting or option to
    change ("" when none is at fault), `message` what is wrong and the fix."""

    def __init__(self, message: str, key: str = "tracking.uri"):
        self.key, self.message = key, message
        super().__init__(f"`{key}` {message}" if key else message)


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{study_dir.resolve() / 'mlflow.db'}"


# where MLflow's SQLite store records artifact locations (absolute file:// URIs)
ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),  # registered versions of the logged models
)


def rebase_artifacts(uri: str, study_dir: Path) -> None:
    """Point the default store's artifact locations at `<study dir>/mlartifacts` where the study
    is now. MLflow records them as absolute URIs and offers no call to change them, so a copied
    or moved study would read and write its artifacts in the old place; every command that opens
    the default store rebases it first (a no-op once it points here). Other stores: untouched."""
    import sqlite3

    db = study_dir / "mlflow.db"
    if uri != default_tracking_uri(study_dir) or not db.is_file():
        return
    root = (study_dir / "mlartifacts").resolve().as_uri()
    with init_lock(uri), contextlib.closing(sqlite3.connect(db, timeout=60)) as conn, conn:
        try:
            rows = conn.execute("SELECT DISTINCT artifact_location FROM experiments").fetchall()
        except sqlite3.OperationalError:  # the schema is not created yet
            return
        for (old,) in rows:
            if not old.endswith("/mlartifacts") or old == root:
                continue  # MLflow's own Default experiment, or already here
            for table, column in ARTIFACT_COLUMNS:
                with contextlib.suppress(sqlite3.OperationalError):  # a table of another version
                    conn.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE substr({column}, 1, ?) = ?",
                        (root, len(old) + 1, len(old), old),
                    )


def check_tracking(uri: str) -> None:
    """Reach the tracking store once, before any trial starts."""
    shown = redact_url(uri)
    if uri.startswith(("http://", "https://")):
        import http.client
        import urllib.request

        try:
            with urllib.request.urlopen(_health_request(uri), timeout=5) as r:
                if r.status == 200:
                    return
        except (ValueError, http.client.InvalidURL) as e:  # a malformed host or port
            raise TrackingError(
                f"{shown}: not a valid URL ({str(e).replace(uri, shown)[:120]}); "
                "use http://host:port, e.g. http://127.0.0.1:5000"
            ) from None
        except OSError as e:
            raise TrackingError(
                f"{shown}: MLflow server not reachable ({e}); start it "
                "(mlflow server --host 127.0.0.1 --port 5000) or use `--no-mlflow`"
            ) from None
        raise TrackingError(f"{shown}: /health did not answer 200")
    if "://" not in uri:
        raise TrackingError(f"{shown}: expected sqlite:///..., a database URL or http://host:port")
    from ranksearch.search.storage import StorageError, check_storage

    try:
        check_storage(uri)
    except StorageError as e:
        raise TrackingError(e.message) from None  # the same store problem, another setting


def _health_request(uri: str):
    """GET <server>/health, with the URL's user:password (if any) as basic auth, not in the URL."""
    import base64
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    url = urlunsplit(parts._replace(netloc=host)).rstrip("/") + "/health"
    request = urllib.request.Request(url)
    if parts.username:
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _credentials_to_env(uri: str) -> str:
    """Move `user:password@` out of an http URI into MLflow's own variables, so that nothing
    MLflow prints or stores carries the password; return the URI without them."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not uri.startswith(("http://", "https://")) or parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = parts.username
    os.environ["MLFLOW_TRACKING_PASSWORD"] = parts.password or ""
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _finish_watch(monitor) -> None:
    """Stop a trial's SystemMetricsMonitor and log what it sampled, before the run closes. MLflow's
    loop drops the samples of its last, unfinished interval, so a trial shorter than
    `tracking.system_metrics_seconds` (a warm worker's takes under a second) would get none."""
    monitor.finish()
    monitor.collect_metrics()  # the trial's end: psutil measures CPU since the sample before
    if leftover := monitor.aggregate_metrics():
        monitor.publish_metrics(leftover)
        monitor.mlflow_logger.flush()


def _retry(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call an MLflow client method, waiting out SQLite write locks held by other processes."""
    delay = 0.05
    for attempt in range(12):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - MlflowException and sqlalchemy errors
            if "locked" not in str(e) or attempt == 11:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


def _set_tag(client, run_id: str, key: str, value: str) -> None:
    """set_tag where another orchestrator of the study may set the same tag at the same moment:
    the store then refuses the second insert (a UNIQUE constraint); set again, it updates."""
    try:
        _retry(client.set_tag, run_id, key, value)
    except Exception as e:  # noqa: BLE001 - the store's integrity error, whatever its type
        if "unique constraint" not in str(e).lower():
            raise
        _retry(client.set_tag, run_id, key, value)


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
    ):
        from mlflow import MlflowClient

        self.uri = uri
        rebase_artifacts(uri, study_dir)  # the study may have been copied or moved
        self._client_uri = _credentials_to_env(uri)
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
        _retry(self.client.update_run, self.parent_id, status="RUNNING")
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
            return _retry(self.client.create_experiment, self.experiment_name, location, tags)
        except Exception:  # noqa: BLE001 - another orchestrator created it first
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    def _parents(self, study_name: str) -> list:
        return _study_parents(self.client, self.experiment_id, study_name)

    def _has_run(self, run_id: str, what: str) -> bool:
        """Whether this store holds `run_id`. Nodes that share an Optuna study but not a tracking
        server record run ids of their own stores in the study: those are skipped, with a
        warning, never looked up as this store's."""
        from mlflow.exceptions import MlflowException

        try:
            _retry(self.client.get_run, run_id)
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
        mine = _retry(
            self.client.create_run,
            self.experiment_id,
            run_name=study_name,
            tags={ROLE: "study", "optuna.study_name": study_name},
        )
        winner = self._parents(study_name)[0].info.run_id
        if winner != mine.info.run_id:
            _retry(self.client.delete_run, mine.info.run_id)
        return winner

    def _describe_study(self, cfg, study_file: Path, data) -> None:
        from mlflow.entities import Param

        from ranksearch.search.sampling import min_steps

        params = {
            "study_file": study_file.name,
            "task": cfg.task,
            "model": cfg.model.path,
            "search_space": json.dumps(cfg.search.model_dump(mode="json"), sort_keys=True),
            "budget.n_trials": cfg.budget.n_trials,
            "sampler": cfg.sampler.type,
            "sampler.seed": cfg.sampler.seed,
            "pruner": cfg.pruner.type,
            "pruner.min_steps": min_steps(cfg),  # the first rung, derived when not set
            "pruner.reduction_factor": cfg.pruner.reduction_factor,
            "training.max_steps": cfg.training.max_steps,
            "training.eval_every": cfg.training.eval_every,
            "launch.num_processes": cfg.launch.num_processes,
            "launch.gpus_per_trial": cfg.launch.gpus_per_trial,
            "launch.parallel_trials": cfg.launch.parallel_trials or "auto",
        }
        try:
            _retry(
                self.client.log_batch,
                self.parent_id,
                params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            )
        except Exception:  # noqa: BLE001 - the store's duplicate-key error, whatever its type
            if "budget.n_trials" in self.client.get_run(self.parent_id).data.params:
                return  # another orchestrator described the study at the same moment
            raise
        _retry(self.client.log_artifact, self.parent_id, str(study_file))
        try:
            self._log_dataset(cfg, data)
        except Exception as e:  # noqa: BLE001 - the inputs are a description, never fatal
            # a server retrying a slow request, or another orchestrator, inserted them first
            _log.warning("dataset inputs not logged to MLflow: %s", e)

    def _log_dataset(self, cfg, data) -> None:
        import mlflow.data
        from datasets import load_from_disk
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for split in ("train", "validation"):
            ds = load_from_disk(str(data.path / split))
            with warnings.catch_warnings():
                # its schema hint about integer columns (token ids, labels), printed when the
                # entity infers the schema, is for model signatures: nothing a user can act on
                warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
                dataset = mlflow.data.from_huggingface(
                    ds, name=f"{cfg.study_name}-{split}", **_dataset_source(cfg, split)
                )
                entity = dataset._to_mlflow_entity()
            tags = [InputTag("mlflow.data.context", split)]
            inputs.append(DatasetInput(entity, tags))
        _retry(self.client.log_inputs, self.parent_id, inputs)

    def _close_stale_runs(self, study) -> None:
        """Trial runs left RUNNING by a killed orchestrator: close them with the trial's state."""
        stale = _retry(
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

        existing = _retry(
            self.client.search_runs,
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{self.parent_id}' and "
            f"tags.`optuna.trial_number` = '{trial_number}'",
        )
        if existing:
            run_id = existing[0].info.run_id
        else:
            run = _retry(
                self.client.create_run,
                self.experiment_id,
                run_name=f"trial-{trial_number}",
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
            _retry(
                self.client.log_batch, run_id, params=[Param(k, str(v)) for k, v in params.items()]
            )
        self._runs[trial_number] = run_id
        self._watch(trial_number, run_id, resume=bool(existing))
        return run_id

    def _watch(self, trial_number: int, run_id: str, resume: bool) -> None:
        """MLflow's system metrics on the trial's run while it trains (`system/cpu_...`,
        `system/system_memory_usage_megabytes`, disk, network, and `system/gpu_...` where
        nvidia-ml-py finds a GPU): the whole machine's, every `tracking.system_metrics_seconds`."""
        if not self.system_metrics_seconds:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=self.system_metrics_seconds,
            resume_logging=resume,  # a re-attached run continues its steps
            tracking_uri=self._client_uri,
        )
        monitor.start()
        self._monitors[trial_number] = monitor

    def log_report(self, trial_number: int, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(record.get("time", time.time()) * 1000)
        metrics = [
            Metric(k, float(record[k]), now, int(record["step"]))
            for k in LOGGED_PER_STEP
            if k in record
        ]
        _retry(self.client.log_batch, self._runs[trial_number], metrics=metrics)

    def end_trial(self, trial: FrozenTrial, run_id: str | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        started_here = self._runs.pop(trial.number, None)
        monitor = self._monitors.pop(trial.number, None)
        if monitor is not None:
            _finish_watch(monitor)
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
        _retry(self.client.log_batch, run_id, metrics=metrics, tags=tags)
        if self.log_adapters == "all" and trial.state == TrialState.COMPLETE:
            self._log_adapter(trial, run_id)
        _retry(self.client.set_terminated, run_id, STATUS.get(trial.state, "FAILED"))

    def finish_study(self, study, ans: Answer) -> None:
        """Close the parent run with the study's counts and its answer: `best_trial` and
        `recommended_trial` as tags and metrics on the parent, `ranksearch.answer` on those
        trials' runs (moved when a resumed study changes its answer), and their adapters."""
        from mlflow.entities import Metric, RunTag

        from ranksearch.answer.recommend import count_states

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
        confirmed = _confirmed_trial(trials)
        if confirmed is not None:
            tags.append(RunTag("confirmed_recommended_trial", str(confirmed)))
        _retry(self.client.log_batch, self.parent_id, metrics=metrics, tags=tags)
        self._mark_answer(ans)
        if ans.recommended is not None and self.log_adapters != "none":
            chosen = trials[confirmed] if confirmed is not None else ans.recommended
            try:
                self._log_model(study, chosen)
            except Exception as e:  # noqa: BLE001 - the study's results stand without it
                _log.warning("the recommended model was not logged to MLflow: %s", e)
        _retry(self.client.set_terminated, self.parent_id, "FINISHED")

    def _log_model(self, study, trial: FrozenTrial) -> None:
        """The recommendation's adapter, as `ranksearch export` writes it, logged as the MLflow
        model `recommended` of the parent run (mlmodel.py) and registered as `tracking.register`
        names it; logged again only when the recommendation changes (resume, confirm)."""
        import tempfile

        from ranksearch.answer.export import export
        from ranksearch.answer.mlmodel import log_adapter_model

        parent = _retry(self.client.get_run, self.parent_id)
        if parent.data.tags.get(MODEL_TRIAL) == str(trial.number) or self.study_file is None:
            return
        if not (trial_dir(self.study_dir, trial) / "adapter" / "adapter_config.json").is_file():
            _log.warning("trial %s kept no adapter: no MLflow model logged", trial.number)
            return
        with tempfile.TemporaryDirectory(prefix="ranksearch-model-") as tmp:
            folder = Path(tmp) / "adapter"  # the name MLflow gives it in the model
            export(study, trial, folder, self.study_file, self.overrides, self.study_dir)
            with _global_uri(self._client_uri):
                info = log_adapter_model(self.client, self.parent_id, folder, self.register)
        tags = {MODEL_TRIAL: str(trial.number), MODEL_URI: info.model_uri}
        if info.registered_model_version is not None:
            tags[MODEL_VERSION] = f"models:/{self.register}/{info.registered_model_version}"
        for key, value in tags.items():
            _set_tag(self.client, self.parent_id, key, value)

    def _mark_answer(self, ans: Answer) -> None:
        """Tag the best and recommended trials' runs (`ranksearch.answer`) and keep their
        adapters as `tracking.log_adapters` asks; the tag leaves runs no longer in the answer."""
        roles: dict[int, list[str]] = {}
        for role, trial in (("best", ans.best), ("recommended", ans.recommended)):
            if trial is not None:
                roles.setdefault(trial.number, []).append(role)
        tagged = _retry(
            self.client.search_runs,
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.`{ANSWER}` LIKE '%'",
        )
        for run in tagged:
            if int(run.data.tags.get("optuna.trial_number", -1)) not in roles:
                _retry(self.client.delete_tag, run.info.run_id, ANSWER)
        keep = {"answer": {"best", "recommended"}, "best": {"best"}}.get(self.log_adapters, set())
        for trial in {t.number: t for t in (ans.best, ans.recommended) if t}.values():
            run_id = trial.user_attrs.get("mlflow_run_id")
            if not run_id or not self._has_run(run_id, f"trial {trial.number} of the answer"):
                continue
            _set_tag(self.client, run_id, ANSWER, ",".join(roles[trial.number]))
            if keep & set(roles[trial.number]):
                self._log_adapter(trial, run_id)

    def _log_adapter(self, trial: FrozenTrial, run_id: str) -> None:
        adapter = trial_dir(self.study_dir, trial) / "adapter"
        if adapter.is_dir() and not _retry(self.client.list_artifacts, run_id, "adapter"):
            _retry(self.client.log_artifacts, run_id, str(adapter), "adapter")


def _dataset_source(cfg, split: str) -> dict[str, Any]:
    """Where a split came from, for MLflow: a local file (a `package://` path resolved) as its
    file:// URI, a hub dataset by its id. The validation split is `data.validation` when that is
    a file, else it came from `data.source`."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    from ranksearch.config.paths import local_path

    path = local_path(cfg.data.source)
    if split == "validation" and cfg.data.validation:  # a file, or a hub dataset's split
        path = local_path(cfg.data.validation) or path
    if path is None:
        return {"path": cfg.data.source}  # a hub dataset: MLflow links to it
    with warnings.catch_warnings():  # MLflow registers its local-file source twice
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        return {"source": resolve_dataset_source(path.resolve().as_uri())}


@contextlib.contextmanager
def _global_uri(uri: str):
    """MLflow logs models through its global tracking URI (and exports it to the environment,
    for subprocesses): set for the call, then put back as it was."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _confirmed_trial(trials: list[FrozenTrial]) -> int | None:
    """The confirmation round's recommendation (confirm.analyse), once a round ran."""
    if not any(t.user_attrs.get("confirmation") for t in trials):
        return None
    from ranksearch.answer.confirm import analyse

    return analyse(trials)["recommended"]


def _study_parents(client, experiment_id: str, study_name: str) -> list:
    """The study's parent runs in one store, earliest first (the earliest is the one used)."""
    runs = _retry(
        client.search_runs,
        [experiment_id],
        f"tags.`{ROLE}` = 'study' and tags.`optuna.study_name` = '{study_name}'",
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def log_report(uri: str, experiment: str, study_name: str, study_dir: Path) -> bool:
    """Attach what `ranksearch report` wrote (`report.html`, the `plots/` folder) to the study's
    parent run in the store at `uri`; False, with a warning, where that store has none (the
    study ran on other nodes). A default store in `study_dir` is rebased first."""
    from mlflow import MlflowClient

    rebase_artifacts(uri, study_dir)

    client = MlflowClient(tracking_uri=_credentials_to_env(uri))
    found = client.get_experiment_by_name(experiment)
    parents = _study_parents(client, found.experiment_id, study_name) if found else []
    if not parents:
        _log.warning("no MLflow parent run of study %s in %s: report not logged", study_name, uri)
        return False
    run_id = parents[0].info.run_id
    if (study_dir / "plots").is_dir():
        _retry(client.log_artifacts, run_id, str(study_dir / "plots"), "plots")
    _retry(client.log_artifact, run_id, str(study_dir / "report.html"))
    return True


def make_tracker(
    cfg, study_dir: Path, uri_option: str | None, disabled: bool, overrides: list[str] = ()
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
    )


def tracking_uri(cfg, study_dir: Path, uri_option: str | None) -> str:
    return (
        uri_option
        or cfg.tracking.uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(study_dir)
    )
