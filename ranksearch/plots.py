"""Plots of a study: PNG (matplotlib) for people, HTML (plotly) for exploring.

Optuna's visualization module draws what it knows (curves, parallel coordinates, importances);
the two LoRA-specific views (val loss by rank, the cost Pareto front) are plain matplotlib.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.recommend import distinct_complete

if TYPE_CHECKING:
    import plotly.graph_objects as go


def pareto_front(points: list[tuple[float, float, FrozenTrial]]) -> list[tuple[float, float]]:
    """(cost, loss) points no other point beats on both; sorted by cost."""
    front, best = [], float("inf")
    for cost, loss, _ in sorted(points, key=lambda p: (p[0], p[1])):
        if loss < best:
            front.append((cost, loss))
            best = loss
    return front


def _loss_by_rank(trials: list[FrozenTrial], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sets = sorted({t.user_attrs["config"]["target_modules"] for t in trials})
    for name in sets:
        group = [t for t in trials if t.user_attrs["config"]["target_modules"] == name]
        ax.scatter(
            [t.user_attrs["config"]["rank"] for t in group],
            [t.value for t in group],
            label=name,
            s=40,
            alpha=0.8,
        )
    ax.set_xscale("log", base=2)
    ranks = sorted({t.user_attrs["config"]["rank"] for t in trials})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="LoRA rank", ylabel="final val loss", title="Val loss by rank (complete trials)")
    ax.legend(title="target modules")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pareto(trials: list[FrozenTrial], attr: str, label: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    points = [(t.user_attrs[attr], t.value, t) for t in trials if t.user_attrs.get(attr)]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=40, alpha=0.6, label="trials")
    front = pareto_front(points)
    ax.step(
        [p[0] for p in front], [p[1] for p in front], where="post", color="C3", label="Pareto front"
    )
    for cost, loss, t in points:
        if (cost, loss) in front:
            c = t.user_attrs["config"]
            ax.annotate(
                f"#{t.number} r{c['rank']} {c['target_modules']}",
                (cost, loss),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.set(xlabel=label, ylabel="final val loss", title=f"Val loss vs {label}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _optuna_png(study: optuna.Study, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    made = []
    for name, draw in (
        ("curves", ovm.plot_intermediate_values),
        ("parallel_coordinate", ovm.plot_parallel_coordinate),
        ("importances", ovm.plot_param_importances),
    ):
        try:
            ax = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # too few trials for this view
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)
        made.append(out / f"{name}.png")
    return made


def figures(study: optuna.Study) -> dict[str, go.Figure]:
    """The interactive (plotly) views of a study, by name; those it has too few trials for are
    left out. `make_plots` writes each to HTML, `htmlreport` puts them all in one page."""
    from optuna import visualization as ov

    if not any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials):
        return {}
    made = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, draw in (
            ("curves", ov.plot_intermediate_values),
            ("parallel_coordinate", ov.plot_parallel_coordinate),
            ("slice", ov.plot_slice),
            ("importances", ov.plot_param_importances),
        ):
            try:
                made[name] = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # too few trials for this view
    return made


def _optuna_html(figs: dict[str, go.Figure], out: Path) -> list[Path]:
    made = []
    for name, fig in figs.items():
        fig.write_html(out / f"{name}.html", include_plotlyjs=True)  # offline: no CDN
        made.append(out / f"{name}.html")
    return made


def make_plots(
    study: optuna.Study, out: Path, figs: dict[str, go.Figure] | None = None
) -> list[Path]:
    """Write every plot the study has enough trials for into `out`; return the files.
    `figs`: the study's `figures`, when the caller drew them already."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    trials = [
        t for t in distinct_complete(study.get_trials(deepcopy=False)) if "config" in t.user_attrs
    ]
    made: list[Path] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        if trials:
            _loss_by_rank(trials, out / "val_loss_by_rank.png")
            _pareto(trials, "trainable_params", "trainable parameters", out / "pareto_params.png")
            _pareto(trials, "wall_seconds", "trial seconds", out / "pareto_seconds.png")
            made += [
                p
                for p in (
                    out / "val_loss_by_rank.png",
                    out / "pareto_params.png",
                    out / "pareto_seconds.png",
                )
                if p.exists()
            ]
        if any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials):
            made += _optuna_png(study, out)
    made += _optuna_html(figures(study) if figs is None else figs, out)
    return made
