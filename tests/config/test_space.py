"""Search space -> Optuna -> LoRA configuration."""

import dataclasses
import json

import optuna
import pytest

from ranksearch.config.schema import SearchConfig
from ranksearch.config.space import (
    TrialConfig,
    config_key,
    distributions,
    enqueue_params,
    grid,
    lora_kwargs,
    resolve,
    shown_config,
    suggest,
)


def _trial(params: dict | None = None) -> optuna.Trial:
    study = optuna.create_study()
    if params:
        study.enqueue_trial(params)
    return study.ask()


def test_searched_dims_reach_optuna_and_fixed_ones_do_not():
    search = SearchConfig(
        rank=[4, 8],
        alpha_ratio=[1, 2],
        dropout=0.1,
        target_modules={"qv": ["query", "value"], "all": "all-linear"},
    )
    trial = _trial({"rank": 8, "alpha_ratio": 2, "target_modules": "all"})
    config = suggest(trial, search)
    assert set(trial.params) == {"rank", "alpha_ratio", "target_modules", "learning_rate"}
    assert trial.distributions["target_modules"].choices == ("qv", "all")  # string keys
    assert config.lora_alpha == 16 and config.modules == "all-linear"
    assert config.lora_dropout == 0.1


@pytest.mark.parametrize(
    "search",
    [
        SearchConfig(),
        SearchConfig(rank={"low": 2, "high": 64, "step": 2}, alpha=[8, 16], use_dora=[True, False]),
        SearchConfig(dropout={"low": 0.0, "high": 0.2, "step": 0.05}, learning_rate=[1e-4, 1e-3]),
    ],
)
def test_distributions_are_what_suggest_asks(search):
    """The resume check compares a study's trials with `distributions`: it must match."""
    trial = _trial()
    suggest(trial, search)
    assert trial.distributions == distributions(search)


def test_alpha_defaults_to_ratio_1_or_2_and_absolute_alpha_works():
    trial = _trial()
    suggest(trial, SearchConfig())
    assert trial.distributions["alpha_ratio"].choices == (1, 2)
    config = suggest(_trial({"lora_alpha": 32}), SearchConfig(alpha=[16, 32], rank=4))
    assert (config.rank, config.lora_alpha) == (4, 32)


def test_lora_kwargs_build_a_real_lora_config():
    from peft import LoraConfig

    values = {
        "rank": 16,
        "alpha_ratio": 0.5,
        "dropout": 0.05,
        "target_modules": "qv",
        "learning_rate": 1e-3,
        "use_rslora": True,
        "use_dora": False,
        "init_lora_weights": "gaussian",
    }
    config = resolve(SearchConfig(target_modules={"qv": ["query", "value"]}), values)
    lora = LoraConfig(**lora_kwargs(config, "sequence-classification"))
    assert (lora.r, lora.lora_alpha, lora.use_rslora) == (16, 8, True)
    assert lora.target_modules == {"query", "value"}


def test_grid_lists_only_searched_dims():
    search = SearchConfig(rank=[4, 8, 16, 32], alpha_ratio=2, learning_rate=1e-3)
    assert grid(search) == {"rank": [4, 8, 16, 32]}


def test_enqueue_alpha_is_converted_to_the_ratio_the_space_searches():
    search = SearchConfig(rank=[4, 8], alpha_ratio=[1, 2])
    assert enqueue_params(search, {"rank": 8, "alpha": 8}) == {"rank": 8, "alpha_ratio": 1.0}


@pytest.mark.parametrize("lr", [1e-3, 1.0000000001e-3])
def test_config_key_identifies_the_same_fine_tune(lr):
    search = SearchConfig()
    base = {
        "rank": 8,
        "alpha_ratio": 2,
        "dropout": 0.0,
        "target_modules": "qv",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    a = resolve(search, {**base, "learning_rate": 1e-3})
    b = resolve(search, {**base, "learning_rate": lr})
    c = resolve(search, {**base, "learning_rate": 1e-3, "rank": 4})
    assert config_key(a) == config_key(b) != config_key(c)


# a configuration as the orchestrator stores it (the user attribute `config`)
STORED = {
    "rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": "qv",
    "modules": ["query", "value"],
    "learning_rate": 0.001,
    "use_rslora": False,
    "use_dora": True,
    "init_lora_weights": "gaussian",
}


def _stored(config: dict | None) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(value=0.5, user_attrs={"config": config} if config else {})


def test_a_trial_config_round_trips_through_the_stored_attribute_unchanged():
    """Studies on disk hold this format: `as_attr` must write the same keys, values, order."""
    config = TrialConfig.of(_stored(STORED))
    assert config.modules == ("query", "value")  # immutable inside
    assert config.as_attr() == STORED and list(config.as_attr()) == list(STORED)
    assert json.dumps(config.as_attr()) == json.dumps(STORED)
    assert TrialConfig.of(_stored(config.as_attr())) == config


def test_resolve_stores_what_it_always_stored():
    search = SearchConfig(target_modules={"qv": ["query", "value"]})
    values = {"rank": 8, "alpha_ratio": 2, "dropout": 0.05, "target_modules": "qv",
              "learning_rate": 1e-3, "use_rslora": False, "use_dora": True,
              "init_lora_weights": "gaussian"}  # fmt: skip
    assert json.dumps(resolve(search, values).as_attr()) == json.dumps(STORED)


def test_a_trial_without_a_config_has_none_and_shows_blank():
    assert TrialConfig.of(_stored(None)) is None
    assert shown_config(_stored(None)) == {}


def test_a_trial_config_is_frozen():
    config = TrialConfig.of(_stored(STORED))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 4  # type: ignore[misc]


def test_shown_drops_only_the_module_names():
    config = TrialConfig.of(_stored(STORED))
    assert config.shown() == {k: v for k, v in STORED.items() if k != "modules"}
    assert shown_config(_stored(STORED)) == config.shown()


def test_config_key_is_the_string_benchmark_tables_key_on():
    """Stored as `config_key` and in benchmarks/results: this exact string must not change."""
    config = TrialConfig.of(_stored({**STORED, "learning_rate": 0.0010000000001}))
    assert config_key(config) == (
        '{"init_lora_weights": "gaussian", "learning_rate": 0.001, "lora_alpha": 16, '
        '"lora_dropout": 0.05, "rank": 8, "target_modules": "qv", "use_dora": true, '
        '"use_rslora": false}'
    )


def test_lora_kwargs_give_peft_module_names_as_a_list():
    kwargs = lora_kwargs(TrialConfig.of(_stored(STORED)), "causal-lm")
    assert kwargs["target_modules"] == ["query", "value"] and kwargs["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize(
    "alpha, alphas",
    [({"alpha_ratio": 2}, [8, 16, 32, 64]), ({"alpha": 16}, [16, 16, 16, 16])],
    ids=["ratio", "absolute"],
)
def test_a_nested_space_trains_the_largest_rank_and_gives_each_rank_its_alpha(alpha, alphas):
    from ranksearch.config.space import at_rank, nested_spec

    search = SearchConfig(rank=[16, 4, 32, 8], rank_mode="nested", **alpha)
    assert "rank" not in distributions(search) and "rank" not in grid(search)
    config = suggest(_trial(), search)
    assert config.rank == 32
    assert nested_spec(search, config) == {
        "ranks": [4, 8, 16, 32], "alphas": alphas, "sampling": "by-rank"
    }  # fmt: skip
    r8 = at_rank(config, 8, search)
    assert (r8.rank, r8.lora_alpha) == (8, alphas[1])
    assert nested_spec(SearchConfig(rank=[4, 8]), config) is None  # plain


def test_a_nested_space_refuses_what_its_ranks_cannot_be(tmp_path):
    from ranksearch.config.schema import StudyConfig
    from ranksearch.config.space import space_problems

    def problems(**search):
        cfg = StudyConfig(study_name="s", model="m", data={"source": "d.csv", "text_column": "t"},
                          search={"rank_mode": "nested", **search})  # fmt: skip
        return {p.key: p.message for p in space_problems(cfg)}

    assert problems() == {}
    assert "two or more" in problems(rank={"low": 4, "high": 32})["search.rank"]
    assert "two or more" in problems(rank=[8])["search.rank"]
    assert "use_dora: false" in problems(use_dora=[False, True])["search.use_dora"]
    assert (
        "init_lora_weights: true" in problems(init_lora_weights="pissa")["search.init_lora_weights"]
    )
