"""Search space -> Optuna -> LoRA configuration."""

import optuna
import pytest

from ranksearch.config import SearchConfig
from ranksearch.space import (
    config_key,
    distributions,
    enqueue_params,
    grid,
    lora_kwargs,
    resolve,
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
    assert config["lora_alpha"] == 16 and config["modules"] == "all-linear"
    assert config["lora_dropout"] == 0.1


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
    assert (config["rank"], config["lora_alpha"]) == (4, 32)


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
