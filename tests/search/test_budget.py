"""The budget in compute (search/budget.py): the study-file keys, the rules on synthetic trial
lists, and a real study that stops on `budget.full_trials`."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial
from pydantic import ValidationError

from ranksearch.config.schema import BudgetConfig, StudyConfig
from ranksearch.search import budget

from ..conftest import run_cli, write_study

MAX = 100


def _trial(number: int, state: TrialState, steps: int, value: float | None = None, **attrs):
    """A search trial that reported every 20 steps up to `steps`, ending at `value`."""
    curve = {s: 1.0 - s / 1000 for s in range(20, steps + 1, 20)}
    if value is not None:
        curve[steps] = value
    t = create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"c": 0},
        distributions={"c": CategoricalDistribution([0])},
        intermediate_values=curve,
        user_attrs=attrs,
    )
    t.number = number
    return t


def _losses(mean: float, n: int = 100, spread: float = 0.2) -> list[float]:
    """Per-example losses with this mean, the same shape on every call (so pairs are tight)."""
    return [mean + spread * math.sin(i) for i in range(n)]


def _complete(number: int, value: float, **attrs) -> FrozenTrial:
    return _trial(number, TrialState.COMPLETE, MAX, value, val_losses=_losses(value), **attrs)


def _cfg(**budget_keys) -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "study_name": "s",
            "model": "m",
            "data": {"source": "d"},
            "search": {
                "rank": [4, 8],
                "alpha_ratio": 2,
                "target_modules": {"qv": ["q", "v"]},
                "learning_rate": [1e-3, 3e-3],
            },  # fmt: skip
            "training": {"max_steps": MAX, "eval_every": 20},
            "budget": budget_keys,
        }
    )


def test_the_budget_keys_default_off_and_refuse_a_non_positive_compute():
    b = BudgetConfig()
    assert b.full_trials is None and b.stop_when_converged is False and b.n_trials == 20
    assert BudgetConfig(full_trials=2.5).full_trials == 2.5
    with pytest.raises(ValidationError, match="full_trials"):
        BudgetConfig(full_trials=0)
    with pytest.raises(ValidationError, match="stop_when_converged"):
        BudgetConfig(stop_when_converged="sometimes")


def test_compute_counts_steps_trained_and_nothing_for_replays_or_confirmations():
    trials = [
        _complete(0, 0.5),
        _trial(1, TrialState.PRUNED, 40),
        _complete(2, 0.5, duplicate_of=0),  # answered from trial 0's result
        _complete(3, 0.45, confirmation=True),  # outside the search
        _trial(4, TrialState.RUNNING, 60),  # so far
        _trial(5, TrialState.WAITING, 0),
    ]
    assert [budget.trial_steps(t) for t in trials] == [100, 40, 0, 0, 60, 0]
    assert budget.full_trials_spent(trials, MAX) == pytest.approx(2.0)


def test_a_new_best_within_the_paired_noise_is_no_gain():
    best = _complete(0, 0.50)
    # the same shape per example: the paired standard error is ~0, any real drop counts
    assert budget.improves(_complete(1, 0.49), best)
    noisy = _complete(2, 0.49)
    noisy.user_attrs["val_losses"] = [x + 0.3 * (-1) ** i for i, x in enumerate(_losses(0.49))]
    assert budget.paired_se(noisy, best) > 0.01 and not budget.improves(noisy, best)
    # without per-example losses: the means' standard errors
    a = _trial(3, TrialState.COMPLETE, MAX, 0.49, val_loss_se=0.02)
    b = _trial(4, TrialState.COMPLETE, MAX, 0.50, val_loss_se=0.02)
    assert not budget.improves(a, b) and budget.improves(a, b, z=0.0)


def test_a_study_converges_after_two_full_trials_without_a_real_gain():
    trials = [_complete(0, 0.50), _trial(1, TrialState.PRUNED, 40)]
    assert budget.last_gain(trials, MAX) == 1.0 and not budget.converged(trials, MAX)
    trials.append(_complete(2, 0.55))  # worse: 2.4 spent, 1.4 since the gain
    assert not budget.converged(trials, MAX)
    trials.append(_trial(3, TrialState.PRUNED, 60))  # 3.0 spent: 2.0 since the gain
    assert budget.converged(trials, MAX)
    trials.append(_complete(4, 0.40))  # a real gain starts the count again
    assert budget.last_gain(trials, MAX) == pytest.approx(4.0)
    assert not budget.converged(trials, MAX)
    # a running trial's steps do not count as finished compute
    assert not budget.converged([_trial(0, TrialState.RUNNING, 100)] * 3, MAX)


def test_stop_reason_names_the_rule_that_ends_the_search():
    trials = [_complete(0, 0.5), _trial(1, TrialState.PRUNED, 40), _complete(2, 0.6)]
    assert budget.stop_reason(trials, _cfg()) is None  # n_trials only
    assert "budget.full_trials" in budget.stop_reason(trials, _cfg(full_trials=2.4))
    assert budget.stop_reason(trials, _cfg(full_trials=2.5)) is None
    assert budget.stop_reason(trials, _cfg(stop_when_converged=True)) is None  # 1.4 since
    trials.append(_trial(3, TrialState.PRUNED, 60))
    assert "converged" in budget.stop_reason(trials, _cfg(stop_when_converged=True))
    line = budget.compute_line(trials, _cfg(full_trials=6))
    assert line == "compute: 3.00 full trials of 6; the exhaustive grid: 4 full trials"


@pytest.mark.e2e
def test_run_stops_on_full_trials_and_shows_the_compute(tmp_path, tiny_bert, sentiment_csv):
    study_file = write_study(
        tmp_path / "tiny.yaml",
        tiny_bert,
        sentiment_csv,
        search={
            "rank": [2, 4, 8],
            "alpha_ratio": 2,
            "target_modules": {"qv": ["query", "value"]},
            "learning_rate": [1e-3, 1e-2],
        },  # fmt: skip
        pruner={"type": "none"},  # every trial costs one full trial
        budget={"n_trials": 20, "full_trials": 2},
    )
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), "--plain", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    s = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out}/optuna.db")
    assert [t.state for t in s.trials] == [TrialState.COMPLETE] * 2
    assert "search stops: budget.full_trials: 2.00 of 2 full trials spent" in r.stdout
    assert "compute: 2.00 full trials of 2; the exhaustive grid: 6 full trials" in r.stdout
    r = run_cli("status", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert "compute: 2.00 full trials of 2" in r.stdout, r.stdout + r.stderr
