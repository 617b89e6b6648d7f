"""Samplers and pruners from the study file: the informed first trial and the derived rung."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from ranksearch.config import space
from ranksearch.config.load import load_study
from ranksearch.config.schema import SearchConfig, StudyConfig
from ranksearch.search.sampling import (
    create_pruner,
    create_sampler,
    first_rung,
    informed_params,
    min_steps,
    rung_agreement,
    rung_warning,
)

from ..conftest import run_cli, write_study

LINEAR = {"qv": ["query", "value"], "qkv": ["query", "key", "value"], "all-linear": "all-linear"}


def _search(**dims) -> SearchConfig:
    base = {
        "rank": [4, 8, 16, 32],
        "alpha_ratio": [1, 2],
        "target_modules": LINEAR,
        "learning_rate": {"low": 2e-4, "high": 3e-3, "log": True},
    }
    return SearchConfig.model_validate({**base, **dims})


def test_the_guided_configuration_of_the_default_space():
    params = informed_params(_search())
    assert params == {
        "rank": 16,
        "alpha_ratio": 2,
        "target_modules": "all-linear",
        "learning_rate": pytest.approx(math.sqrt(2e-4 * 3e-3)),
    }


def test_it_snaps_to_the_spaces_values():
    params = informed_params(
        _search(
            rank=[4, 8, 32],  # no 16: rank 8
            alpha_ratio=[0.5, 1, 8],  # no 2: the nearest in log scale
            target_modules={"qv": ["query", "value"], "qkv": ["query", "key", "value"]},
            learning_rate=[3e-4, 1e-3, 3e-3],  # the choice nearest the log-middle, 9.5e-4
        )
    )
    assert params == {
        "rank": 8,
        "alpha_ratio": 1,
        "target_modules": "qkv",  # no all-linear set: the largest one
        "learning_rate": 1e-3,
    }


def test_absolute_alpha_and_ranges_are_snapped_too():
    params = informed_params(
        _search(
            rank={"low": 2, "high": 12},
            alpha_ratio=None,
            alpha=[8, 24, 64],
            learning_rate={"low": 1e-4, "high": 1e-2, "log": True},
        )
    )
    assert params["rank"] == 8 and params["lora_alpha"] == 24  # nearest 2 x 8 in log scale
    assert params["learning_rate"] == pytest.approx(1e-3)


def test_fixed_dimensions_are_not_enqueued_and_a_space_without_a_guided_rank_has_none():
    params = informed_params(_search(rank=16, alpha_ratio=2, learning_rate=5e-4))
    assert params == {"target_modules": "all-linear"}
    assert informed_params(_search(rank=[32, 64])) is None
    assert informed_params(_search(rank={"low": 4, "high": 20, "step": 8})) is None  # 4, 12, 20


def test_the_first_rung_is_derived_from_the_budget_when_not_set(tmp_path):
    assert first_rung(100, 20, 3) == 40  # a third (33), at the nearest evaluation step
    assert first_rung(40, 10, 3) == 10  # 13 -> 10: the decoder grid's curves cross at 20
    assert first_rung(300, 25, 3) == 100
    assert first_rung(60, 20, 2) == 40  # half-way between two reports: the later one
    assert first_rung(12, 5, 2) == 5  # half of 12 is 6: the report at 5 is nearest
    assert first_rung(30, 20, 3) == 20  # never before the first report
    assert first_rung(10, 20, 3) == 10  # never past max_steps
    cfg = load_study(
        write_study(tmp_path / "s.yaml", tmp_path, tmp_path / "d.csv", pruner={"type": "hyperband"})
    )[0]
    assert cfg.pruner.min_steps is None and min_steps(cfg) == 4  # max_steps 12, eval_every 2
    pruner = create_pruner(cfg)
    assert pruner._min_resource == 4 and pruner._max_resource == 12
    cfg = cfg.model_copy(update={"pruner": cfg.pruner.model_copy(update={"min_steps": 6})})
    assert min_steps(cfg) == 6 and create_pruner(cfg)._min_resource == 6


def _complete(number: int, early: float, final: float) -> optuna.trial.FrozenTrial:
    t = create_trial(
        value=final,
        params={"rank": 4},
        distributions={"rank": CategoricalDistribution([4, 8])},
        intermediate_values={2: early + 0.1, 4: early, 8: (early + final) / 2, 12: final},
    )
    t.number = number
    return t


# first-rung (step 4) and final val loss of 8 trials: the curves cross after the rung
CROSSING = [(0.60 + 0.01 * i, 0.40 - 0.01 * i) for i in range(8)]
SEPARATED = [(0.60 + 0.01 * i, 0.40 + 0.01 * i) for i in range(8)]


def test_a_first_rung_before_the_curves_separate_is_flagged():
    raw = {"model": "m", "data": {"source": "d"}, "training": {"max_steps": 12, "eval_every": 2}}
    cfg = StudyConfig.model_validate({"study_name": "s", **raw})
    crossing = [_complete(i, e, f) for i, (e, f) in enumerate(CROSSING)]
    rho, n = rung_agreement(crossing, 4)
    assert rho == pytest.approx(-1.0) and n == 8
    warning = rung_warning(cfg, crossing)
    assert "`pruner.min_steps`" in warning and "Spearman -1.00" in warning
    assert "--set pruner.min_steps=8" in warning
    assert rung_warning(cfg, [_complete(i, e, f) for i, (e, f) in enumerate(SEPARATED)]) is None
    assert rung_agreement(crossing[:5], 4) is None  # too few trials to say
    off = StudyConfig.model_validate({"study_name": "s", **raw, "pruner": "none"})
    assert rung_warning(off, crossing) is None  # nothing is pruned


@pytest.mark.e2e
def test_validate_warns_on_a_resumed_study_whose_first_rung_is_too_early(
    tmp_path, tiny_bert, sentiment_csv
):
    pruner = {"type": "hyperband", "reduction_factor": 3}  # derived first rung: step 4
    study_file = write_study(tmp_path / "rung.yaml", tiny_bert, sentiment_csv, pruner=pruner)
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(study_name="rung", storage=f"sqlite:///{out / 'optuna.db'}")
    for i, (early, final) in enumerate(CROSSING):
        study.add_trial(_complete(i, early, final))
    r = run_cli("validate", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: `pruner.min_steps`: on this study's 8 complete trials" in r.stdout
    r = run_cli(
        "validate", "--study", str(study_file), "--out", str(tmp_path / "new"), cwd=tmp_path
    )
    assert r.returncode == 0 and "pruner.min_steps" not in r.stdout  # a new study: no trials


def test_tpe_under_hyperband_learns_from_every_bracket(tmp_path):
    """One model across Hyperband's brackets (BOHB's idea). Optuna hands the sampler a per-bracket
    view of the study, but TPE reads the trials through `Study._get_trials`, which that view does
    not filter: given the same history, TPE proposes the same configurations under ranksearch's
    Hyperband as with no pruner. Should Optuna start filtering, TPE in a 12-trial study would
    model three or four trials per bracket and draw almost at random."""
    cfg = load_study(write_study(tmp_path / "s.yaml", tmp_path, tmp_path / "d.csv"))[0]
    cfg = cfg.model_copy(
        update={
            "pruner": cfg.pruner.model_copy(update={"min_steps": 2, "reduction_factor": 2}),
            "sampler": cfg.sampler.model_copy(update={"n_startup_trials": 3}),
        }
    )

    def search(pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, list[dict]]:
        study = optuna.create_study(
            study_name="brackets", sampler=create_sampler(cfg), pruner=pruner
        )
        drawn = []
        for _ in range(12):
            trial = study.ask()
            drawn.append(space.suggest(trial, cfg.search))
            # a loss that depends on the configuration; one report before the first rung
            loss = drawn[-1].rank / 100 + abs(math.log10(drawn[-1].learning_rate) + 3)
            trial.report(loss + 1, step=1)
            assert not trial.should_prune()
            study.tell(trial, loss)
        return study, drawn

    hyperband = create_pruner(cfg)
    study, drawn = search(hyperband)
    brackets = {hyperband._get_bracket_id(study, t) for t in study.trials}
    assert hyperband._n_brackets == 3 and len(brackets) > 1  # the trials span brackets
    assert len({str(d) for d in drawn}) > 3  # TPE explored, past its start-up trials
    assert drawn == search(optuna.pruners.NopPruner())[1]
