"""The report as text: table cells, the summary lines (best, recommended, baselines, the
confirmation round) and markdown, shared by the terminal and the HTML page."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial

from ranksearch.answer.importance import withheld_note
from ranksearch.answer.recommend import answer
from ranksearch.answer.report import trial_row

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


def best_summary(study: optuna.Study, tolerance: str | float = "1se") -> list[str]:
    """`run`'s closing lines: the study's best trial (recommend.best_of) and the recommended."""
    ans = answer(study.get_trials(deepcopy=False), tolerance)
    if ans.best is None:
        return ["No trial completed yet: no best configuration."]
    return [_one_line("Best", ans.best), _one_line("Recommended", ans.recommended)]


def _one_line(role: str, t: FrozenTrial) -> str:
    r = trial_row(t)
    a = t.user_attrs
    if "nested_rank" in a:  # one rank of a nested trial: an estimate, not trained alone
        which = f"trial {r['number']} (nested, at rank {a['nested_rank']})"
    elif "rank_check_of" in a:
        which = f"trial {r['number']} (rank {r['rank']} of nested trial {a['rank_check_of']} "
        which += "trained as a plain LoRA"
        estimate = a.get("nested_estimate")
        which += f"; nested estimate {estimate:.4f})" if estimate is not None else ")"
    else:
        which = f"trial {r['number']}"
    return (
        f"{role}: {which}  val_loss {r['val_loss']:.4f}"
        + (f"  accuracy {r['accuracy']:.3f}" if r["accuracy"] is not None else "")
        + f"  rank {r['rank']}  alpha {r['lora_alpha']}  dropout {r['lora_dropout']:.2f}"
        f"  modules {r['target_modules']}  lr {r['learning_rate']:.2e}"
        + (f"  trainable {r['trainable_params']:,}" if r["trainable_params"] else "")
    )


# -- `ranksearch report`: the whole answer ----------------------------------------------------


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


def _qualified(tol: dict[str, Any]) -> str:
    """`qualified (2): #6 r16 all-linear lr 8.5e-4, #9 r8 all-linear lr 1.6e-3`."""
    names = tol.get("qualified") or [f"#{n}" for n in tol["candidates"]]  # older JSON
    return f"qualified ({len(names)}): {', '.join(names)}"


def _baseline_line(b: dict[str, Any]) -> str:
    """A baseline against the best, at equal steps (report._baseline)."""
    head = f"Baseline:    trial {b['trial']} ({_config_line(b)}): val_loss {b['val_loss']:.4f}"
    gain = b.get("best_gain_val_loss")
    if b.get("state") == "COMPLETE" or b.get("step") is None:
        return head + (f", the best is {gain:.4f} lower" if gain is not None else "")
    head += f" at step {b['step']} ({b['state'].lower()} there)"
    if gain is None:
        return head + ": partial, not compared with the best's final val loss"
    return f"{head}; the best had {b['best_val_loss_at_step']:.4f} at that step, {gain:.4f} lower"


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
        f"             the fewest trainable parameters within its margin ({rule}) of the best "
        f"({tol['val_loss']:.4f}); {_qualified(tol)}",
    ]
    lines += [f"             note: {n}" for n in tol.get("notes", [])]
    pruned = report.get("pruned_never_recommended")
    if pruned:
        lines.append(
            f"             {pruned} pruned trial(s) not considered: a trial stopped before the "
            "full budget is never recommended"
        )
    lines += [_baseline_line(b) for b in report["baselines"] if b["val_loss"] is not None]
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
    elif note := withheld_note(report["counts"]["complete"]):
        lines.append(note)
    return lines


RANK_COLUMNS = ("rank", "trials", "complete", "best loss", "gain", "best acc",
                "trainable")  # fmt: skip


def rank_cells(r: dict[str, Any]) -> list[str]:
    """One rank's cells under RANK_COLUMNS, for the terminal and the HTML report alike."""
    return [
        str(r["rank"]),
        str(r["trials"]),
        str(r["complete"]),
        cell(r["best_val_loss"], ".4f"),
        cell(r["gain_vs_previous_rank"], "+.4f"),
        cell(r["best_accuracy"], ".3f"),
        cell(r.get("best_trainable_params"), "int"),
    ]


def to_markdown(report: dict[str, Any]) -> str:
    out = [f"# Study {report['study']}", "", *[f"    {x}" for x in summary_lines(report)], ""]
    out += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(format_row(r)) + " |" for r in report["trials"]]
    cols = RANK_COLUMNS
    out += ["", "## By rank", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(rank_cells(r)) + " |" for r in report["ranks"]]
    return "\n".join(out) + "\n"
