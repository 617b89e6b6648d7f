"""Parameter importances only from enough trained complete trials: what `report`, its plots
and its HTML figures show."""

from __future__ import annotations

import itertools

import optuna
from optuna.distributions import CategoricalDistribution

from ranksearch.answer.figures import figures
from ranksearch.answer.importance import MIN_TRIALS, study_importances
from ranksearch.answer.plots import make_plots
from ranksearch.answer.report import build_report
from ranksearch.answer.text import summary_lines

from ..conftest import config_attr

DISTS = {
    "rank": CategoricalDistribution([4, 8, 16, 32]),
    "learning_rate": CategoricalDistribution([3e-4, 1e-3, 3e-3]),
}
GRID = list(itertools.product([4, 8, 16, 32], [3e-4, 1e-3, 3e-3]))  # 12 configurations


def _study(n: int, duplicates: int = 0) -> optuna.Study:
    """n trained complete trials of the grid (val loss set by the learning rate), then
    `duplicates` replays of the first one."""
    study = optuna.create_study()
    for i, (rank, lr) in enumerate(GRID[:n]):
        params = {"rank": rank, "learning_rate": lr}
        value = {3e-4: 0.5, 1e-3: 0.3, 3e-3: 0.4}[lr] + 0.001 * i
        attrs = {"config": config_attr(rank, learning_rate=lr)}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=DISTS, value=value, user_attrs=attrs
            )
        )
    first = study.trials[0]
    for _ in range(duplicates):
        study.add_trial(
            optuna.trial.create_trial(
                params=first.params,
                distributions=DISTS,
                value=first.value,
                user_attrs={**first.user_attrs, "duplicate_of": 0},
            )
        )
    return study


def test_no_importances_from_fewer_complete_trials_than_the_threshold(tmp_path):
    study = _study(MIN_TRIALS - 1)
    report = build_report(study)
    assert report["importances"] is None
    said = f"not shown below {MIN_TRIALS} complete trials ({MIN_TRIALS - 1} so far)"
    assert any(said in line for line in summary_lines(report))
    made = make_plots(study, tmp_path)
    assert not (tmp_path / "importances.png").exists() and made
    assert "importances" not in figures(study)


def test_replayed_duplicates_do_not_reach_the_threshold():
    assert study_importances(_study(MIN_TRIALS - 1, duplicates=3).trials) is None


def test_importances_from_enough_complete_trials_name_the_parameter_that_matters(tmp_path):
    study = _study(MIN_TRIALS)
    report = build_report(study)
    found = report["importances"]
    assert any(line.startswith("Importance:  learning_rate") for line in summary_lines(report))
    assert set(found) == {"rank", "learning_rate"} and max(found, key=found.get) == "learning_rate"
    make_plots(study, tmp_path)
    assert (tmp_path / "importances.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "importances" in figures(study)  # report.html's interactive view
