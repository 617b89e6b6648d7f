"""Samplers and pruners from the study file.

Every sampler is seeded per trial: the draws of trial n depend on (seed, n) only. One process
reproduces the same study from the same seed, and several processes on one study (each asking
for different trial numbers) do not all propose the same configurations, as one shared seed
would make them.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial

from ranksearch import space
from ranksearch.config import StudyConfig


class TrialSeeded(optuna.samplers.BaseSampler):
    """Wraps an Optuna sampler; reseeds its random state from (seed, trial number[, param])."""

    def __init__(self, inner: optuna.samplers.BaseSampler, seed: int):
        self.inner = inner
        self.seed = seed

    def _reseed(self, trial: FrozenTrial, name: str = "") -> None:
        value = zlib.crc32(f"{self.seed}:{trial.number}:{name}".encode())
        # TPE and the random, grid and brute-force samplers draw from these states
        for owner in (self.inner, getattr(self.inner, "_random_sampler", None)):
            rng = getattr(owner, "_rng", None)
            if rng is not None:
                rng.rng.seed(value)

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self._reseed(trial)  # before the relative (joint) draw of this trial
        self.inner.before_trial(study, trial)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        self._reseed(trial, param_name)
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def create_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    if s.type == "grid":
        inner = optuna.samplers.GridSampler(space.grid(cfg.search))
    elif s.type == "bruteforce":
        inner = optuna.samplers.BruteForceSampler()
    elif s.type == "random":
        inner = optuna.samplers.RandomSampler()
    else:
        with warnings.catch_warnings():  # multivariate TPE is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # multivariate: rank, alpha and learning rate interact; model them jointly.
            # constant_liar: trials running elsewhere count as bad, so parallel workers
            # spread out instead of all proposing the same point.
            inner = optuna.samplers.TPESampler(
                n_startup_trials=s.n_startup_trials, multivariate=True, constant_liar=True
            )
    return TrialSeeded(inner, s.seed)


def create_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """Pruners whose resource is optimizer steps, taken from the study file (never `auto`)."""
    p, t = cfg.pruner, cfg.training
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_steps, max_resource=t.max_steps, reduction_factor=p.reduction_factor
        )
    if p.type == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_steps, reduction_factor=p.reduction_factor
        )
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=3, n_warmup_steps=p.min_steps, interval_steps=t.eval_every
        )
    return optuna.pruners.NopPruner()


def space_size(cfg: StudyConfig) -> int | None:
    """Number of distinct configurations, or None when a dimension is continuous."""
    sizes = [len(d) if isinstance(d, list) else 1 for d in space.dimensions(cfg.search).values()]
    if any(
        isinstance(d, space.Range) and space.is_searched(d)
        for d in space.dimensions(cfg.search).values()
    ):
        return None
    return math.prod(sizes)


def search_budget(cfg: StudyConfig) -> int:
    """The trials the search runs: `budget.n_trials`, capped at the size of the space for a
    grid or brute-force sampler (they cannot run more distinct configurations)."""
    size = space_size(cfg)
    if cfg.sampler.type in ("grid", "bruteforce") and size is not None:
        return min(size, cfg.budget.n_trials)
    return cfg.budget.n_trials
