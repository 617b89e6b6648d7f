"""Tables of a study's trials, read back from the Optuna storage."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

COLUMNS = (
    "#",
    "state",
    "rank",
    "alpha",
    "dropout",
    "modules",
    "lr",
    "trainable",
    "step",
    "val loss",
    "acc",
    "sec",
    "note",
)


def trial_row(t: FrozenTrial) -> dict[str, Any]:
    """One trial as plain values (what the table and JSON show)."""
    a, c = t.user_attrs, t.user_attrs.get("config", {})
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
        "accuracy": a.get("accuracy"),
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
        reason = str(a.get("fail_reason", "")).strip().splitlines()
        return (reason[-1] if reason else "failed")[:60]
    return ""


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if spec == "int":
        return f"{value:,}"
    return format(value, spec) if spec else str(value)


def format_row(r: dict[str, Any]) -> list[str]:
    return [
        str(r["number"]), r["state"], _fmt(r["rank"]), _fmt(r["lora_alpha"]),
        _fmt(r["lora_dropout"], ".2f"), _fmt(r["target_modules"]), _fmt(r["learning_rate"], ".1e"),
        _fmt(r["trainable_params"], "int"), _fmt(r["last_step"]), _fmt(r["val_loss"], ".4f"),
        _fmt(r["accuracy"], ".3f"), _fmt(r["wall_seconds"], ".0f"), r["note"],
    ]  # fmt: skip


def trials_table(study: optuna.Study, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("state", "modules", "note") else "right")
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        table.add_row(*format_row(trial_row(t)))
    return table


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None


def best_summary(study: optuna.Study) -> str:
    best = best_trial(study)
    if best is None:
        return "No trial completed yet: no best configuration."
    r = trial_row(best)
    return (
        f"Best: trial {r['number']}  val_loss {r['val_loss']:.4f}"
        + (f"  accuracy {r['accuracy']:.3f}" if r["accuracy"] is not None else "")
        + f"  rank {r['rank']}  alpha {r['lora_alpha']}  dropout {r['lora_dropout']:.2f}"
        f"  modules {r['target_modules']}  lr {r['learning_rate']:.2e}"
        + (f"  trainable {r['trainable_params']:,}" if r["trainable_params"] else "")
    )
