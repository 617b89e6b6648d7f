"""How a trial's worker ends, told from its real process: exit code, signal, last output."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from optuna.trial import TrialState

from ranksearch.search.launch import LaunchPlan, WorkerProcess
from ranksearch.search.loop import open_study
from ranksearch.search.supervise import Outcome, Pace, TrialRun, killed_reason
from ranksearch.tracking.tracker import NullTracker

from ..cli.test_commands import _load, _popen_run, _workers
from ..conftest import write_study
from .test_recovery import _cfg, _view

HEADER = "accelerate launch --cpu -m ranksearch.worker spec.json"  # what the log starts with


def _outcome(tmp_path, script: str, **overrides) -> Outcome:
    cfg = _cfg(tmp_path, **overrides)
    trial = open_study(cfg, f"sqlite:///{tmp_path / 'optuna.db'}").ask()
    plan = LaunchPlan([sys.executable, "-c", script], launcher=HEADER)
    worker = WorkerProcess(plan, tmp_path / "worker.log", tmp_path / "reports.jsonl").start()
    run = TrialRun(trial, {}, worker, cfg, NullTracker(), _view())
    deadline = time.monotonic() + 30
    while (outcome := run.poll()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcome is not None
    return outcome


@pytest.mark.parametrize(
    ("ending", "said"),
    [
        ("os.kill(os.getpid(), signal.SIGKILL)", "worker killed by SIGKILL"),
        ("os.kill(os.getpid(), signal.SIGSEGV)", "worker killed by SIGSEGV"),
        ("sys.exit(3)", "worker exited with code 3"),
    ],
)
def test_a_failed_worker_says_how_it_ended_then_its_last_output(tmp_path, ending, said):
    script = f"import os, signal, sys\nprint('loading the model', flush=True)\n{ending}\n"
    outcome = _outcome(tmp_path, script)
    assert outcome.state == TrialState.FAIL
    assert outcome.reason.startswith(said), outcome.reason
    assert "loading the model" in outcome.reason
    assert "# accelerate launch" not in outcome.reason and "$ " not in outcome.reason


def test_a_silent_worker_says_so(tmp_path):
    outcome = _outcome(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert outcome.reason.startswith("worker killed by SIGKILL")
    assert "no output" in outcome.reason and "accelerate" not in outcome.reason


def test_the_kernel_log_tells_an_oom_kill_from_another_sigkill():
    oom = "[ 812.4] Out of memory: Killed process 4242 (python) total-vm:9000kB, anon-rss:8000kB"
    assert "out of memory" in killed_reason("SIGKILL", 4242, oom)
    assert "out of memory" not in killed_reason("SIGKILL", 424, oom)  # another process
    assert "OOM killer" in killed_reason("SIGKILL", 4242, None)  # dmesg not readable: maybe
    assert killed_reason("SIGTERM", 4242, oom) == "worker killed by SIGTERM"


def test_a_worker_may_be_silent_for_10x_its_slowest_interval_and_10_minutes_at_least():
    pace = Pace()
    assert pace.allowed_seconds(None) == 600  # nothing measured yet: loading, first evaluation
    pace.slowest = 30.0
    assert pace.allowed_seconds(None) == 600  # fast reports: the floor still holds
    pace.slowest = 90.0
    assert pace.allowed_seconds(None) == 900  # slow ones: 10 x the slowest
    assert pace.allowed_seconds(0.5) == 30  # launch.stall_minutes replaces both


def test_silence_is_timed_from_the_last_report_not_from_the_start(tmp_path):
    """A worker that reports every 0.4 s for longer than the stall limit runs to the end."""
    reports = tmp_path / "reports.jsonl"
    script = (
        "import json, time\n"
        "for step in range(1, 13):\n"
        "    time.sleep(0.4)\n"
        f"    with open({str(reports)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'step': step, 'val_loss': 1.0 / step}) + '\\n')\n"
    )
    outcome = _outcome(tmp_path, script, launch={"device": "cpu", "stall_minutes": 0.05})
    assert outcome.state == TrialState.COMPLETE, outcome.reason  # 4.8 s of reports, limit 3 s


@pytest.mark.e2e
@pytest.mark.parametrize("reuse_workers", [True, False], ids=["warm", "cold"])
def test_a_hung_worker_fails_its_trial_which_runs_again(
    tmp_path, tiny_bert, sentiment_csv, reuse_workers
):
    """The worker of trial 0 is stopped (SIGSTOP) after its first evaluation: the trial fails
    with no progress at its last step, its worker is killed (a warm one replaced), its
    configuration runs again, and the study finishes."""
    study_file = write_study(
        tmp_path / "hung.yaml",
        tiny_bert,
        sentiment_csv,
        training={"max_steps": 60, "eval_every": 10, "batch_size": 8, "seed": 0},
        pruner={"type": "none"},
        budget={"n_trials": 1},
        # 30 s: more than loading the model takes on a busy 2-core machine
        launch={"device": "cpu", "reuse_workers": reuse_workers, "stall_minutes": 0.5},
        tracking="none",
    )
    out = tmp_path / "out"
    run = _popen_run(study_file, out)
    stopped: list[psutil.Process] = []
    try:
        _wait_for_evaluation(run, out / "trials" / "0" / "reports.jsonl")
        stopped = _workers(out)
        for p in stopped:
            p.send_signal(signal.SIGSTOP)
        printed = run.communicate(timeout=600)[0]
    finally:
        run.kill()
        for p in stopped:  # only if the orchestrator left them
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    assert run.returncode == 0, printed
    assert stopped and not any(p.is_running() for p in stopped), "the hung worker lives on"
    hung, retry = _load(out, "hung").trials
    last_step = [r["step"] for r in _reports(out, 0) if "step" in r and "event" not in r][-1]
    assert hung.state == TrialState.FAIL
    assert hung.user_attrs["fail_reason"].startswith(
        f"no progress for 0.5 minutes at step {last_step}:"
    )
    assert "trial 0: configuration queued again" in printed
    assert retry.user_attrs["retry_of"] == 0 and retry.params == hung.params
    assert retry.state == TrialState.COMPLETE and max(retry.intermediate_values) == 60
    if reuse_workers:  # the retry ran on a fresh warm worker, not the hung one
        header = (out / "trials" / "1" / "worker.log").read_text().split("\n")[0]
        assert "warm worker pid" in header and f"pid {stopped[0].pid}," not in header


def _wait_for_evaluation(run: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    """Until the worker's first evaluation is in `path`; the run's output if it ended first."""
    deadline = time.monotonic() + timeout
    while run.poll() is None and time.monotonic() < deadline:
        if path.is_file() and '"step"' in path.read_text():
            return
        time.sleep(0.1)
    run.kill()
    raise AssertionError(f"no evaluation in {path}:\n{run.communicate()[0]}")


def _reports(out: Path, number: int) -> list[dict]:
    lines = (out / "trials" / str(number) / "reports.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _run_to_end(tmp_path, trial, cfg, curve: dict[int, float]) -> Outcome:
    """A real worker process that reports `curve` (step -> val loss), then exits 0."""
    folder = tmp_path / str(trial.number)
    folder.mkdir()
    lines = "".join(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in curve.items())
    script = f"open({str(folder / 'reports.jsonl')!r}, 'w').write({lines!r})"
    plan = LaunchPlan([sys.executable, "-c", script], launcher=HEADER)
    worker = WorkerProcess(plan, folder / "worker.log", folder / "reports.jsonl").start()
    run = TrialRun(trial, {}, worker, cfg, NullTracker(), _view())
    deadline = time.monotonic() + 30
    while (outcome := run.poll()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcome is not None
    return outcome


def test_a_trial_that_reaches_max_steps_is_complete_not_pruned_by_the_top_rung(tmp_path):
    """Hyperband with rungs at steps 2 and 6 = max_steps: the second trial leads at the first
    rung and trails the first trial at the last step, where the top rung would prune it."""
    cfg = _cfg(
        tmp_path,
        training={"max_steps": 6, "eval_every": 2, "batch_size": 8, "seed": 0},
        pruner={"type": "hyperband", "min_steps": 2, "reduction_factor": 3},
    )
    study = open_study(cfg, f"sqlite:///{tmp_path / 'optuna.db'}")
    outcomes = []
    for curve in ({2: 0.5, 4: 0.4, 6: 0.30}, {2: 0.45, 4: 0.42, 6: 0.35}):
        trial = study.ask()
        o = _run_to_end(tmp_path, trial, cfg, curve)
        study.tell(trial, o.value if o.state == TrialState.COMPLETE else None, state=o.state)
        outcomes.append(o)
    assert [o.state for o in outcomes] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert outcomes[1].value == 0.35
    assert "pruned_at_step" not in study.trials[1].user_attrs
