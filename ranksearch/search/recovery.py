"""Trials whose orchestrator was lost (a dead pid, a stale heartbeat), and the requeue rule:
which stopped configurations run again, and in what order the next trial is taken."""

from __future__ import annotations

import os
import socket
import time

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ranksearch.config.schema import StudyConfig
from ranksearch.search.storage import trials_without_heartbeat
from ranksearch.tracking.tracker import Tracker


def fail_lost(study: optuna.Study, cfg: StudyConfig, tracker: Tracker, view) -> list[int]:
    """Fail the RUNNING trials whose orchestrator is gone: a dead pid on this host, or no
    heartbeat for `launch.stale_after_seconds` (any host). Each is failed once (whichever
    process gets there first), its tracked run closed, and its configuration queued again.
    Returns the numbers of the trials this call failed."""
    storage, failed = study._storage, []
    for trial_id, reason in _lost_trials(study, cfg).items():
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another process failed it first
            continue
        frozen = storage.get_trial(trial_id)
        tracker.end_trial(frozen, frozen.user_attrs.get("mlflow_run_id"))
        view.message(f"trial {frozen.number}: {reason} -> FAIL")
        requeue_lost(study, cfg, frozen, view)
        failed.append(frozen.number)
    return failed


def requeue_lost(study: optuna.Study, cfg: StudyConfig, trial: FrozenTrial, view) -> None:
    """Queue a lost trial's configuration again (orchestrator gone, worker hung), and say so."""
    if requeue(study, cfg, trial, lost=True):
        view.message(f"trial {trial.number}: configuration queued again")


def _lost_trials(study: optuna.Study, cfg: StudyConfig) -> dict[int, str]:
    """Trial id -> why its orchestrator counts as gone."""
    host, lost, stale = worker_host(), {}, cfg.launch.stale_after_seconds
    never_beat = trials_without_heartbeat(study._storage, study._study_id)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("orchestrator_pid")
        # a trial asked, then lost before its worker ran, has no heartbeat to go stale: its age
        age = time.time() - t.datetime_start.timestamp() if t.datetime_start else 0.0
        if t.user_attrs.get("host") == host and pid and not _pid_alive(pid):
            lost[t._trial_id] = "orchestrator died while it ran (killed or crashed)"
        elif t._trial_id in never_beat and age > stale:
            lost[t._trial_id] = (
                f"no heartbeat in the {age:.0f} s since it started: its orchestrator or "
                "machine was lost before its worker ran"
            )
    for trial_id in study._storage._get_stale_trial_ids(study._study_id):
        lost.setdefault(
            trial_id, f"no heartbeat for {stale:g} s: its orchestrator or machine was lost"
        )
    return lost


def ask_retry_first(study: optuna.Study) -> optuna.Trial:
    """The next trial: a configuration queued again (interrupted or lost) before everything else,
    then the study's queue (`enqueue:` baselines), then the sampler.

    Optuna pops its queue oldest first, which would run the baselines enqueued when the study
    was created before a retry enqueued later. The retry is popped as Optuna pops its queue:
    WAITING -> RUNNING, which only one process wins."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if "retry_of" not in t.user_attrs:
            continue
        try:
            if study._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                return optuna.Trial(study, t._trial_id)
        except UpdateFinishedTrialError:  # another process popped and finished it
            continue
    return study.ask()


def requeue(study: optuna.Study, cfg: StudyConfig, trial: FrozenTrial, lost: bool = False) -> bool:
    """Queue a stopped trial's configuration again; whether it was queued.

    Not for a grid (it revisits unfinished points by itself, and GridSampler rejects enqueued
    trials) nor a confirmation run or a nested estimate's plain check (`run` and `confirm` plan
    them again). A lost trial is queued at most `budget.retry_failed` times; an interrupted one
    always.
    """
    retries = trial.user_attrs.get("retries", 0)
    a = trial.user_attrs
    if cfg.sampler.type == "grid" or a.get("confirmation") or "rank_check_of" in a:
        return False
    if lost and retries >= cfg.budget.retry_failed:
        return False
    attrs = {"retry_of": trial.number, **({"retries": retries + 1} if lost else {})}
    study.enqueue_trial(trial.params, user_attrs=attrs)
    return True


def worker_host() -> str:
    """The name this process records on its trials: `RANKSEARCH_HOST`, else the hostname.

    Set it where hostnames are not unique or not telling (containers, pods)."""
    return os.environ.get("RANKSEARCH_HOST") or socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
