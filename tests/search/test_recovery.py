"""The search loop's recovery paths on a real SQLite Optuna storage, without training a model."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from ranksearch.cli.view import PlainView
from ranksearch.config import space
from ranksearch.config.load import load_study
from ranksearch.config.problems import StudyError
from ranksearch.search.loop import open_study
from ranksearch.search.recovery import ask_retry_first, fail_lost, requeue, worker_host
from ranksearch.tracking.tracker import NullTracker

from ..conftest import write_study


def _cfg(tmp_path: Path, **overrides):
    path = write_study(
        tmp_path / "loop.yaml", tmp_path / "model", tmp_path / "data.csv", **overrides
    )
    return load_study(path)[0]


def _view() -> PlainView:
    return PlainView(Console(file=io.StringIO(), width=200))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _running_trial(study: optuna.Study, cfg, **attrs) -> optuna.Trial:
    """A trial as `Orchestrator._start` leaves it while its worker runs."""
    trial = study.ask()
    config = space.suggest(trial, cfg.search)
    trial.set_user_attr("config", config.as_attr())
    for name, value in attrs.items():
        trial.set_user_attr(name, value)
    return trial


def test_a_lost_trial_with_tracking_off_is_failed_and_queued_again(tmp_path):
    cfg = _cfg(tmp_path)
    study = open_study(cfg, f"sqlite:///{tmp_path / 'optuna.db'}")
    lost = _running_trial(study, cfg, host=worker_host(), orchestrator_pid=_dead_pid())
    view = _view()
    fail_lost(study, cfg, NullTracker(), view)  # tracking off: the tracker is the null object
    first = study.trials[0]
    assert first.state == TrialState.FAIL
    assert "orchestrator died" in first.user_attrs["fail_reason"]
    assert f"trial {lost.number}: configuration queued again" in view.console.file.getvalue()
    retry = study.ask()  # the next trial trains the lost configuration
    assert retry.user_attrs["retry_of"] == lost.number
    assert space.suggest(retry, cfg.search) == space.TrialConfig.of(lost)


def test_a_changed_search_space_is_refused_before_any_trial_is_asked(tmp_path):
    cfg = _cfg(tmp_path)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = open_study(cfg, url)
    trial = study.ask()
    space.suggest(trial, cfg.search)
    study.tell(trial, 0.5)
    changed = _cfg(tmp_path, search={**cfg.search.model_dump(), "rank": [2, 4, 64]})
    with pytest.raises(StudyError) as err:
        open_study(changed, url)
    message = str(err.value)
    assert "`search.rank`" in message and "[2, 4, 8]" in message and "[2, 4, 64]" in message
    assert "study_name" in message and "--out" in message
    assert len(open_study(cfg, url).trials) == 1  # nothing was asked; the old space still opens


def test_a_trial_another_process_is_still_sampling_is_no_changed_space(tmp_path):
    """Several `ranksearch run` processes share a study: one opens it while another has asked
    a trial and suggested only some of its parameters. That is no change of space; a finished
    trial without a parameter the file now searches still is."""
    cfg = _cfg(tmp_path)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = open_study(cfg, url)
    half_sampled = study.ask()  # as another process leaves it between two suggest calls
    half_sampled.suggest_categorical("rank", [2, 4, 8])
    open_study(cfg, url)  # no error
    study.tell(half_sampled, 0.5)  # finished without learning_rate & co: they were fixed
    with pytest.raises(StudyError) as err:
        open_study(cfg, url)
    assert "`search.learning_rate`: the study's trials used a fixed value" in str(err.value)


def test_a_running_trial_that_never_beat_is_lost_after_stale_after_seconds(tmp_path):
    cfg = _cfg(tmp_path, launch={"device": "cpu", "heartbeat_seconds": 1, "stale_after_seconds": 3})
    study = open_study(cfg, f"sqlite:///{tmp_path / 'optuna.db'}")
    silent = study.ask()  # as a crash between ask and launch leaves it: no host, pid or heartbeat
    assert fail_lost(study, cfg, NullTracker(), _view()) == []  # not yet stale_after_seconds
    time.sleep(3.5)
    assert fail_lost(study, cfg, NullTracker(), _view()) == [silent.number]
    assert "no heartbeat" in study.trials[0].user_attrs["fail_reason"]


def test_an_interrupted_configuration_runs_before_the_queued_baselines(tmp_path):
    baselines = [{"rank": 2, "target_modules": "qv"}, {"rank": 8, "target_modules": "all-linear"}]
    cfg = _cfg(tmp_path, enqueue=baselines)
    study = open_study(cfg, f"sqlite:///{tmp_path / 'optuna.db'}")
    first = ask_retry_first(study)  # the first baseline
    space.suggest(first, cfg.search)
    study.tell(first, state=TrialState.FAIL)  # interrupted: recorded, then queued again
    assert requeue(study, cfg, study.trials[0])
    again = ask_retry_first(study)
    assert again.user_attrs.get("retry_of") == first.number
    assert space.suggest(again, cfg.search).rank == 2
    second = ask_retry_first(study)  # then the other baseline
    assert space.suggest(second, cfg.search).rank == 8


def test_a_new_study_runs_the_informed_configuration_before_the_baselines(tmp_path):
    baselines = [{"rank": 2, "target_modules": "qv"}]
    sampler = {"type": "tpe", "seed": 0, "n_startup_trials": 2}  # informed_start by default
    cfg = _cfg(tmp_path, enqueue=baselines, sampler=sampler)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = open_study(cfg, url)
    first = ask_retry_first(study)
    config = space.suggest(first, cfg.search)  # rank [2, 4, 8], lr 1e-3 .. 1e-2 (log)
    assert first.user_attrs["informed_start"]
    assert (config.rank, config.lora_alpha, config.target_modules) == (8, 16, "all-linear")
    assert config.learning_rate == pytest.approx(10**-2.5)
    study.tell(first, 0.5)
    second = ask_retry_first(study)  # then the study file's baseline
    assert space.suggest(second, cfg.search).rank == 2
    study.tell(second, 0.6)
    # a resumed study does not queue it again
    study = open_study(cfg, url)
    assert not [t for t in study.trials if t.state == TrialState.WAITING]
    # turned off, or a sampler that runs its own sequence: nothing is queued
    for name, off in (("off", {**sampler, "informed_start": False}), ("rand", "random")):
        cfg = _cfg(tmp_path, sampler=off)
        study = open_study(cfg, f"sqlite:///{tmp_path / f'{name}.db'}")
        assert study.trials == []


def test_an_interrupted_plain_check_is_not_queued_as_a_search_trial(tmp_path):
    """`run` plans a nested estimate's plain check again; queued, it would run as a nested
    search trial of the same configuration."""
    cfg = _cfg(tmp_path)
    study = open_study(cfg, f"sqlite:///{tmp_path / 'optuna.db'}")
    study.enqueue_trial({}, user_attrs={"rank_check_of": 0, "rank_check_rank": 4})
    check = study.ask()
    study.tell(check, state=TrialState.FAIL)
    waiting = len(study.get_trials(states=(TrialState.WAITING,)))
    assert not requeue(study, cfg, study.trials[-1])
    assert len(study.get_trials(states=(TrialState.WAITING,))) == waiting
