"""How a trial's worker ends, told from its real process: exit code, signal, last output."""

from __future__ import annotations

import sys
import time

import pytest
from optuna.trial import TrialState

from ranksearch.search.launch import LaunchPlan, WorkerProcess
from ranksearch.search.loop import open_study
from ranksearch.search.supervise import Outcome, TrialRun, killed_reason
from ranksearch.tracking.tracker import NullTracker

from .test_study import _cfg, _view

HEADER = "accelerate launch --cpu -m ranksearch.worker spec.json"  # what the log starts with


def _outcome(tmp_path, script: str) -> Outcome:
    cfg = _cfg(tmp_path)
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
