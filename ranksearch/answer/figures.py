"""Interactive plots of a study (plotly), for `plots/*.html` and `report.html`.

The learning curves are drawn here, one line per trial named by its configuration; the parallel
coordinate and slice views are Optuna's, with the best and the recommended trial marked on them
(a thick line, a star, a ring) in the colors of the PNG plots; the importances are the report's
(importance.py), drawn once the study has enough complete trials for them.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import optuna

from ranksearch.answer.importance import study_importances
from ranksearch.answer.marks import (
    MARKS,
    OTHERS,
    answer_roles,
    curve_trials,
    drawn_study,
    trial_label,
)
from ranksearch.answer.recommend import Answer, answer

if TYPE_CHECKING:
    import plotly.graph_objects as go


def curves(study: optuna.Study, ans: Answer) -> go.Figure | None:
    import plotly.graph_objects as go
    from optuna.trial import TrialState

    trials = curve_trials(study)
    if not trials:
        return None
    roles = {t.number: role for role, t in reversed(answer_roles(ans))}
    fig = go.Figure()
    for i, t in enumerate(sorted(trials, key=lambda t: t.number in roles)):  # answer on top
        steps = sorted(t.intermediate_values)
        role = roles.get(t.number)
        line = {
            "dash": "dot" if t.state == TrialState.PRUNED else "solid",
            "width": 1.5,
            "color": OTHERS[i % len(OTHERS)],
        }
        if role:
            line |= {"color": MARKS[role][0], "width": 4}
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[t.intermediate_values[s] for s in steps],
                mode="lines+markers",
                marker={"size": 4},
                line=line,
                name=trial_label(t) + (f" ({role})" if role else ""),
                opacity=1 if role else 0.7,
            )
        )
    fig.update_layout(
        title="Val loss during training (dotted: pruned)",
        xaxis_title="optimizer step",
        yaxis_title="val loss",
        legend_title="trial",
    )
    return fig


def _same(shown: str, value) -> bool:
    """Whether Optuna's text for a value (`0.00316`, `qv`, `8`) shows `value`."""
    try:
        return math.isclose(float(shown), float(value), rel_tol=5e-3)
    except (TypeError, ValueError):
        return shown.strip("'\"") == str(value)


def mark_parallel(fig: go.Figure, ans: Answer) -> None:
    """Optuna draws each trial as a line whose hover data is its values: thicken the answer's
    and name it in the legend."""
    for role, t in answer_roles(ans):
        wanted = {"Objective Value": t.value, **t.params}
        for trace in fig.data:
            shown = {label: text for label, text in (trace.customdata or [])}
            if (
                shown
                and shown.keys() == wanted.keys()
                and all(_same(shown[k], v) for k, v in wanted.items())
            ):
                trace.update(
                    line={"color": MARKS[role][0], "width": 4},
                    opacity=1,
                    showlegend=True,
                    name=f"{role}: {trial_label(t)}",
                )
                break


def mark_slice(fig: go.Figure, ans: Answer) -> None:
    """Optuna colors each slice point by its trial number: a star and a ring over the answer's
    points, on every parameter's panel."""
    import plotly.graph_objects as go

    for trace in list(fig.data):
        numbers = list(trace.marker.color or [])
        for role, t in answer_roles(ans):
            if t.number not in numbers:
                continue
            i = numbers.index(t.number)
            color, _, symbol = MARKS[role]
            fig.add_trace(
                go.Scatter(
                    x=[trace.x[i]],
                    y=[trace.y[i]],
                    xaxis=trace.xaxis,
                    yaxis=trace.yaxis,
                    mode="markers",
                    marker={
                        "symbol": symbol,
                        "size": 16,
                        "color": color,
                        "line": {"width": 2, "color": color},
                    },
                    name=f"{role}: {trial_label(t)}",
                    legendgroup=role,
                    showlegend=trace.xaxis in (None, "x"),
                )  # fmt: skip
            )


def fit_slice(fig: go.Figure, numbers: list[int]) -> None:
    """Optuna's slice view, as the study names its trials and within the report's 1,200 px:
    its points are colored by the number of the trial in the copy `drawn_study` made (given
    back their number in the study, `numbers`); it is 300 px wide per parameter (1,500 px and
    more), so it takes its container's width instead; and the legend of the answer's marks goes
    under the panels, clear of the trial color bar on the right."""
    for trace in fig.data:
        if trace.marker is not None and isinstance(trace.marker.color, tuple | list):
            trace.marker.color = [numbers[i] for i in trace.marker.color]
    fig.update_layout(
        width=None,
        autosize=True,
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -0.3, "yanchor": "top"},
        margin={"b": 120},
    )


def figures(study: optuna.Study, tolerance: str | float = "1se") -> dict[str, go.Figure]:
    """The interactive views of a study, by name; those it has too few trials for are left out."""
    from optuna import visualization as ov
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if not any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials):
        return {}
    ans = answer(trials, tolerance)
    made = {}
    drawn = curves(study, ans)
    if drawn is not None:
        made["curves"] = drawn
    search, numbers = drawn_study(study)  # no replayed duplicate or confirmation counted twice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, draw in (
            ("parallel_coordinate", ov.plot_parallel_coordinate),
            ("slice", ov.plot_slice),
        ):
            try:
                fig = draw(search)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # too few trials for this view
            if name == "slice":
                fit_slice(fig, numbers)
                mark_slice(fig, ans)
            elif name == "parallel_coordinate":
                mark_parallel(fig, ans)
            made[name] = fig
    found = study_importances(trials)  # the report's, with its threshold (importance.py)
    if found:
        import plotly.graph_objects as go

        made["importances"] = go.Figure(
            go.Bar(x=list(found.values())[::-1], y=list(found)[::-1], orientation="h"),
            layout={"title": "Parameter importances (fANOVA)", "xaxis_title": "importance"},
        )
    return made
