"""The answer: recommendation on constructed trial sets, and the report JSON through the CLI."""

import json

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from ranksearch.recommend import answer, rank_view
from ranksearch.report import SCHEMA, build_report

from .conftest import run_cli

MODULES = {"qv": 2, "all-linear": 6}  # adapted-module multiplier of a toy model


def _trial(
    number: int,
    rank: int,
    value: float | None,
    *,
    state=TrialState.COMPLETE,
    se: float | None = 0.01,
    modules: str = "qv",
    **attrs,
) -> optuna.trial.FrozenTrial:
    config = {
        "rank": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "learning_rate": 1e-3,
    }
    user = {
        "config": config,
        "trainable_params": rank * 100 * MODULES[modules],
        "last_step": 100,
        "train_seconds": 20.0,
        **attrs,
    }
    if se is not None:
        user["val_loss_se"] = se
    t = create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"rank": rank},
        distributions={"rank": CategoricalDistribution([2, 4, 8, 16, 32, 64])},
        user_attrs=user,
        intermediate_values={50: (value or 1.0) + 0.1},
    )
    t.number = number
    return t


def test_smallest_within_one_standard_error_wins():
    trials = [_trial(0, 64, 0.300), _trial(1, 8, 0.305), _trial(2, 4, 0.320), _trial(3, 32, 0.302)]
    a = answer(trials)
    assert a.best.number == 0 and a.tolerance_rule == "1se" and a.tolerance == 0.01
    assert a.candidates == [0, 1, 3]
    assert a.recommended.number == 1  # rank 8: 800 params, 0.005 from the best


def test_noise_margin_follows_the_best_trials_standard_error():
    trials = [_trial(0, 64, 0.300, se=0.03), _trial(1, 4, 0.325), _trial(2, 8, 0.335)]
    assert answer(trials).recommended.number == 1  # 0.325 is within 0.03 of 0.300
    assert answer(trials, tolerance=0.0).recommended.number == 0  # an exact margin


def test_ties_prefer_fewer_parameters_then_lower_loss_then_earlier():
    trials = [_trial(0, 8, 0.30), _trial(1, 8, 0.30), _trial(2, 8, 0.29, modules="all-linear")]
    a = answer(trials)
    assert a.best.number == 2 and a.recommended.number == 0


def test_single_trial_and_all_pruned():
    a = answer([_trial(0, 16, 0.4)])
    assert a.best.number == a.recommended.number == 0
    pruned = [_trial(i, 4, None, state=TrialState.PRUNED) for i in range(3)]
    a = answer(pruned)
    assert a.best is None and a.recommended is None and a.candidates == []


def test_replayed_duplicates_do_not_count_twice():
    trials = [_trial(0, 8, 0.3), _trial(1, 8, 0.3, duplicate_of=0), _trial(2, 16, 0.31)]
    assert answer(trials).candidates == [0, 2]


def test_without_a_standard_error_the_margin_is_one_percent():
    a = answer([_trial(0, 64, 0.500, se=None), _trial(1, 4, 0.504, se=None)])
    assert a.tolerance_rule == "relative" and a.recommended.number == 1


def test_rank_view_shows_where_gains_plateau():
    trials = [
        _trial(0, 4, 0.40),
        _trial(1, 8, 0.33),
        _trial(2, 16, 0.32),
        _trial(3, 32, 0.321),
        _trial(4, 16, None, state=TrialState.PRUNED),
    ]
    rows = {r["rank"]: r for r in rank_view(trials)}
    assert rows[8]["gain_vs_previous_rank"] == pytest.approx(0.07)
    assert rows[32]["gain_vs_previous_rank"] == pytest.approx(-0.001)
    assert (rows[16]["trials"], rows[16]["complete"]) == (2, 1)


@pytest.fixture
def built_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="built", storage=url)
    study.enqueue_trial({"rank": 8})  # a baseline, as `enqueue:` makes one
    trials = [
        _trial(0, 8, 0.33),
        _trial(1, 64, 0.30),
        _trial(2, 16, 0.305),
        _trial(3, 4, None, state=TrialState.PRUNED, pruned_at_step=50),
    ]
    first = study.ask()  # the enqueued one
    for name, value in trials[0].user_attrs.items():
        first.set_user_attr(name, value)
    study.tell(first, 0.33)
    for t in trials[1:]:
        study.add_trial(t)
    return tmp_path, url, study


def test_report_json_is_stable_and_complete(built_study):
    _, _, study = built_study
    report = build_report(study, "1se", sort="val_loss")
    assert report["schema"] == SCHEMA and report["study"] == "built"
    assert report["counts"]["complete"] == 3 and report["counts"]["pruned"] == 1
    assert report["best"]["trial"] == 1 and report["recommended"]["trial"] == 2
    assert report["recommended"]["cost"]["trainable_params"] == 3200
    assert report["recommended"]["cost"]["seconds_per_step"] == pytest.approx(0.2)
    assert report["tolerance"] == {"rule": "1se", "val_loss": 0.01, "candidates": [1, 2]}
    (baseline,) = report["baselines"]
    assert baseline["trial"] == 0 and baseline["best_gain_val_loss"] == pytest.approx(0.03)
    assert [r["number"] for r in report["trials"]] == [1, 2, 0, 3]  # by val loss, pruned last
    json.dumps(report)  # plain JSON all the way down


def test_report_command_finds_the_study_like_run(built_study):
    tmp_path, url, _ = built_study
    study_file = tmp_path / "built.yaml"
    study_file.write_text(yaml.safe_dump({"model": "unused", "data": {"source": "unused"}}))
    r = run_cli(
        "report", "--study", str(study_file), "--storage", url, "--format", "json", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["recommended"]["trial"] == 2
    r = run_cli("report", "--study", str(study_file), "--out", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0 and "Recommended: trial 2" in r.stdout and "by rank" in r.stdout
    r = run_cli(
        "report",
        "--study",
        str(study_file),
        "--format",
        "markdown",
        "--out",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert r.stdout.startswith("# Study built") and "| 64 |" in r.stdout
    r = run_cli("report", "--study", str(study_file), "--out", str(tmp_path / "none"), cwd=tmp_path)
    assert r.returncode == 2 and "run it first" in r.stderr


def test_status_shows_progress_by_host_and_what_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="built", storage=url)
    for t in (
        _trial(0, 8, 0.33, host="node-0"),
        _trial(1, 64, 0.30, host="node-1"),
        _trial(2, 16, 0.305, host="node-1"),
        _trial(3, 4, None, state=TrialState.PRUNED, host="node-0"),
    ):
        study.add_trial(t)
    running = study.ask()  # a trial another machine is training now
    running.set_user_attr("host", "node-1")
    running.set_user_attr("orchestrator_pid", 4242)
    running.set_user_attr("last_step", 40)
    study_file = tmp_path / "built.yaml"
    study_file.write_text(
        yaml.safe_dump({"model": "unused", "data": {"source": "unused"}, "budget": {"n_trials": 6}})
    )
    r = run_cli(
        "status", "--study", str(study_file), "--storage", url, "--format", "json", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["counts"]["complete"] == 3 and status["counts"]["running"] == 1
    assert status["to_go"] == 1  # 6 - 4 finished - 1 running
    assert status["hosts"]["node-0"] == {"complete": 1, "pruned": 1, "fail": 0, "running": 0}
    assert status["hosts"]["node-1"] == {"complete": 2, "pruned": 0, "fail": 0, "running": 1}
    assert status["running"][0]["pid"] == 4242 and status["running"][0]["last_step"] == 40
    r = run_cli("status", "--study", str(study_file), "--storage", url, cwd=tmp_path)
    assert "3 complete, 1 pruned, 0 failed, 1 running, 1 to go of 6" in r.stdout
    assert "running: trial 4 on node-1 (pid 4242), step 40" in r.stdout


def test_every_reader_names_the_same_best_trial(tmp_path):
    """A confirmation re-run scored lower than every search trial and a replayed duplicate
    ties the best: `run`'s closing lines, the live view, `report`, `status` and what the MLflow
    parent is given (record_answer) still name search trial 1 as the best."""
    import io

    from rich.console import Console

    from ranksearch.report import best_summary, study_status
    from ranksearch.study import record_answer
    from ranksearch.view import LiveView, _counts

    study = optuna.create_study(study_name="agree", storage=f"sqlite:///{tmp_path / 'o.db'}")
    for t in (
        _trial(0, 8, 0.33),
        _trial(1, 64, 0.30),
        _trial(2, 64, 0.30, duplicate_of=1),
        _trial(3, 4, None, state=TrialState.PRUNED),
        _trial(4, 64, 0.25, confirmation=True, confirm_of=1, seed=1),
    ):
        study.add_trial(t)
    assert best_summary(study)[0].startswith("Best: trial 1  val_loss 0.3000")
    assert best_summary(study)[1].startswith("Recommended: trial 1")
    assert build_report(study)["best"]["trial"] == 1
    status = study_status(study, 6)
    assert (status["best"], status["recommended"]) == (1, 1)
    assert record_answer(study, "1se").best.number == 1 and study.user_attrs["best_trial"] == 1
    screen = io.StringIO()
    view = LiveView(Console(file=screen, force_terminal=True, width=200))
    view.study_started(study, 6)
    view.close()
    assert "best so far: trial 1 val_loss 0.3000" in screen.getvalue()
    # the counts and what is left: the live view's are status's
    assert _counts(study, 6) == {"COMPLETE": 3, "PRUNED": 1, "FAIL": 0, "to go": 2}
    assert status["to_go"] == 2 and status["counts"]["complete"] == 3
