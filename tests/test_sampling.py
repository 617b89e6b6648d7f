"""Samplers and pruners from the study file: the informed first trial and the derived rung."""

from __future__ import annotations

import math

import pytest

from ranksearch.config import SearchConfig
from ranksearch.sampling import informed_params

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
