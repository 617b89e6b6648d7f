"""The answer, published where MLflow users look: the recommended trial's adapter as the parent
run's MLflow model (registered when `tracking.register` names it), the confirmation round's
pick as a tag, and `ranksearch report`'s page and plots as the parent's artifacts."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from ranksearch.answer.confirm import analyse
from ranksearch.answer.export import export
from ranksearch.answer.figures import figures
from ranksearch.answer.htmlreport import write_html
from ranksearch.answer.mlmodel import log_adapter_model
from ranksearch.answer.modelcard import model_card
from ranksearch.answer.plots import make_plots
from ranksearch.answer.recommend import Answer, candidate_id
from ranksearch.config.paths import trial_dir
from ranksearch.config.schema import StudyConfig
from ranksearch.tracking.store import (
    MODEL_TRIAL,
    MODEL_URI,
    MODEL_VERSION,
    credentials_to_env,
    global_uri,
    rebase_artifacts,
    retry,
    set_tag,
    study_parents,
    tracking_uri,
)
from ranksearch.tracking.tracker import MlflowTracker

_log = logging.getLogger(__name__)


def publish_answer(tracker: MlflowTracker, study, ans: Answer) -> None:
    """At a study's end: tag the confirmation round's pick on the parent run, and log the
    recommendation (the confirmed one once a round ran) as the MLflow model `recommended`."""
    trials = study.get_trials(deepcopy=False)
    confirmed = _confirmed_trial(trials)
    if confirmed is not None:
        set_tag(tracker.client, tracker.parent_id, "confirmed_recommended_trial", str(confirmed))
    if ans.recommended is None or tracker.log_adapters == "none":
        return
    chosen = trials[confirmed] if confirmed is not None else ans.recommended
    try:
        log_model(tracker, study, chosen, ans)
    except Exception as e:  # noqa: BLE001 - the study's results stand without it
        _log.warning("the recommended model was not logged to MLflow: %s", e)


def log_model(tracker: MlflowTracker, study, trial: FrozenTrial, ans: Answer | None) -> None:
    """The recommendation's adapter, as `ranksearch export` writes it, logged as the MLflow
    model `recommended` of the parent run (mlmodel.py) and registered as `tracking.register`
    names it; logged again only when the recommendation changes (resume, confirm)."""
    parent = retry(tracker.client.get_run, tracker.parent_id)
    which = str(candidate_id(trial))  # `3`, or `3@r8` for a rank of a nested trial
    if parent.data.tags.get(MODEL_TRIAL) == which or tracker.study_file is None:
        return
    if not (trial_dir(tracker.study_dir, trial) / "adapter" / "adapter_config.json").is_file():
        _log.warning("trial %s kept no adapter: no MLflow model logged", trial.number)
        return
    with tempfile.TemporaryDirectory(prefix="ranksearch-model-") as tmp:
        folder = Path(tmp) / "adapter"  # the name MLflow gives it in the model
        export(study, trial, folder, tracker.study_file, tracker.overrides, tracker.study_dir)
        card = model_card(tracker.client, tracker.parent_id, trial, ans)
        with global_uri(tracker._client_uri):
            info = log_adapter_model(
                tracker.client, tracker.parent_id, folder, card, tracker.register
            )
    tags = {MODEL_TRIAL: which, MODEL_URI: info.model_uri}
    if info.registered_model_version is not None:
        tags[MODEL_VERSION] = f"models:/{tracker.register}/{info.registered_model_version}"
    for key, value in tags.items():
        set_tag(tracker.client, tracker.parent_id, key, value)


def _confirmed_trial(trials: list[FrozenTrial]) -> int | None:
    """The confirmation round's recommendation (confirm.analyse), once a round ran."""
    if not any(t.user_attrs.get("confirmation") for t in trials):
        return None
    return analyse(trials)["recommended"]


def log_report(uri: str, experiment: str, study_name: str, study_dir: Path) -> bool:
    """Attach what `ranksearch report` wrote (`report.html`, the PNGs in `plots/`) to the
    study's parent run in the store at `uri`; False, with a warning, where that store has none
    (the study ran on other nodes). A default store in `study_dir` is rebased first."""
    from mlflow import MlflowClient

    rebase_artifacts(uri, study_dir)

    client = MlflowClient(tracking_uri=credentials_to_env(uri))
    found = client.get_experiment_by_name(experiment)
    parents = study_parents(client, found.experiment_id, study_name) if found else []
    if not parents:
        _log.warning("no MLflow parent run of study %s in %s: report not logged", study_name, uri)
        return False
    run_id = parents[0].info.run_id
    files = sorted((study_dir / "plots").glob("*.png")) + [study_dir / "report.html"]
    for path in files:
        folder = path.parent.relative_to(study_dir).as_posix()
        retry(client.log_artifact, run_id, str(path), None if folder == "." else folder)
    _link_to_logged(parents[0].info.artifact_uri, study_dir, files)
    return True


def _link_to_logged(artifact_uri: str, study_dir: Path, files: list[Path]) -> None:
    """The default store keeps its artifacts inside the study directory (`mlartifacts`), so
    each page and plot just logged would be there twice: make the study's own file a hard link
    to the logged copy, one set of bytes under two names. A store elsewhere, or a file system
    without hard links, keeps its own copy."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(artifact_uri)
    root = Path(unquote(parts.path)) if parts.scheme in ("file", "") else None
    if root is None or not root.resolve().is_relative_to(study_dir.resolve()):
        return
    for path in files:
        logged = root / path.relative_to(study_dir)
        link = path.with_name(path.name + ".link")
        try:
            link.unlink(missing_ok=True)
            os.link(logged, link)
            os.replace(link, path)
        except OSError:
            link.unlink(missing_ok=True)


def write_report(
    cfg: StudyConfig,
    study: optuna.Study,
    report: dict,
    out: Path,
    plots: bool = True,
    uri_option: str | None = None,
) -> tuple[Path | None, bool]:
    """The plots into <out>/plots (listed in `report`) and the page <out>/report.html, both onto
    the study's MLflow parent run when it has one; the page, and whether MLflow has it too.

    Without `plots` nothing is written (the page is None): a page without its plots would
    replace the last full one, on disk and on the parent run, and sit beside plots of another
    time. `--no-plots` asks for less work; it must not destroy what an earlier report made."""
    if not plots:
        return None, False
    tolerance = cfg.report.tolerance
    figs = figures(study, tolerance)
    report["plots"] = [str(p) for p in make_plots(study, out / "plots", tolerance)]
    pngs = [Path(p) for p in report["plots"]]
    page = write_html(report, figs, pngs, out / "report.html")
    tracked = "mlflow_parent_run_id" in study.user_attrs  # by this node or another one
    if not (tracked and cfg.tracking.enabled):
        return page, False
    uri = tracking_uri(cfg, out, uri_option)
    experiment = cfg.tracking.experiment or cfg.study_name
    return page, log_report(uri, experiment, cfg.study_name, out)
