"""A study's trials and answer as data, read back from the Optuna storage: the rows of the
trial table, the report document (`ranksearch report --format json`) and the status of a
running study. `text.py` renders them as lines and cells; the cli prints them.

Unlike recommend.py (which trial is the answer) and confirm.py (more seeds), this gathers.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.answer.confirm import analyse
from ranksearch.answer.importance import study_importances
from ranksearch.answer.marks import trial_label
from ranksearch.answer.nested import is_nested
from ranksearch.answer.recommend import (
    accuracy,
    answer,
    baselines,
    cost,
    count_states,
    progress,
    rank_view,
)
from ranksearch.config.space import shown_config
from ranksearch.search.supervise import reason_head


def trial_row(t: FrozenTrial) -> dict[str, Any]:
    """One trial as plain values (what the table and JSON show)."""
    a, c = t.user_attrs, shown_config(t)  # blank cells for a trial not yet configured
    return {
        "number": t.number,
        "state": t.state.name,
        "rank": c.get("rank"),
        "lora_alpha": c.get("lora_alpha"),
        "lora_dropout": c.get("lora_dropout"),
        "target_modules": c.get("target_modules"),
        "learning_rate": c.get("learning_rate"),
        "trainable_params": a.get("trainable_params"),
        "last_step": a.get("last_step"),
        "val_loss": t.value if t.state == TrialState.COMPLETE else a.get("val_loss"),
        "accuracy": accuracy(a),
        "wall_seconds": a.get("wall_seconds"),
        "note": _note(t),
    }


def _note(t: FrozenTrial) -> str:
    a = t.user_attrs
    if "duplicate_of" in a:
        return f"= trial {a['duplicate_of']} (not retrained)"
    if t.state == TrialState.PRUNED:
        return f"pruned at step {a.get('pruned_at_step', a.get('last_step', '?'))}"
    if t.state == TrialState.FAIL:
        return reason_head(a.get("fail_reason", ""))[:60]
    if "rank_check_of" in a:
        return f"plain check of #{a['rank_check_of']} (est. {a.get('nested_estimate', 0):.4f})"
    if is_nested(t):  # the row's loss is its best rank's
        return f"nested: best at r{a['best_rank']}"
    return ""


SCHEMA = "ranksearch.report/1"
SORT_KEYS = {
    "number": "number",
    "val_loss": "val_loss",
    "rank": "rank",
    "trainable": "trainable_params",
    "seconds": "wall_seconds",
}


def _brief(t: FrozenTrial | None) -> dict[str, Any] | None:

    if t is None:
        return None
    return {
        "trial": t.number,
        # one rank of a nested trial (an estimate; `export --trial N@rR` writes it); or the
        # nested trial whose rank this plain trial trained again, and its estimate there
        "nested_rank": t.user_attrs.get("nested_rank"),
        "rank_check_of": t.user_attrs.get("rank_check_of"),
        "nested_estimate": t.user_attrs.get("nested_estimate"),
        "val_loss": t.value,
        "accuracy": accuracy(t.user_attrs),
        "val_loss_se": t.user_attrs.get("val_loss_se"),
        "config": shown_config(t),
        "cost": cost(t),
    }


def _importances(study: optuna.Study) -> dict[str, float] | None:

    return study_importances(study.get_trials(deepcopy=False))


def _baseline(t: FrozenTrial, best: FrozenTrial | None) -> dict[str, Any]:
    """An enqueued baseline and what the best gained over it, at equal steps: a baseline pruned
    at step 40 is compared with the best's val loss at step 40, not with its final one; where
    the best has none there, `best_gain_val_loss` is None and `partial` says why."""
    steps = t.intermediate_values
    step = max(steps) if steps else t.user_attrs.get("last_step")
    entry = {
        "trial": t.number,
        "state": t.state.name,
        "config": shown_config(t),
        "val_loss": t.value,
        "accuracy": accuracy(t.user_attrs),
        "step": step,
    }
    if best is None or t.value is None:
        return entry
    if t.state == TrialState.COMPLETE:
        entry["best_gain_val_loss"] = t.value - best.value
    elif step in best.intermediate_values:
        entry["best_val_loss_at_step"] = best.intermediate_values[step]
        entry["best_gain_val_loss"] = t.value - best.intermediate_values[step]
    else:
        entry["best_gain_val_loss"] = None
        entry["partial"] = True
    return entry


def build_report(
    study: optuna.Study,
    tolerance: str | float = "1se",
    sort: str = "number",
) -> dict[str, Any]:
    """The JSON document `ranksearch report --format json` prints (see README: Report JSON)."""

    trials = study.get_trials(deepcopy=False)
    ans = answer(trials, tolerance)
    counts = count_states(trials)
    rows = [trial_row(t) for t in trials if t.state not in (TrialState.RUNNING, TrialState.WAITING)]
    key = SORT_KEYS[sort]
    rows.sort(key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0, r["number"]))
    base = [_baseline(t, ans.best) for t in baselines(trials)]
    return {
        "schema": SCHEMA,
        "study": study.study_name,
        "objective": "val_loss (minimize)",
        "counts": counts,
        "best": _brief(ans.best),
        "recommended": _brief(ans.recommended),
        "tolerance": {
            "rule": ans.tolerance_rule,
            "val_loss": ans.tolerance,  # the recommended trial's margin
            "candidates": ans.candidates,
            "qualified": [trial_label(t) for t in ans.within],  # named (a nested rank too)
            "seed_std": ans.seed_std,
            "notes": ans.notes,
        },
        "pruned_never_recommended": counts["pruned"],
        "baselines": base,
        "ranks": rank_view(trials),
        "importances": _importances(study),
        "trials": rows,
        "confirmation": _confirmation(trials),
    }


def _confirmation(trials) -> dict[str, Any] | None:
    """The confirmation round's analysis, once one ran (see confirm.py)."""

    if not any(t.user_attrs.get("confirmation") for t in trials):
        return None
    return analyse(trials)


def study_status(
    study: optuna.Study, n_trials: int, tolerance: str | float = "1se"
) -> dict[str, Any]:
    """Progress for anyone watching: counts, per worker host, what runs now, and the answer
    so far (the best and recommended trials `report` names)."""

    trials = study.get_trials(deepcopy=False)
    counts = progress(trials, n_trials)
    to_go = counts.pop("to_go")
    ans = answer(trials, tolerance)
    hosts: dict[str, dict[str, int]] = {}
    running = []
    for t in trials:
        if t.user_attrs.get("confirmation"):
            continue
        state = t.state.name.lower()
        host = t.user_attrs.get("host", "?")
        hosts.setdefault(host, {s: 0 for s in ("complete", "pruned", "fail", "running")})
        if state in hosts[host]:
            hosts[host][state] += 1
        if t.state == TrialState.RUNNING:
            running.append(
                {
                    "trial": t.number,
                    "host": host,
                    "pid": t.user_attrs.get("orchestrator_pid"),
                    "last_step": t.user_attrs.get("last_step", 0),
                    "last_report_time": t.user_attrs.get("last_report_time"),  # epoch s
                    "started": t.datetime_start.isoformat(timespec="seconds")
                    if t.datetime_start
                    else None,
                }
            )
    return {
        "study": study.study_name,
        "n_trials": n_trials,
        "counts": counts,
        "to_go": to_go,
        "hosts": hosts,
        "running": running,
        "best": ans.best.number if ans.best else None,
        "recommended": ans.recommended.number if ans.recommended else None,
    }
