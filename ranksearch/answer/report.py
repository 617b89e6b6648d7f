"""Tables of a study's trials, read back from the Optuna storage.

Unlike recommend.py (which trial is the answer) and confirm.py (more seeds), this presents.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from ranksearch.answer.recommend import accuracy
from ranksearch.config.space import shown_config
from ranksearch.search.supervise import reason_head

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
    return ""


def cell(value: Any, spec: str = "") -> str:
    """A table cell: `-` for a missing value, `int` for thousands separators, else `format`."""
    if value is None:
        return "-"
    if spec == "int":
        return f"{value:,}"
    return format(value, spec) if spec else str(value)


def format_row(r: dict[str, Any]) -> list[str]:
    return [
        str(r["number"]), r["state"], cell(r["rank"]), cell(r["lora_alpha"]),
        cell(r["lora_dropout"], ".2f"), cell(r["target_modules"]), cell(r["learning_rate"], ".1e"),
        cell(r["trainable_params"], "int"), cell(r["last_step"]), cell(r["val_loss"], ".4f"),
        cell(r["accuracy"], ".3f"), cell(r["wall_seconds"], ".0f"), r["note"],
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


def best_summary(study: optuna.Study, tolerance: str | float = "1se") -> list[str]:
    """`run`'s closing lines: the study's best trial (recommend.best_of) and the recommended."""
    from ranksearch.answer.recommend import answer

    ans = answer(study.get_trials(deepcopy=False), tolerance)
    if ans.best is None:
        return ["No trial completed yet: no best configuration."]
    return [_one_line("Best", ans.best), _one_line("Recommended", ans.recommended)]


def _one_line(role: str, t: FrozenTrial) -> str:
    r = trial_row(t)
    return (
        f"{role}: trial {r['number']}  val_loss {r['val_loss']:.4f}"
        + (f"  accuracy {r['accuracy']:.3f}" if r["accuracy"] is not None else "")
        + f"  rank {r['rank']}  alpha {r['lora_alpha']}  dropout {r['lora_dropout']:.2f}"
        f"  modules {r['target_modules']}  lr {r['learning_rate']:.2e}"
        + (f"  trainable {r['trainable_params']:,}" if r["trainable_params"] else "")
    )


# -- `ranksearch report`: the whole answer ----------------------------------------------------

SCHEMA = "ranksearch.answer.report/1"
SORT_KEYS = {
    "number": "number",
    "val_loss": "val_loss",
    "rank": "rank",
    "trainable": "trainable_params",
    "seconds": "wall_seconds",
}


def _brief(t: FrozenTrial | None) -> dict[str, Any] | None:
    from ranksearch.answer.recommend import cost

    if t is None:
        return None
    return {
        "trial": t.number,
        "val_loss": t.value,
        "accuracy": accuracy(t.user_attrs),
        "val_loss_se": t.user_attrs.get("val_loss_se"),
        "config": shown_config(t),
        "cost": cost(t),
    }


def _importances(study: optuna.Study) -> dict[str, float] | None:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 4:
        return None
    try:
        return {
            k: round(v, 4)
            for k, v in optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
            ).items()
        }
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None  # too few distinct values to say anything


def build_report(
    study: optuna.Study,
    tolerance: str | float = "1se",
    sort: str = "number",
) -> dict[str, Any]:
    """The JSON document `ranksearch report --format json` prints (see README: Report JSON)."""
    from ranksearch.answer.recommend import answer, baselines, count_states, rank_view

    trials = study.get_trials(deepcopy=False)
    ans = answer(trials, tolerance)
    counts = count_states(trials)
    rows = [trial_row(t) for t in trials if t.state not in (TrialState.RUNNING, TrialState.WAITING)]
    key = SORT_KEYS[sort]
    rows.sort(key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0, r["number"]))
    base = []
    for t in baselines(trials):
        entry = {
            "trial": t.number,
            "state": t.state.name,
            "config": shown_config(t),
            "val_loss": t.value,
            "accuracy": accuracy(t.user_attrs),
        }
        if ans.best is not None and t.value is not None:
            entry["best_gain_val_loss"] = t.value - ans.best.value
        base.append(entry)
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
    from ranksearch.answer.confirm import analyse

    if not any(t.user_attrs.get("confirmation") for t in trials):
        return None
    return analyse(trials)


def _cost_line(b: dict[str, Any]) -> str:
    c = b["cost"]
    parts = [
        f"{cell(c['trainable_params'], 'int')} trainable",
        f"{c['trainable_fraction']:.3%} of the model" if c["trainable_fraction"] else None,
        f"adapter {c['adapter_mb']:.2f} MB" if c["adapter_mb"] else None,
        f"peak {c['peak_memory_mb']:.0f} MB" if c["peak_memory_mb"] else None,
        f"{c['seconds_per_step']:.3f} s/step" if c["seconds_per_step"] else None,
    ]
    return ", ".join(p for p in parts if p)


def _config_line(b: dict[str, Any]) -> str:
    c = b["config"]
    return (
        f"rank {c['rank']}, alpha {c['lora_alpha']}, dropout {c['lora_dropout']:g}, "
        f"modules {c['target_modules']}, lr {c['learning_rate']:.2e}"
    )


def summary_lines(report: dict[str, Any]) -> list[str]:
    best, rec, tol = report["best"], report["recommended"], report["tolerance"]
    if best is None:
        return ["No trial completed: no best and no recommendation yet."]

    def acc(entry: dict[str, Any]) -> str:
        return f"  accuracy {entry['accuracy']:.3f}" if entry["accuracy"] is not None else ""

    lines = [
        f"Best:        trial {best['trial']}  val_loss {best['val_loss']:.4f}{acc(best)}  "
        f"{_config_line(best)}",
        f"             cost: {_cost_line(best)}",
    ]
    seed = f" and seed noise {tol.get('seed_std') or 0:.4f}"
    rule = {
        "1se": "one standard error of its difference from the best, paired over the same "
        "validation examples",
        "1se+seed": f"one standard error of its difference from the best, paired over the same "
        f"validation examples{seed}",
        "1se-mean": "one standard error of the best's mean",
        "absolute": "the study's tolerance",
        "relative": "1% of the best (no standard error recorded)",
    }[tol["rule"]]
    lines += [
        f"Recommended: trial {rec['trial']}  val_loss {rec['val_loss']:.4f}{acc(rec)}  "
        f"{_config_line(rec)}",
        f"             cost: {_cost_line(rec)}",
        f"             the fewest trainable parameters within its margin ({rule}) of the best; "
        f"{len(tol['candidates'])} configuration(s) qualified; its margin {tol['val_loss']:.4f}",
    ]
    lines += [f"             note: {n}" for n in tol.get("notes", [])]
    pruned = report.get("pruned_never_recommended")
    if pruned:
        lines.append(
            f"             {pruned} pruned trial(s) not considered: a trial stopped before the "
            "full budget is never recommended"
        )
    for b in report["baselines"]:
        if b.get("best_gain_val_loss") is not None:
            lines.append(
                f"Baseline:    trial {b['trial']} ({_config_line(b)}): val_loss "
                f"{b['val_loss']:.4f}, the best is {b['best_gain_val_loss']:.4f} lower"
            )
    confirmation = report.get("confirmation")
    if confirmation and confirmation["recommended"] is not None:
        rows = {r["trial"]: r for r in confirmation["candidates"]}
        for r in confirmation["candidates"]:
            std = f" +- {r['std_val_loss']:.4f}" if r["std_val_loss"] is not None else ""
            p = (
                f", p(worse than best) {r['p_worse_than_best']:.3f}"
                if r["p_worse_than_best"] is not None
                else ""
            )
            lines.append(
                f"Confirmed:   trial {r['trial']} ({_config_line(r)}): val_loss "
                f"{r['mean_val_loss']:.4f}{std} over {r['n']} seeds{p}"
            )
        rec = rows[confirmation["recommended"]]
        lines.append(
            f"Confirmed recommendation: trial {rec['trial']} "
            f"({rec['trainable_params']:,} trainable), the smallest not significantly "
            f"worse than trial {confirmation['best_mean_trial']} (Welch's one-sided "
            f"t-test, alpha {confirmation['alpha']})"
        )
    if report["importances"]:
        lines.append(
            "Importance:  " + ", ".join(f"{k} {v:.2f}" for k, v in report["importances"].items())
        )
    return lines


def rank_table(report: dict[str, Any]) -> Table:
    table = Table(title="by rank", title_justify="left")
    for col in (*RANK_COLUMNS, "mean sec"):
        table.add_column(col, justify="right")
    for r in report["ranks"]:
        table.add_row(*rank_cells(r), cell(r["mean_seconds"], ".0f"))
    return table


RANK_COLUMNS = ("rank", "trials", "complete", "best val loss", "gain vs previous", "best acc")


def rank_cells(r: dict[str, Any]) -> list[str]:
    """One rank's cells under RANK_COLUMNS, for the terminal and the HTML report alike."""
    return [
        str(r["rank"]),
        str(r["trials"]),
        str(r["complete"]),
        cell(r["best_val_loss"], ".4f"),
        cell(r["gain_vs_previous_rank"], "+.4f"),
        cell(r["best_accuracy"], ".3f"),
    ]


def rows_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"study {report['study']}", title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("state", "modules", "note") else "right")
    for r in report["trials"]:
        table.add_row(*format_row(r))
    return table


def to_markdown(report: dict[str, Any]) -> str:
    out = [f"# Study {report['study']}", "", *[f"    {x}" for x in summary_lines(report)], ""]
    out += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(format_row(r)) + " |" for r in report["trials"]]
    cols = RANK_COLUMNS
    out += ["", "## By rank", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(rank_cells(r)) + " |" for r in report["ranks"]]
    return "\n".join(out) + "\n"


def study_status(
    study: optuna.Study, n_trials: int, tolerance: str | float = "1se"
) -> dict[str, Any]:
    """Progress for anyone watching: counts, per worker host, what runs now, and the answer
    so far (the best and recommended trials `report` names)."""
    from ranksearch.answer.recommend import answer, progress

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
