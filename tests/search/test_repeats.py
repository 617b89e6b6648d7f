"""Proposals of a finished configuration: answered without training, outside the budget, and
the end of the search once a discrete space is exhausted. The real Orchestrator loop on a real
SQLite storage; each trial's worker is a real process that reports a fixed learning curve in
place of a training run (the GPU is what this leaves out)."""

from __future__ import annotations

import io
import sys

import pytest
from optuna.trial import TrialState
from rich.console import Console

from ranksearch.answer.recommend import count_states
from ranksearch.cli.view import PlainView
from ranksearch.config import space
from ranksearch.search import repeats
from ranksearch.search.launch import LaunchPlan, WorkerProcess
from ranksearch.search.loop import Orchestrator
from ranksearch.search.supervise import TrialRun

from .test_recovery import _cfg

MODULES = {"qv": ["query", "value"], "all-linear": "all-linear"}


def _curve_worker(self: Orchestrator, trial, config: space.TrialConfig) -> TrialRun:
    """Orchestrator._launch without training: a process reports a curve set by the config."""
    folder = self.study_dir / "trials" / str(trial.number)
    folder.mkdir(parents=True)
    t = self.cfg.training
    final = 0.5 - 0.01 * config.rank - (0.05 if config.target_modules == "all-linear" else 0)
    lines = "".join(
        f'{{"step": {s}, "val_loss": {final + 0.1 / s}}}\n'
        for s in range(t.eval_every, t.max_steps + 1, t.eval_every)
    )
    script = f"open({str(folder / 'reports.jsonl')!r}, 'w').write({lines!r})"
    plan = LaunchPlan([sys.executable, "-c", script], launcher="curve worker")
    worker = WorkerProcess(plan, folder / "worker.log", folder / "reports.jsonl").start()
    return TrialRun(trial, config, worker, self.cfg, self.tracker, self.view)


def _run(tmp_path, monkeypatch, ranks: list[int], sampler: dict, n_trials: int):
    """Run a search on rank x {qv, all-linear}; its trials and what it printed."""
    monkeypatch.setattr(Orchestrator, "_launch", _curve_worker)
    cfg = _cfg(
        tmp_path,
        search={
            "rank": ranks,
            "alpha_ratio": 1,
            "dropout": 0.0,
            "target_modules": MODULES,
            "learning_rate": 1e-3,
        },
        training={"max_steps": 4, "eval_every": 2, "batch_size": 8, "seed": 0},
        pruner={"type": "none"},
        sampler=sampler,
        budget={"n_trials": n_trials},
    )
    out = io.StringIO()
    view = PlainView(Console(file=out, width=300))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = Orchestrator(cfg, tmp_path, url, None, view, "cpu").run()
    return study.get_trials(deepcopy=False), out.getvalue()


def _trained(trials) -> list:
    return [t for t in trials if "duplicate_of" not in t.user_attrs]


def test_a_discrete_space_ends_once_every_configuration_is_trained(tmp_path, monkeypatch):
    sampler = {"type": "tpe", "seed": 0, "n_startup_trials": 2, "informed_start": False}
    trials, said = _run(tmp_path, monkeypatch, [2, 4], sampler, n_trials=10)
    trained = _trained(trials)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len(trained) == 4 and len({t.user_attrs["config_key"] for t in trained}) == 4
    assert "the space has 4 configurations; budget.n_trials 10 -> 4" in said
    assert "every configuration of the search space (4) is trained" in said


def test_a_repeated_proposal_does_not_use_a_trial_of_the_budget(tmp_path, monkeypatch):
    """Random search on 8 configurations proposes one it trained (seed 3: trial 2 repeats
    trial 1), answered from the stored result; the budget still buys 5 distinct trainings."""
    sampler = {"type": "random", "seed": 3}
    trials, said = _run(tmp_path, monkeypatch, [2, 4, 8, 16], sampler, n_trials=5)
    trained, repeated = _trained(trials), [t for t in trials if "duplicate_of" in t.user_attrs]
    assert repeated, "the seed no longer proposes a finished configuration: pick another"
    assert len({t.user_attrs["config_key"] for t in trained}) == len(trained) == 5
    for t in repeated:
        twin = trials[t.user_attrs["duplicate_of"]]
        assert t.value == twin.value and t.user_attrs["config_key"] == twin.user_attrs["config_key"]
    assert not (tmp_path / "trials" / str(repeated[0].number)).exists()  # never launched
    counts = count_states(trials)
    assert (counts["complete"], counts["duplicate"]) == (5, len(repeated))
    assert "not retrained" in said


def test_proposals_of_trained_configurations_in_a_row_end_the_search(tmp_path, monkeypatch):
    monkeypatch.setattr(repeats, "MAX_REPEATS_IN_A_ROW", 1)
    sampler = {"type": "random", "seed": 3}
    trials, said = _run(tmp_path, monkeypatch, [2, 4, 8, 16], sampler, n_trials=5)
    assert "duplicate_of" in trials[-1].user_attrs and len(_trained(trials)) < 5
    assert "the sampler's last 1 proposals were configurations the study had" in said


@pytest.mark.parametrize(("ranks", "stop"), [([2, 4], True), ([2, 4, 8], False)])
def test_the_search_is_over_when_its_space_is_exhausted(tmp_path, monkeypatch, ranks, stop):
    """A 2 x 2 space with 4 trained configurations is over; a 3 x 2 one is not."""
    trials, _ = _run(tmp_path, monkeypatch, [2, 4], {"type": "grid", "seed": 0}, n_trials=4)
    (tmp_path / "other").mkdir()
    cfg = _cfg(
        tmp_path / "other",
        search={
            "rank": ranks,
            "alpha_ratio": 1,
            "dropout": 0.0,
            "target_modules": MODULES,
            "learning_rate": 1e-3,
        },  # fmt: skip
    )
    assert (repeats.search_over(cfg, trials, 0) is not None) == stop
