"""Scaling out for real: parallel trials in one process, several `ranksearch run` processes on one
PostgreSQL or SQLite study, and a worker killed mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from ranksearch.worker import TrialSpec

from ..cli.test_commands import _workers
from ..conftest import mlflow_server_at, postgres_database, write_study

# 12 distinct configurations, each trained 4 steps: short trials, few duplicates.
SPACE = {
    "rank": [2, 4, 8],
    "alpha_ratio": 1,
    "dropout": 0.0,
    "target_modules": ["query", "value"],
    "learning_rate": [1e-3, 3e-3, 5e-3, 1e-2],
}
QUICK = {
    "search": SPACE,
    "training": {"max_steps": 4, "eval_every": 2, "batch_size": 8},
    "pruner": {"type": "none"},
    "sampler": {"type": "random", "seed": 0},
}
FAST_HEARTBEAT = {"heartbeat_seconds": 1, "stale_after_seconds": 4}


def _study_file(tmp_path, tiny_bert, sentiment_csv, name, n_trials, **launch):
    return write_study(
        tmp_path / f"{name}.yaml",
        tiny_bert,
        sentiment_csv,
        **QUICK,
        budget={"n_trials": n_trials},
        launch={"device": "cpu", "stop_grace_seconds": 2, **launch},
    )


def _start(study: Path, out: Path, *extra: str, host: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if host:
        env["RANKSEARCH_HOST"] = host
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ranksearch.cli",
            "run",
            "--study",
            str(study),
            "--out",
            str(out),
            "--plain",
            *extra,
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _wait_reporting(out: Path, orchestrator_pid: int | None = None, timeout: float = 240) -> int:
    """Wait until a trial launched by an orchestrator writing into `out` (the one with
    `orchestrator_pid`, if given) has reported; its number. Read from the trial's folder the
    moment its first report is written: a warm trial of the tiny model ends well under a second
    later, too soon to catch it running by polling the storage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for spec in (out / "trials").glob("*/spec.json"):
            try:
                pid = TrialSpec.read(spec).orchestrator_pid
            except ValueError:  # being written
                continue
            reports = spec.parent / "reports.jsonl"
            if orchestrator_pid in (None, pid) and reports.is_file() and reports.stat().st_size:
                return int(spec.parent.name)
        time.sleep(0.01)
    raise AssertionError(f"no trial reported within {timeout}s")


def _finish(procs: list[subprocess.Popen], timeout: float = 420) -> list[str]:
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out
        outputs.append(out)
    return outputs


def _check_lost_trial_recovered(study: optuna.Study, lost: int, n_trials: int, reason: str):
    trials = study.get_trials()
    # the budget caps the whole study: exactly n_trials trained, whatever the workers (repeats
    # of a finished configuration, answered from its result, are outside it)
    states = Counter(t.state for t in trials if "duplicate_of" not in t.user_attrs)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == n_trials, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # unique numbers
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [lost]
    assert reason in failed[0].user_attrs["fail_reason"]
    # its configuration was queued again once (budget.retry_failed: 1) and trained
    retries = [t for t in trials if t.user_attrs.get("retry_of") == lost]
    assert len(retries) == 1 and retries[0].params == failed[0].params
    assert retries[0].state == TrialState.COMPLETE


@pytest.mark.e2e
def test_parallel_trials_on_cpu_run_at_once(tmp_path, tiny_bert, sentiment_csv):
    study = _study_file(tmp_path, tiny_bert, sentiment_csv, "par", 4, parallel_trials=2)
    out = tmp_path / "out"
    (log,) = _finish([_start(study, out, "--no-mlflow")])
    assert "2 trials at a time" in log
    trials = optuna.load_study(study_name="par", storage=f"sqlite:///{out / 'optuna.db'}").trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    trained = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert len(trained) == 4  # the budget; repeats answered from a result are outside it
    overlaps = [
        (a.number, b.number)
        for a in trained
        for b in trained
        if a.number < b.number and a.datetime_start < b.datetime_complete
        and b.datetime_start < a.datetime_complete
    ]  # fmt: skip
    assert overlaps, "no two trials ran at the same time"
    threads = max(1, (os.cpu_count() or 1) // 2)  # each trial gets its share of the cores
    warm = set()
    for t in trained:
        head = (out / "trials" / str(t.number) / "worker.log").read_text().splitlines()[0]
        assert f"OMP_NUM_THREADS={threads}" in head and "--main_process_port" in head
        warm.add(head.split("warm worker pid ")[1].split(",")[0])
    assert len(warm) == min(2, len(trained))  # one warm worker per slot, each reused


@pytest.mark.e2e
@pytest.mark.services
def test_three_processes_share_one_postgres_study_and_survive_a_lost_worker(
    tmp_path, tiny_bert, sentiment_csv
):
    """Three orchestrators (as on three machines), one SIGKILLed mid-trial: the others find its
    trial by its stopped heartbeat, fail it, close its MLflow run, and retrain it."""
    n_trials = 9
    study = _study_file(tmp_path, tiny_bert, sentiment_csv, "shared", n_trials, **FAST_HEARTBEAT)
    with (
        postgres_database() as storage,
        postgres_database() as tracking_db,
        mlflow_server_at(tracking_db, tmp_path / "mlartifacts") as tracking,
    ):
        common = ("--storage", storage, "--tracking-uri", tracking)
        procs = {
            host: _start(study, tmp_path / host, *common, host=host)
            for host in ("node-a", "node-b", "node-c")
        }
        lost = _wait_reporting(tmp_path / "node-c")
        procs["node-c"].send_signal(signal.SIGKILL)  # machine lost: no cleanup at all
        procs["node-c"].wait()
        _finish([procs["node-a"], procs["node-b"]])

        result = optuna.load_study(study_name="shared", storage=storage)
        _check_lost_trial_recovered(result, lost, n_trials, "no heartbeat for 4 s")
        by_host = Counter(t.user_attrs["host"] for t in result.trials)
        assert by_host["node-a"] >= 1 and by_host["node-b"] >= 1
        print(f"\ntrials per worker host: {dict(by_host)}")

        # one MLflow run per trial, none left RUNNING; the lost trial's run is FAILED
        client = MlflowClient(tracking)
        exp = client.get_experiment_by_name("shared")
        runs = client.search_runs([exp.experiment_id], "tags.`ranksearch.role` = 'trial'")
        numbers = Counter(int(r.data.tags["optuna.trial_number"]) for r in runs)
        assert numbers == Counter(range(len(result.trials)))
        status = {int(r.data.tags["optuna.trial_number"]): r.info.status for r in runs}
        assert status[lost] == "FAILED"
        assert "RUNNING" not in status.values()
    # the lost orchestrator's worker noticed and left by itself
    deadline = time.monotonic() + 30
    while _workers(tmp_path / "node-c") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _workers(tmp_path / "node-c")


@pytest.mark.e2e
def test_two_processes_on_one_sqlite_study_survive_a_killed_one(tmp_path, tiny_bert, sentiment_csv):
    """Same machine, one SQLite file and one MLflow store: the dead orchestrator's pid gives its
    trial away at once (the heartbeat, 60 s by default, is not waited for)."""
    n_trials = 4
    study = _study_file(tmp_path, tiny_bert, sentiment_csv, "local", n_trials)
    out = tmp_path / "out"
    storage = f"sqlite:///{out / 'optuna.db'}"
    first = _start(study, out)
    second = _start(study, out)
    lost = _wait_reporting(out, orchestrator_pid=second.pid)
    second.send_signal(signal.SIGKILL)
    second.wait()
    (log,) = _finish([first])
    result = optuna.load_study(study_name="local", storage=storage)
    _check_lost_trial_recovered(result, lost, n_trials, "orchestrator died")
    assert f"trial {lost}:" in log and "-> FAIL" in log
