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
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from ranksearch.config import space
from ranksearch.config.schema import Range, SearchConfig, StudyConfig


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
    rung = min_steps(cfg)
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=rung, max_resource=t.max_steps, reduction_factor=p.reduction_factor
        )
    if p.type == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=rung, reduction_factor=p.reduction_factor
        )
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=3, n_warmup_steps=rung, interval_steps=t.eval_every
        )
    return optuna.pruners.NopPruner()


def asks_pruner(step: int, max_steps: int) -> bool:
    """Whether a report at `step` goes to the pruner: never at (or past) `training.max_steps`.

    A trial there has spent its full budget and its loss is final: it is COMPLETE. Hyperband
    places its top rung at max_steps (rungs at min_steps x reduction_factor^k, up to
    max_resource), where asked it would record PRUNED a trial that trained every step, and
    leave a finished configuration out of the answer."""
    return step < max_steps


def min_steps(cfg: StudyConfig) -> int:
    """The first rung: `pruner.min_steps`, or derived from the budget when the study leaves it
    out."""
    t, p = cfg.training, cfg.pruner
    return p.min_steps or first_rung(t.max_steps, t.eval_every, p.reduction_factor)


def space_size(cfg: StudyConfig) -> int | None:
    """Number of distinct configurations, or None when a dimension is continuous."""
    sizes = [len(d) if isinstance(d, list) else 1 for d in space.dimensions(cfg.search).values()]
    if any(
        isinstance(d, Range) and space.is_searched(d) for d in space.dimensions(cfg.search).values()
    ):
        return None
    return math.prod(sizes)


def search_budget(cfg: StudyConfig) -> int:
    """The trainings the search runs: `budget.n_trials`, capped at the size of a discrete space
    (a configuration is never trained twice, so no sampler can run more)."""
    size = space_size(cfg)
    return cfg.budget.n_trials if size is None else min(size, cfg.budget.n_trials)


# -- the informed first trial ------------------------------------------------------------------

GUIDED_RANKS = (16, 8)  # published guidance: rank 8 or 16 (16 where both are in the space)


def informed_params(search: SearchConfig) -> dict[str, Any] | None:
    """Optuna params of the configuration published LoRA guidance favours, snapped to the space:
    all-linear targets (else the largest module set), lora_alpha = 2 x rank, rank 16 or 8, and
    the middle of the learning-rate range in log space. None when no guided rank is in the space.
    Dimensions it says nothing of (dropout, ...) are left to the sampler."""
    dims = space.dimensions(search)
    ranks = search.rank if search.rank_mode == "nested" else dims["rank"]  # nested: all of them
    rank = next((r for r in GUIDED_RANKS if _contains(ranks, r)), None)
    if rank is None:
        return None
    sets = space.module_sets(search)
    modules = max(sets, key=lambda n: math.inf if sets[n] == "all-linear" else len(sets[n]))
    values: dict[str, Any] = {"rank": rank, "target_modules": modules}
    if "alpha_ratio" in dims:
        values["alpha_ratio"] = _snap(dims["alpha_ratio"], 2.0)
    else:
        values["alpha"] = _snap(dims["alpha"], 2.0 * rank)
    lr = dims["learning_rate"]
    ends = [lr.low, lr.high] if isinstance(lr, Range) else lr if isinstance(lr, list) else [lr]
    values["learning_rate"] = _snap(lr, math.sqrt(min(ends) * max(ends)))
    return {space.PARAM_NAMES[k]: v for k, v in values.items() if space.is_searched(dims[k])}


def informed_start(cfg: StudyConfig) -> dict[str, Any] | None:
    """The informed first trial's params when the study wants one: `sampler.informed_start` on
    and a TPE sampler (random search stays random; a grid runs every point anyway)."""
    if not cfg.sampler.informed_start or cfg.sampler.type != "tpe":
        return None
    return informed_params(cfg.search)


def _contains(dim: Any, value: float) -> bool:
    if isinstance(dim, Range):
        on_step = dim.step is None or (value - dim.low) % dim.step == 0
        return dim.low <= value <= dim.high and on_step
    return value in (dim if isinstance(dim, list) else [dim])


def _snap(dim: Any, value: float) -> Any:
    """The space's value nearest `value` in log scale (a range: clamped into it)."""
    if isinstance(dim, Range):
        return min(max(value, dim.low), dim.high)
    choices = dim if isinstance(dim, list) else [dim]
    return min(choices, key=lambda c: abs(math.log(c / value)))


def first_rung(max_steps: int, eval_every: int, reduction_factor: int) -> int:
    """The first rung when a study does not set `pruner.min_steps`: max_steps / reduction_factor
    at the evaluation step nearest it (half-way: the later one), never before the first report.

    Measured on BENCHMARKS.md's four replayed grids ("Where the first rung goes"): a rung at a
    fifth of the budget cut eventual winners on the three MiniLM grids, where 40 of 100 steps
    (100 / 3 = 33 -> 40) did best; on the decoder SFT grid (40 steps, a report every 10) the
    curves cross at step 20, and step 10 (40 / 3 = 13 -> 10) did best, where rounding up to
    step 20 did worst. `validate` warns when a study's own curves disagree with its rung."""
    steps = max(1, math.floor(max_steps / reduction_factor / eval_every + 0.5)) * eval_every
    return min(max_steps, steps)


# below this rank correlation between first-rung and final val loss, the first rung came before
# the curves separated. On BENCHMARKS.md's SST-2 grids (all 36 configurations) it is 0.76 and
# 0.87 at a 20 % rung; a study's complete trials are the ones pruning kept, whose range is
# narrower and correlation lower, so the bar sits well below those.
MIN_RUNG_CORRELATION = 0.5
MIN_RUNG_TRIALS = 6


def rung_agreement(trials: Sequence[FrozenTrial], rung: int) -> tuple[float, int] | None:
    """Spearman's rank correlation between val loss at the first rung (the last report at or
    before it) and at the end, over the trained complete search trials; with their count.
    None with fewer than MIN_RUNG_TRIALS of them."""
    from scipy.stats import spearmanr

    pairs = []
    for t in trials:
        if (
            t.state != TrialState.COMPLETE
            or "duplicate_of" in t.user_attrs
            or t.user_attrs.get("confirmation")
        ):
            continue
        early = [step for step in t.intermediate_values if step <= rung]
        if early:
            pairs.append((t.intermediate_values[max(early)], t.value))
    if len(pairs) < MIN_RUNG_TRIALS:
        return None
    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs])[0]
    return (float(rho), len(pairs)) if math.isfinite(rho) else None


def rung_warning(cfg: StudyConfig, trials: Sequence[FrozenTrial]) -> str | None:
    """A warning when this study's own trials say its first rung prunes too early."""
    if cfg.pruner.type == "none":
        return None
    rung = min_steps(cfg)
    found = rung_agreement(trials, rung)
    if found is None or found[0] >= MIN_RUNG_CORRELATION:
        return None
    rho, n = found
    later = min(cfg.training.max_steps, 2 * rung)
    return (
        f"`pruner.min_steps`: on this study's {n} complete trials, val loss at the first rung "
        f"(step {rung}) ranks them unlike their final val loss (Spearman {rho:.2f} < "
        f"{MIN_RUNG_CORRELATION}): the learning curves have not separated yet there, so pruning "
        f"at that rung cuts configurations that would have won. Raise it (e.g. "
        f"--set pruner.min_steps={later}) for a new study"
    )
