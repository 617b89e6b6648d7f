"""The search loop through `ranksearch run`, in this process, with a scripted worker.

Everything but the training is real: the command, the Orchestrator, supervision and pruning,
the SQLite Optuna storage, the MLflow store where tracking is on, and one worker process per
trial (cold, or a warm `--serve` worker), started through the launch seam
(`RANKSEARCH_WORKER_MODULE`). The worker is tests/fake_worker.py: it speaks the real report
protocol with curves from a script, so pruning, crashes, NaNs and hangs happen on cue.
test_cli.py keeps one end-to-end run with the real worker on a tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from ranksearch.cli.commands import main

from ..conftest import FIXED, write_study
from ..fake_worker import SCRIPT_ENV, default_loss

ROOT = Path(__file__).resolve().parents[2]
COLD = ["--set", "launch.reuse_workers=false"]  # one process per trial, stopped by SIGTERM


@pytest.fixture
def script(monkeypatch, tmp_path):
    """Trials run tests/fake_worker.py; `script(rules)` gives it its rules (none: the default
    curve of every configuration)."""
    monkeypatch.setenv("RANKSEARCH_WORKER_MODULE", "tests.fake_worker")
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))  # workers import tests.fake_worker
    # what `quiet_libraries` sets for the whole process, put back after the test
    for name in ("TOKENIZERS_PARALLELISM", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.setenv(name, os.environ.get(name, "false"))

    def write(rules: list[dict]) -> None:
        path = tmp_path / "script.json"
        path.write_text(json.dumps(rules))
        monkeypatch.setenv(SCRIPT_ENV, str(path))

    write([])
    return write


def run(capsys, study_file: Path, out: Path, *extra: str) -> tuple[int, str]:
    """`ranksearch run` in this process: its exit code and what it printed."""
    code = main(["run", "--study", str(study_file), "--out", str(out), *extra])
    printed = capsys.readouterr()
    return code, printed.out + printed.err


def load(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}")


def workers(out: Path) -> list[psutil.Process]:
    """The live scripted workers of the study in `out`, and no others."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "fake_worker" in cmdline and str(out) in cmdline:
            found.append(p)
    return found


@pytest.mark.parametrize("mode", [[], COLD], ids=["warm", "cold"])
def test_run_prunes_completes_then_resumes_without_repeating(
    tmp_path, tiny_bert, sentiment_csv, script, capsys, mode
):
    study_file = write_study(tmp_path / "tiny.yaml", tiny_bert, sentiment_csv)
    out = tmp_path / "out"
    code, printed = run(capsys, study_file, out, "--no-mlflow", *mode)
    assert code == 0, printed
    study = load(out, "tiny")
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] >= 1 and states[TrialState.PRUNED] >= 1, states
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 6
    for t in study.trials:
        steps = sorted(t.intermediate_values)
        assert steps[0] == 2 and all(b - a == 2 for a, b in zip(steps, steps[1:], strict=False))
        # every value the worker reported, as it reported it, and no other
        curve = {s: default_loss({"r": t.params["rank"]}, t.params["learning_rate"], s, 12)
                 for s in steps}  # fmt: skip
        assert t.intermediate_values == pytest.approx(curve)
        if t.state == TrialState.COMPLETE:
            assert steps[-1] == 12 and t.value == t.intermediate_values[12]
        elif "duplicate_of" not in t.user_attrs:
            assert t.user_attrs["pruned_at_step"] == steps[-1] < 12
            assert (out / "trials" / str(t.number) / "worker.log").is_file()
    assert "pruned at step" in printed and "Best: trial" in printed
    header = (out / "trials/0/worker.log").read_text().splitlines()[0]  # how it was started
    assert header.startswith("# accelerate launch" if mode else "# warm worker pid"), header

    started = {t.number: t.datetime_start for t in study.trials}
    code, printed = run(capsys, study_file, out, "--no-mlflow", *mode)
    assert code == 0 and len(load(out, "tiny").trials) == 6, printed  # nothing left: no trial
    code, printed = run(capsys, study_file, out, "--no-mlflow", *mode, "--set", "budget.n_trials=8")
    assert code == 0, printed
    study = load(out, "tiny")
    assert len(study.trials) == 8
    assert {t.number: t.datetime_start for t in study.trials[:6]} == started


def test_a_repeated_configuration_is_not_trained_again(
    tmp_path, tiny_bert, sentiment_csv, script, capsys
):
    study_file = write_study(
        tmp_path / "dup.yaml",
        tiny_bert,
        sentiment_csv,
        search=FIXED,
        sampler={"type": "random", "seed": 1},
        pruner={"type": "none"},
        training={"max_steps": 4, "eval_every": 2, "batch_size": 8},
        budget={"n_trials": 4},
    )
    out = tmp_path / "out"
    code, printed = run(capsys, study_file, out, "--no-mlflow")
    assert code == 0, printed
    trials = load(out, "dup").trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    trained = [t for t in trials if "duplicate_of" not in t.user_attrs]
    replayed = [t for t in trials if "duplicate_of" in t.user_attrs]
    # two configurations: both trained once, repeats outside the budget, then the study ends
    assert len(trained) == 2 and len(replayed) >= 1
    assert len(list((out / "trials").iterdir())) == len(trained)
    assert "every configuration of the search space (2) is trained" in printed
    for t in replayed:
        origin = trials[t.user_attrs["duplicate_of"]]
        assert t.params == origin.params and t.value == origin.value
        assert t.intermediate_values == origin.intermediate_values
    assert "not retrained" in printed


def test_grid_runs_every_rank_once(tmp_path, tiny_bert, sentiment_csv, script, capsys):
    study_file = write_study(
        tmp_path / "grid.yaml",
        tiny_bert,
        sentiment_csv,
        search=FIXED,
        sampler="grid",
        pruner={"type": "none"},
        training={"max_steps": 2, "eval_every": 2, "batch_size": 8},
    )
    out = tmp_path / "out"
    code, printed = run(capsys, study_file, out, "--no-mlflow")
    assert code == 0, printed
    trials = load(out, "grid").trials
    assert sorted(t.params["rank"] for t in trials) == [2, 4]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert "budget.n_trials 6 -> 2" in printed


@pytest.mark.parametrize(
    ("rule", "mode", "reason"),
    [
        ({"kill_at": 3}, [], "worker killed by SIGKILL"),  # the OOM killer's way
        ({"kill_at": 3}, COLD, "worker killed by SIGKILL"),
        ({"crash_at": 3}, [], "worker exited with code 1"),
        ({"nan_at": 4}, COLD, "val_loss is nan at step 4"),
    ],
    ids=["killed-warm", "killed-cold", "crash-warm", "nan-cold"],
)
def test_a_crashing_trial_fails_alone_with_its_reason(
    tmp_path, tiny_bert, sentiment_csv, script, capsys, rule, mode, reason
):
    script([{"when": {"trial": 0}, **rule}])
    study_file = write_study(
        tmp_path / "crash.yaml",
        tiny_bert,
        sentiment_csv,
        search=FIXED,
        sampler="random",
        pruner={"type": "none"},
        training={"max_steps": 6, "eval_every": 2, "batch_size": 8},
        budget={"n_trials": 2},
    )
    out = tmp_path / "out"
    code, printed = run(capsys, study_file, out, "--no-mlflow", *mode)
    assert code == 0, printed
    trials = load(out, "crash").trials
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"].startswith(reason)
    if "crash_at" in rule:  # the worker's own last words follow
        assert "scripted crash at step 3" in trials[0].user_attrs["fail_reason"]
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert "FAIL" in printed and "COMPLETE" in printed
    assert not workers(out)


def signal_once_reported(reports: Path, sig: signal.Signals) -> threading.Thread:
    """Send `sig` to this process, the orchestrator's, once `reports` holds an evaluation.
    The trial it watches reports and then hangs until stopped, so the loop, and with it the
    orchestrator's handler of `sig`, is still running when the signal comes."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # past it, no signal: the test fails on its own
            if reports.is_file() and '"step"' in reports.read_text():
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("sig", "mode"),
    [(signal.SIGINT, []), (signal.SIGTERM, COLD)],
    ids=["ctrl-c-warm", "sigterm-cold"],
)
def test_interrupt_stops_the_trial_records_it_and_resume_finishes(
    tmp_path, tiny_bert, sentiment_csv, script, capsys, sig, mode
):
    script([{"when": {"trial": 0}, "hang_at": 2}])  # trial 0 runs until it is stopped
    study_file = write_study(
        tmp_path / "stop.yaml",
        tiny_bert,
        sentiment_csv,
        search=FIXED,
        sampler="random",
        pruner={"type": "none"},
        training={"max_steps": 6, "eval_every": 2, "batch_size": 8},
        budget={"n_trials": 2},
    )
    out = tmp_path / "out"
    watcher = signal_once_reported(out / "trials/0/reports.jsonl", sig)
    code, printed = run(capsys, study_file, out, "--no-mlflow", *mode)
    watcher.join()
    assert code == 128 + sig.value, printed
    assert "run the same command to resume" in printed
    assert not workers(out)  # the stopped trial's worker is gone
    first = load(out, "stop").trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"] == "interrupted"
    code, printed = run(capsys, study_file, out, "--no-mlflow", *mode)
    assert code == 0, printed
    done = [t for t in load(out, "stop").trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and done[0].params == first.params  # the stopped one ran first
    assert done[0].user_attrs["retry_of"] == first.number


def test_failures_in_a_row_stop_the_study(tmp_path, tiny_bert, sentiment_csv, script, capsys):
    script([{"crash_at": 0, "error": "model.safetensors: header too large"}])  # every trial
    study_file = write_study(
        tmp_path / "broken.yaml",
        tiny_bert,
        sentiment_csv,
        budget={"n_trials": 5, "max_consecutive_failures": 2},
    )
    out = tmp_path / "out"
    code, printed = run(capsys, study_file, out, "--no-mlflow")
    assert code == 1, printed
    assert "2 trials failed in a row" in printed and "worker.log" in printed
    trials = load(out, "broken").trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert "safetensors" in trials[0].user_attrs["fail_reason"]


def test_mlflow_records_each_trial_as_optuna_does(
    tmp_path, tiny_bert, sentiment_csv, script, capsys
):
    """Tracking on, in the default store (sqlite:///<out>/mlflow.db): one run per trial under
    the study's parent run, its state, curve and failure reason as Optuna has them."""
    script([{"when": {"trial": 1}, "crash_at": 3}])
    study_file = write_study(
        tmp_path / "tracked.yaml",
        tiny_bert,
        sentiment_csv,
        tracking={"system_metrics_seconds": None},  # off: not what this test is about
    )
    out = tmp_path / "out"
    code, printed = run(capsys, study_file, out)
    assert code == 0, printed
    study = load(out, "tracked")
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("ranksearch.role") == "study"]
    trial_runs = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in runs
        if r.data.tags.get("ranksearch.role") == "trial"
    }
    assert sorted(trial_runs) == [t.number for t in study.trials]
    assert {t.state for t in study.trials} == {
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
    }  # fmt: skip
    for t in study.trials:
        r = trial_runs[t.number]
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["optuna.state"] == t.state.name
        assert r.info.status == ("FAILED" if t.state == TrialState.FAIL else "FINISHED")
        history = client.get_metric_history(r.info.run_id, "val_loss")
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
        if t.state == TrialState.FAIL:
            assert "scripted crash at step 3" in r.data.tags["fail_reason"]
        if t.state == TrialState.COMPLETE:
            assert r.data.metrics["final_val_loss"] == pytest.approx(t.value)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
