"""Plots of a study as PNG (matplotlib), for people; `figures.py` draws the interactive ones,
which live in `report.html` only: each on its own would carry plotly.js (4.8 MB) again.

Every plot names trials by their configuration (`#3 r8 qv lr 1e-3`) and marks the best and the
recommended trial wherever they appear: a star for the best, a ring for the recommended.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.answer.importance import study_importances
from ranksearch.answer.marks import (
    MARKS,
    OTHERS,
    answer_roles,
    curve_trials,
    trial_label,
)
from ranksearch.answer.nested import is_nested, ranks_of
from ranksearch.answer.recommend import Answer, answer, distinct_complete
from ranksearch.config.space import TrialConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pareto_front(points: list[tuple[float, float, FrozenTrial]]) -> list[tuple[float, float]]:
    """(cost, loss) points no other point beats on both; sorted by cost."""
    front, best = [], float("inf")
    for cost, loss, _ in sorted(points, key=lambda p: (p[0], p[1])):
        if loss < best:
            front.append((cost, loss))
            best = loss
    return front


def _mark(ax, points: dict[int, tuple[float, float]], ans: Answer) -> None:
    """The best and the recommended trial on `ax`, where they are among `points` (by number)."""
    for role, t in answer_roles(ans):
        if t.number not in points:
            continue
        color, marker, _ = MARKS[role]
        x, y = points[t.number]
        ax.scatter(
            [x], [y], s=320 if role == "best" else 200, marker=marker, zorder=5, linewidths=2,
            facecolors=color if role == "best" else "none", edgecolors=color,
            label=f"{role}: {trial_label(t)}",
        )  # fmt: skip


def loss_by_rank_figure(trials: list[FrozenTrial], ans: Answer) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    configs = {t.number: TrialConfig.of(t) for t in trials}  # every one has a configuration
    sets = sorted({c.target_modules for c in configs.values()})
    for i, name in enumerate(sets):
        group = [t for t in trials if configs[t.number].target_modules == name]
        ax.scatter(
            [configs[t.number].rank for t in group],
            [t.value for t in group],
            label=name,
            s=40,
            alpha=0.8,
            color=OTHERS[i % len(OTHERS)],
        )
    _mark(ax, {t.number: (configs[t.number].rank, t.value) for t in trials}, ans)
    ax.set_xscale("log", base=2)
    ranks = sorted({c.rank for c in configs.values()})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.set(xlabel="LoRA rank", ylabel="final val loss", title="Val loss by rank (complete trials)")
    ax.legend(title="target modules", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def pareto_figure(trials: list[FrozenTrial], attr: str, label: str, ans: Answer) -> Figure | None:
    """Val loss against a cost (`attr`), its Pareto front labelled by configuration."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, NullFormatter

    points = [(t.user_attrs[attr], t.value, t) for t in trials if t.user_attrs.get(attr)]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=40, alpha=0.6, label="trials",
               color=OTHERS[0])  # fmt: skip
    front = pareto_front(points)
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=OTHERS[5],
            label="Pareto front")  # fmt: skip
    for cost, loss, t in points:
        if (cost, loss) in front:
            ax.annotate(trial_label(t), (cost, loss), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)  # fmt: skip
    _mark(ax, {t.number: (cost, loss) for cost, loss, t in points}, ans)
    costs = [p[0] for p in points]
    if max(costs) >= 10 * min(costs):  # a log axis only where it spans a decade
        ax.set_xscale("log")
    # short tick labels (12k, 1.2M, 30), no minor-tick labels: none overlap
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=label, ylabel="final val loss", title=f"Val loss vs {label}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def curves_figure(study: optuna.Study, ans: Answer) -> Figure | None:
    """Val loss at each evaluation, one line per search trial labelled by its configuration;
    pruned trials dotted, ending where they were cut."""
    import matplotlib.pyplot as plt

    trials = curve_trials(study)
    if not trials:
        return None
    roles = {t.number: role for role, t in reversed(answer_roles(ans))}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, t in enumerate(trials):
        steps = sorted(t.intermediate_values)
        role = roles.get(t.number)
        ax.plot(
            steps,
            [t.intermediate_values[s] for s in steps],
            linestyle=":" if t.state == TrialState.PRUNED else "-",
            linewidth=3 if role else 1.2,
            color=MARKS[role][0] if role else OTHERS[i % len(OTHERS)],
            alpha=1 if role else 0.7,
            label=trial_label(t) + (f" ({role})" if role else ""),
            zorder=4 if role else 2,
        )
    ax.set(xlabel="optimizer step", ylabel="val loss", title="Val loss during training")
    ax.legend(fontsize=7, ncols=2 if len(trials) > 12 else 1, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def nested_ranks_figure(all_trials: list[FrozenTrial], ans: Answer) -> Figure | None:
    """A nested study's rank curves: val loss at each rank of every nested trial at its last
    evaluation, one line per trial (pruned ones dotted), the plain checks of a rank as stars
    and the recommended candidate ringed. None when the study has no nested trial."""
    import matplotlib.pyplot as plt

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    nested = [t for t in all_trials if is_nested(t) and t.state in finished]
    if not nested:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, t in enumerate(nested):
        ranks = ranks_of(t)
        c = TrialConfig.of(t)
        pruned = t.state == TrialState.PRUNED
        label = trial_label(t).replace(f" r{c.rank}", "") + (
            f" (pruned at step {t.user_attrs.get('pruned_at_step')})" if pruned else ""
        )
        ax.plot(ranks, [t.user_attrs["ranks"][str(r)]["val_loss"] for r in ranks],
                marker="o", linestyle=":" if pruned else "-", color=OTHERS[i % len(OTHERS)],
                alpha=0.6 if pruned else 0.9, label=label)  # fmt: skip
    checks = [t for t in all_trials if "rank_check_of" in t.user_attrs and t.value is not None]
    for t in checks:
        ax.scatter([TrialConfig.of(t).rank], [t.value], marker="*", s=220, zorder=5,
                   color=MARKS["best"][0], label=f"{trial_label(t)} trained plain "
                   f"(of #{t.user_attrs['rank_check_of']})")  # fmt: skip
    rec = ans.recommended
    if rec is not None and TrialConfig.of(rec) is not None:
        color = MARKS["recommended"][0]
        ax.scatter([TrialConfig.of(rec).rank], [rec.value], s=320, facecolors="none", zorder=6,
                   edgecolors=color, linewidths=2,
                   label=f"recommended: {trial_label(rec)}")  # fmt: skip
    ranks = sorted({r for t in nested for r in ranks_of(t)})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.set(xlabel="LoRA rank (leading ranks of one nested trial)", ylabel="val loss",
           title="Rank curves of the nested trials")  # fmt: skip
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _importances_png(study: optuna.Study, out: Path) -> list[Path]:
    """The report's parameter importances as bars (no trial on it to mark); none while the
    study has too few complete trials for them (answer/importance.py)."""
    import matplotlib.pyplot as plt

    found = study_importances(study.get_trials(deepcopy=False))
    if not found:
        return []
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.barh(list(found)[::-1], list(found.values())[::-1])
    ax.set_xlabel("importance for val_loss (fANOVA)")
    ax.set_title("Parameter importances")
    fig.tight_layout()
    fig.savefig(out / "importances.png", dpi=120)
    plt.close(fig)
    return [out / "importances.png"]


def make_plots(study: optuna.Study, out: Path, tolerance: str | float = "1se") -> list[Path]:
    """Write every PNG plot the study has enough trials for into `out`; return the files.
    What an earlier `report` left there goes first: a file of the same name may be a hard link
    to its copy in the MLflow store (publish.py), which drawing into it would change too, and
    the per-plot HTML files of earlier versions are now parts of `report.html`."""
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.png"), *out.glob("*.html")]:
        old.unlink()
    all_trials = study.get_trials(deepcopy=False)
    ans = answer(all_trials, tolerance)
    trials = [t for t in distinct_complete(all_trials) if "config" in t.user_attrs]
    made: list[Path] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        drawn = {"curves": curves_figure(study, ans),
                 "nested_ranks": nested_ranks_figure(all_trials, ans)}  # fmt: skip
        if trials:
            drawn |= {
                "val_loss_by_rank": loss_by_rank_figure(trials, ans),
                "pareto_params": pareto_figure(
                    trials, "trainable_params", "trainable parameters", ans
                ),
                "pareto_seconds": pareto_figure(trials, "wall_seconds", "trial seconds", ans),
            }
        for name, fig in drawn.items():
            if fig is not None:
                fig.savefig(out / f"{name}.png", dpi=120)
                plt.close(fig)
                made.append(out / f"{name}.png")
        if any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in all_trials):
            made += _importances_png(study, out)
    return made
