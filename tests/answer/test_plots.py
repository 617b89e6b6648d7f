"""Plots of a study built from constructed trials (a real in-memory Optuna study)."""

import itertools

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from ranksearch.answer.figures import figures
from ranksearch.answer.marks import trial_label
from ranksearch.answer.plots import curves_figure, loss_by_rank_figure, make_plots, pareto_figure
from ranksearch.answer.recommend import answer, distinct_complete

from ..conftest import config_attr


def _study() -> optuna.Study:
    study = optuna.create_study(direction="minimize")
    distributions = {
        "rank": CategoricalDistribution([2, 4, 8]),
        "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
    }
    for number, (rank, lr, loss) in enumerate(
        [(2, 1e-3, 0.50), (4, 3e-3, 0.42), (8, 5e-3, 0.40), (4, 2e-4, 0.61), (8, 1e-3, 0.45)]
    ):
        pruned = number == 3
        study.add_trial(
            create_trial(
                state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
                value=None if pruned else loss,
                params={"rank": rank, "learning_rate": lr},
                distributions=distributions,
                intermediate_values={2: loss + 0.2, 4: loss},
                user_attrs={
                    "config": config_attr(rank, "qv", lr),
                    "trainable_params": rank * 1000,
                    "wall_seconds": 10.0 + rank,
                },
            )
        )
    return study


def test_plots_are_pngs_and_replace_what_an_earlier_report_left(tmp_path):
    (tmp_path / "slice.html").write_text("an earlier version's plot, plotly.js inside")
    files = make_plots(_study(), tmp_path)
    assert files and all(p.suffix == ".png" for p in files)  # interactive: report.html only
    assert sorted(tmp_path.iterdir()) == sorted(files)


def test_curves_are_named_by_configuration_and_the_answer_is_marked_everywhere():
    from .test_htmlreport import study_with_confirmation

    study = study_with_confirmation()
    ans = answer(study.trials)
    best, rec = trial_label(ans.best), trial_label(ans.recommended)
    assert best == "#2 r8 all-linear lr 5e-3" and rec == "#1 r4 qv lr 3e-3"
    figs = figures(study)
    curves = [t.name for t in figs["curves"].data]
    # one line per search trial (no confirmation, no "Trial3"), the answer's named by its role
    assert sorted(curves) == sorted(
        [f"{best} (best)", f"{rec} (recommended)", "#0 r2 qv lr 1e-3", "#3 r4 qv lr 2e-4",
         "#4 r8 qv lr 1e-3", "#5 r16 all-linear lr 2e-3"]
    )  # fmt: skip
    dotted = [t.name for t in figs["curves"].data if t.line.dash == "dot"]
    assert dotted == ["#3 r4 qv lr 2e-4"]  # the pruned one
    assert figs["curves"].layout.xaxis.title.text == "optimizer step"
    for name in ("parallel_coordinate", "slice"):
        named = {t.name for t in figs[name].data if t.showlegend is not False and t.name}
        assert {f"best: {best}", f"recommended: {rec}"} <= named, name
    parallel = {t.name: t for t in figs["parallel_coordinate"].data}
    assert parallel[f"best: {best}"].customdata[0][1] == "0.4"  # the best trial's own line
    slice_marks = [t for t in figs["slice"].data if t.name == f"recommended: {rec}"]
    assert len(slice_marks) == 3 and {t.y[0] for t in slice_marks} == {0.42}  # every panel


def _texts(fig) -> list[str]:
    ax = fig.axes[0]
    return [t.get_text() for t in ax.get_legend().get_texts()] + [c.get_text() for c in ax.texts]


def test_png_plots_mark_the_answer_and_keep_their_axis_labels_apart():
    from .test_htmlreport import study_with_confirmation

    study = study_with_confirmation()
    ans = answer(study.trials)
    best, rec = f"best: {trial_label(ans.best)}", f"recommended: {trial_label(ans.recommended)}"
    trials = distinct_complete(study.trials)
    pareto = pareto_figure(trials, "trainable_params", "trainable parameters", ans)
    for fig in (
        pareto,
        pareto_figure(trials, "wall_seconds", "trial seconds", ans),
        loss_by_rank_figure(trials, ans),
    ):
        assert {best, rec} <= set(_texts(fig))
    assert trial_label(ans.best) + " (best)" in _texts(curves_figure(study, ans))
    assert "#0 r2 qv lr 1e-3" in _texts(pareto)  # the front's points by configuration
    for fig in (pareto, pareto_figure(trials, "wall_seconds", "trial seconds", ans)):
        fig.canvas.draw()
        ax = fig.axes[0]
        assert all(not t.get_text() for t in ax.get_xticklabels(minor=True))
        shown = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
        boxes = sorted((t.get_window_extent() for t in shown if _inside(ax, t)), key=lambda b: b.x0)
        assert len(boxes) >= 2
        assert all(a.x1 < b.x0 for a, b in itertools.pairwise(boxes)), [t.get_text() for t in shown]


def _inside(ax, label) -> bool:
    low, high = sorted(ax.get_xlim())
    return low <= label.get_position()[0] <= high
