"""The answer of a study: the best trial, and the smallest configuration as good as the best.

Unlike report.py (tables and JSON for people) and confirm.py (more seeds), this only decides.

"As good as the best" is the one-standard-error rule (Hastie, Tibshirani and Friedman, The
Elements of Statistical Learning, 7.10): among completed configurations whose val loss is within
one standard error of the best's, take the one with the fewest trainable parameters.

Which standard error (`report.tolerance`):
- `1se` (default): that of the difference (candidate - best). Every trial is scored on the same
  validation examples, so the examples' own difficulty cancels: the paired standard error is
  std(candidate's per-example losses - best's) / sqrt(n), usually several times smaller than
  the standard error of one trial's mean. Once a confirmation round has trained configurations
  again with other seeds, their pooled seed variance is added for each of the two single-seed
  values compared: margin = sqrt(paired_se^2 + 2 * seed_std^2). A trial without per-example
  losses (recorded by workers since this rule) is compared by `1se-mean`, and the answer says so.
- `1se-mean`: the standard error of the best trial's mean val loss (per-example std / sqrt(n)),
  the same margin for every candidate (the earlier rule).
- a number: an absolute val-loss margin (`report.tolerance: 0.01`).

Only complete trials are candidates: a pruned trial (stopped before the full budget, so its
loss is not comparable) is never recommended.

Pure functions over Optuna's FrozenTrials: no storage, no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from ranksearch.answer.losses import per_example
from ranksearch.answer.nested import expand
from ranksearch.config.space import TrialConfig

FALLBACK_RELATIVE_TOLERANCE = 0.01  # when a trial carries no standard error


@dataclass(frozen=True)
class Answer:
    best: FrozenTrial | None
    recommended: FrozenTrial | None
    tolerance: float | None  # the val-loss margin the recommended trial was admitted with
    # "1se" (paired), "1se+seed" (paired, plus seed noise), "1se-mean", "absolute", "relative"
    tolerance_rule: str
    candidates: list[int]  # trial numbers within their margin
    # candidate -> its margin: a plain trial by number, a nested trial's rank as `3@r8`
    margins: dict[int | str, float] = field(default_factory=dict)
    seed_std: float | None = None  # pooled over a confirmation round's configurations
    notes: list[str] = field(default_factory=list)  # fallbacks, said in the report
    # the candidates within their margin (a nested trial's ranks one by one, nested.at_rank)
    within: list[FrozenTrial] = field(default_factory=list)


def accuracy(values: dict[str, Any]) -> float | None:
    """The accuracy a trial's row shows: the classifier's, or for a causal LM trained on
    completions its answer accuracy (every completion token the teacher-forced argmax)."""
    return values.get("accuracy", values.get("answer_accuracy"))


def count_states(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials per state (lower-case names), so that complete + pruned + running are the search
    trainings, which use `budget.n_trials`. Outside them: confirmation trainings under
    `confirmation` (they train again what the search found, or a nested estimate as a plain
    LoRA) and proposals of a configuration
    the study had finished, answered from its result without training, under `duplicate`."""
    counts = {s.name.lower(): 0 for s in TrialState}
    counts["confirmation"] = counts["duplicate"] = 0
    for t in trials:
        if t.user_attrs.get("confirmation") or "rank_check_of" in t.user_attrs:
            counts["confirmation"] += 1
        elif "duplicate_of" in t.user_attrs:
            counts["duplicate"] += 1
        else:
            counts[t.state.name.lower()] += 1
    return counts


def distinct_complete(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials that were actually trained (replayed duplicates point to these); a
    nested trial once (`candidates` gives its ranks)."""
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and "duplicate_of" not in t.user_attrs
        and not t.user_attrs.get("confirmation")
    ]


def candidates(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """What the answer chooses among: every trained configuration, a nested trial's ranks
    one by one (answer/nested.py)."""
    return expand(distinct_complete(trials))


def candidate_id(t: FrozenTrial) -> int | str:
    """A candidate's key in `Answer.margins`: a plain trial's number, or `3@r8`."""
    rank = t.user_attrs.get("nested_rank")
    return t.number if rank is None else f"{t.number}@r{rank}"


def margin(best: FrozenTrial, tolerance: str | float) -> tuple[float, str]:
    """The margin shared by every candidate: absolute, or `1se-mean` (relative without an SE)."""
    if not isinstance(tolerance, str):
        return float(tolerance), "absolute"
    se = best.user_attrs.get("val_loss_se")
    if se is not None:
        return float(se), "1se-mean"
    return abs(best.value) * FALLBACK_RELATIVE_TOLERANCE, "relative"


def paired_se(candidate: FrozenTrial, best: FrozenTrial) -> float | None:
    """Standard error of the mean of (candidate - best) per-example validation losses; None when
    either trial lacks them or they were not scored on the same examples."""
    a, b = per_example(candidate), per_example(best)
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    return statistics.stdev(x - y for x, y in zip(a, b, strict=True)) / math.sqrt(len(a))


def seed_std(trials: Sequence[FrozenTrial]) -> float | None:
    """The seed noise a confirmation round measured: the pooled standard deviation of val loss
    over seeds, within each configuration it trained again (None before any such round)."""
    values: dict[int, list[float]] = {}
    for t in trials:
        origin = t.user_attrs.get("confirm_of")
        if (
            t.user_attrs.get("confirmation")
            and t.state == TrialState.COMPLETE
            and origin is not None
        ):
            values.setdefault(origin, []).append(t.value)
    by_number = {t.number: t for t in trials}
    squares, dof = 0.0, 0
    for origin, runs in values.items():
        first = by_number.get(origin)
        if first is not None and first.state == TrialState.COMPLETE:
            runs = [first.value, *runs]
        if len(runs) > 1:
            mean = statistics.mean(runs)
            squares += sum((v - mean) ** 2 for v in runs)
            dof += len(runs) - 1
    return math.sqrt(squares / dof) if dof else None


def _paired_margins(
    complete: list[FrozenTrial], best: FrozenTrial, trials: Sequence[FrozenTrial]
) -> tuple[dict[int | str, float], str, float | None, list[str]]:
    noise = seed_std(trials)
    fallback, _ = margin(best, "1se-mean")
    margins, unpaired = {}, []
    for t in complete:
        se = paired_se(t, best)
        if se is None:
            unpaired.append(candidate_id(t))
            margins[candidate_id(t)] = fallback
        else:
            margins[candidate_id(t)] = math.sqrt(se**2 + 2 * noise**2) if noise else se
    notes = []
    if unpaired:
        notes.append(
            f"trial(s) {', '.join(map(str, unpaired))} carry no per-example validation losses "
            f"(older workers): compared by one standard error of the best's mean ({fallback:.4f})"
        )
    return margins, "1se+seed" if noise else "1se", noise, notes


def best_of(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The study's best trial, the one every command names (`run`, the live view, `report`,
    `status`, MLflow): the lowest val loss among trained search trials, earliest on ties.
    Confirmation re-runs are left out (they train a candidate again with another seed); a
    nested trial stands as its best rank."""
    complete = candidates(trials)
    return min(complete, key=_order) if complete else None


def _order(t: FrozenTrial) -> tuple:
    """Lowest val loss first; on ties the earlier trial, then the smaller nested rank."""
    return (t.value, t.number, t.user_attrs.get("nested_rank", 0))


def progress(trials: Sequence[FrozenTrial], budget: int) -> dict[str, int]:
    """Trials per state (count_states) and `to_go`: search trainings not yet started, so that
    complete + pruned + running + to go = the budget (`view` and `status` show these)."""
    counts = count_states(trials)
    started = counts["complete"] + counts["pruned"] + counts["running"]
    return {**counts, "to_go": max(0, budget - started)}


def answer(trials: Sequence[FrozenTrial], tolerance: str | float = "1se") -> Answer:
    best = best_of(trials)
    if best is None:
        return Answer(None, None, None, "", [])
    complete = candidates(trials)  # never a pruned trial: its loss is a partial one
    notes: list[str] = []
    noise = None
    if tolerance == "1se" and per_example(best):
        margins, rule, noise, notes = _paired_margins(complete, best, trials)
    else:
        delta, rule = margin(best, tolerance)
        margins = {candidate_id(t): delta for t in complete}
        if tolerance == "1se":
            notes.append(
                "the best trial carries no per-example validation losses (a study from older "
                "workers): the margin is one standard error of its mean (1se-mean)"
            )
    within = [t for t in complete if t.value <= best.value + margins[candidate_id(t)]]
    # fewest trainable parameters; among equals the lower loss, then the earlier trial
    recommended = min(
        within, key=lambda t: (t.user_attrs.get("trainable_params", float("inf")), *_order(t))
    )
    return Answer(
        best,
        recommended,
        margins[candidate_id(recommended)],
        rule,
        sorted({t.number for t in within}),
        margins,
        noise,
        notes,
        sorted(within, key=lambda t: (t.number, t.user_attrs.get("nested_rank", 0))),
    )


def baselines(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials of the study file's `enqueue:` list (Optuna marks enqueued trials; the informed
    first trial is enqueued too, but it is a guess at a good configuration, not a baseline)."""
    return [
        t
        for t in trials
        if "fixed_params" in t.system_attrs
        and not t.user_attrs.get("informed_start")
        and "retry_of" not in t.user_attrs
        and not t.user_attrs.get("confirmation")
        and "rank_check_of" not in t.user_attrs  # a nested estimate trained plain
    ]


def rank_view(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """Per rank tried: how good it got and what it cost, to see where gains plateau. A nested
    trial counts at each of its ranks (its seconds are those of its one training); a plain
    check of one of its ranks counts as a trial of that rank."""
    by_rank: dict[int, list[FrozenTrial]] = {}
    finished = [
        t
        for t in trials
        if TrialConfig.of(t) is not None
        and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and "duplicate_of" not in t.user_attrs
        and not t.user_attrs.get("confirmation")
    ]
    for t in expand(finished, keep_checked=True):
        by_rank.setdefault(TrialConfig.of(t).rank, []).append(t)
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
            "best_trainable_params": best.user_attrs.get("trainable_params") if best else None,
            "nested": any("nested_rank" in t.user_attrs for t in group),
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
