"""The confirmation round: the top configurations again, with more seeds, at the full budget.

Unlike recommend.py (the answer from one seed per trial), this retrains the top ones to be sure.

A search compares configurations on one seed each, so its winner is partly luck. Here each
candidate (the top-k by val loss, plus the recommendation) gets `seeds` samples in all: its search
trial plus `seeds - 1` new trainings with other seeds. The confirmed recommendation is the
configuration with the fewest trainable parameters that is not significantly worse than the one
with the best mean, by Welch's one-sided t-test (unequal variances) at `ALPHA`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from ranksearch.answer.recommend import answer, distinct_complete
from ranksearch.config.space import shown_config

ALPHA = 0.05
MAX_RANK_CHECKS = 2  # plain trainings of nested estimates per study (a check may move the answer)


def _checked(t: FrozenTrial) -> bool:
    """A plain check that ran: complete, or failed by itself (one stopped by Ctrl-C or by the
    study's stop is planned again by the next `run`)."""
    stopped = t.user_attrs.get("fail_reason") in ("interrupted", "study stopped")
    return "rank_check_of" in t.user_attrs and t.state.is_finished() and not stopped


def rank_check(trials: Sequence[FrozenTrial], tolerance: str | float) -> dict[str, Any] | None:
    """The plain training a nested study's answer still needs, as a `Orchestrator.confirm` job:
    the recommended rank of a nested trial trained once as an ordinary LoRA of that rank, at
    the full budget and the study's seed, so that what is exported and logged is a plain
    adapter and its loss is measured, not estimated. None when the recommendation is a trained
    configuration already, or after MAX_RANK_CHECKS checks (each may move the answer: a check
    that does worse than its estimate leaves it to another candidate)."""
    recommended = answer(trials, tolerance).recommended
    if recommended is None or "nested_rank" not in recommended.user_attrs:
        return None
    if sum(_checked(t) for t in trials) >= MAX_RANK_CHECKS:
        return None
    return {
        "params": recommended.params,
        "origin": recommended.number,
        "attrs": {
            "rank_check_of": recommended.number,
            "rank_check_rank": recommended.user_attrs["nested_rank"],
            "nested_estimate": recommended.value,
        },
    }


def candidates(
    trials: Sequence[FrozenTrial], top: int, tolerance: str | float
) -> list[FrozenTrial]:
    """The top-k distinct completed configurations by val loss, plus the recommendation."""
    complete = sorted(distinct_complete(trials), key=lambda t: (t.value, t.number))
    chosen = complete[:top]
    recommended = answer(trials, tolerance).recommended
    if recommended is not None and recommended not in chosen:
        chosen.append(recommended)
    return chosen


def samples(trials: Sequence[FrozenTrial], origin: FrozenTrial) -> dict[int, FrozenTrial]:
    """seed -> finished trial of this configuration: the search trial and its confirmations."""
    seed = origin.user_attrs.get("seed")
    found = {seed if seed is not None else -1: origin}
    for t in trials:
        if (
            t.user_attrs.get("confirmation")
            and t.user_attrs.get("confirm_of") == origin.number
            and t.state == TrialState.COMPLETE
        ):
            found[t.user_attrs["seed"]] = t
    return found


def plan(
    trials: Sequence[FrozenTrial], top: int, seeds: int, base_seed: int, tolerance: str | float
) -> list[dict[str, Any]]:
    """The trainings still missing: seeds base+1 .. base+seeds-1 for every candidate."""
    jobs = []
    for origin in candidates(trials, top, tolerance):
        have = samples(trials, origin)
        for seed in range(base_seed + 1, base_seed + seeds):
            if seed not in have:
                jobs.append({"origin": origin.number, "seed": seed, "params": origin.params})
    return jobs


def _worse_p_value(values: list[float], best: list[float]) -> float | None:
    """P(values' mean is not above the best's), Welch's one-sided t-test; None if undefined."""
    from scipy import stats

    if len(values) < 2 or len(best) < 2:
        return None
    if statistics.pstdev(values) == 0 and statistics.pstdev(best) == 0:
        return 0.0 if statistics.mean(values) > statistics.mean(best) else 1.0
    result = stats.ttest_ind(values, best, equal_var=False, alternative="greater")
    return float(result.pvalue)


def confirmed(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The configurations a confirmation round trained again (their search trials)."""
    numbers = sorted(
        {t.user_attrs["confirm_of"] for t in trials if t.user_attrs.get("confirmation")}
    )
    return [trials[n] for n in numbers]


def analyse(trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    """Mean +- std per confirmed configuration, the test against the best mean, the answer."""
    rows = []
    for origin in confirmed(trials):
        values = [t.value for t in samples(trials, origin).values()]
        rows.append(
            {
                "trial": origin.number,
                "config": shown_config(origin),
                "trainable_params": origin.user_attrs.get("trainable_params"),
                "n": len(values),
                "mean_val_loss": statistics.mean(values),
                "std_val_loss": statistics.stdev(values) if len(values) > 1 else None,
                "values": values,
            }
        )
    if not rows:
        return {"test": "welch-t one-sided", "alpha": ALPHA, "candidates": [], "recommended": None}
    best = min(rows, key=lambda r: r["mean_val_loss"])
    for r in rows:
        p = None if r is best else _worse_p_value(r["values"], best["values"])
        r["p_worse_than_best"] = p
        r["not_worse"] = r is best or (p is not None and p >= ALPHA)
    keep = [r for r in rows if r["not_worse"]]
    recommended = min(
        keep, key=lambda r: (r["trainable_params"] or float("inf"), r["mean_val_loss"])
    )
    return {
        "test": "welch-t one-sided",
        "alpha": ALPHA,
        "best_mean_trial": best["trial"],
        "candidates": rows,
        "recommended": recommended["trial"],
    }
