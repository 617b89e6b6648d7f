"""How a trial's worker ends, told from its real process: exit code, signal, last output."""

from __future__ import annotations

import json
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
