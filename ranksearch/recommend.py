"""The answer of a study: the best trial, and the smallest configuration as good as the best.

Unlike report.py (tables and JSON for people) and confirm.py (more seeds), this only decides.

"As good as the best" is the one-standard-error rule (Hastie, Tibshirani and Friedman, The
Elements of Statistical Learning, 7.10): among completed configurations whose val loss is within
one standard error of the best's, take the one with the fewest trainable parameters. The standard
error is that of the best trial's mean validation loss (per-example loss std / sqrt(n)), so the
margin shrinks with a larger validation split and grows with a noisier task. A study may set an
absolute margin instead (`report.tolerance: 0.01`).

Pure functions over Optuna's FrozenTrials: no storage, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

FALLBACK_RELATIVE_TOLERANCE = 0.01  # when a trial carries no standard error


@dataclass(frozen=True)
class Answer:
    best: FrozenTrial | None
    recommended: FrozenTrial | None
    tolerance: float | None  # absolute val-loss margin used
    tolerance_rule: str  # "1se", "absolute" or "relative"
    candidates: list[int]  # trial numbers within the margin


def accuracy(values: dict[str, Any]) -> float | None:
    """The accuracy a trial's row shows: the classifier's, or for a causal LM trained on
    completions its answer accuracy (every completion token the teacher-forced argmax)."""
    return values.get("accuracy", values.get("answer_accuracy"))


def count_states(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials per state (lower-case names); confirmation trainings under `confirmation` only,
    since they are outside the search and its budget."""
    counts = {s.name.lower(): 0 for s in TrialState}
    counts["confirmation"] = 0
    for t in trials:
        counts["confirmation" if t.user_attrs.get("confirmation") else t.state.name.lower()] += 1
    return counts


def distinct_complete(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials that were actually trained (replayed duplicates point to these)."""
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and "duplicate_of" not in t.user_attrs
        and not t.user_attrs.get("confirmation")
    ]


def margin(best: FrozenTrial, tolerance: str | float) -> tuple[float, str]:
    if not isinstance(tolerance, str):
        return float(tolerance), "absolute"
    se = best.user_attrs.get("val_loss_se")
    if se is not None:
        return float(se), "1se"
    return abs(best.value) * FALLBACK_RELATIVE_TOLERANCE, "relative"


def best_of(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The study's best trial, the one every command names (`run`, the live view, `report`,
    `status`, MLflow): the lowest val loss among trained search trials, earliest on ties.
    Confirmation re-runs are left out (they train a candidate again with another seed)."""
    complete = distinct_complete(trials)
    return min(complete, key=lambda t: (t.value, t.number)) if complete else None


def progress(trials: Sequence[FrozenTrial], budget: int) -> dict[str, int]:
    """Trials per state (count_states) and `to_go`: search trials not yet started, so that
    finished + running + to go = the budget (`view` and `status` show these)."""
    counts = count_states(trials)
    started = counts["complete"] + counts["pruned"] + counts["running"]
    return {**counts, "to_go": max(0, budget - started)}


def answer(trials: Sequence[FrozenTrial], tolerance: str | float = "1se") -> Answer:
    best = best_of(trials)
    if best is None:
        return Answer(None, None, None, "", [])
    complete = distinct_complete(trials)
    delta, rule = margin(best, tolerance)
    within = [t for t in complete if t.value <= best.value + delta]
    # fewest trainable parameters; among equals the lower loss, then the earlier trial
    recommended = min(
        within,
        key=lambda t: (t.user_attrs.get("trainable_params", float("inf")), t.value, t.number),
    )
    return Answer(best, recommended, delta, rule, sorted(t.number for t in within))


def baselines(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials of the study file's `enqueue:` list (Optuna marks enqueued trials)."""
    return [
        t
        for t in trials
        if "fixed_params" in t.system_attrs
        and "retry_of" not in t.user_attrs
        and not t.user_attrs.get("confirmation")
    ]


def rank_view(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """Per rank tried: how good it got and what it cost, to see where gains plateau."""
    by_rank: dict[int, list[FrozenTrial]] = {}
    for t in trials:
        rank = t.user_attrs.get("config", {}).get("rank")
        if (
            rank is not None
            and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and "duplicate_of" not in t.user_attrs
        ):
            by_rank.setdefault(rank, []).append(t)
    rows, previous = [], None
    for rank in sorted(by_rank):
        group = by_rank[rank]
        complete = [t for t in group if t.state == TrialState.COMPLETE]
        best = min(complete, key=lambda t: t.value) if complete else None
        row = {
            "rank": rank,
            "trials": len(group),
            "complete": len(complete),
            "best_val_loss": best.value if best else None,
            "best_accuracy": accuracy(best.user_attrs) if best else None,
            "best_trial": best.number if best else None,
            "mean_seconds": sum(t.user_attrs.get("wall_seconds", 0) for t in group) / len(group),
            "gain_vs_previous_rank": (previous - best.value)
            if best and previous is not None
            else None,
        }
        previous = best.value if best else previous
        rows.append(row)
    return rows


def cost(t: FrozenTrial) -> dict[str, Any]:
    """What a configuration costs: parameters, adapter size, memory, time per step."""
    a = t.user_attrs
    steps = a.get("last_step") or 0
    trainable = a.get("trainable_params")
    return {
        "trainable_params": trainable,
        "trainable_fraction": a.get("trainable_fraction"),
        "adapter_mb": trainable * 4 / 2**20 if trainable else None,  # fp32 safetensors
        "peak_memory_mb": a.get("peak_memory_mb"),
        "seconds_per_step": a["train_seconds"] / steps
        if a.get("train_seconds") and steps
        else None,
    }
