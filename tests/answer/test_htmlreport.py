"""`report.html` of a constructed study, opened in headless Chromium with the network cut off."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from plotly.offline import get_plotlyjs

from ranksearch.answer.figures import figures
from ranksearch.answer.htmlreport import write_html
from ranksearch.answer.plots import make_plots
from ranksearch.answer.report import build_report

from ..conftest import config_attr, require_chromium

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # kept after the run

# (rank, modules, learning rate, final val loss); trial 3 is pruned
SEARCH = [
    (2, "qv", 1e-3, 0.50),
    (4, "qv", 3e-3, 0.42),
    (8, "all-linear", 5e-3, 0.40),
    (4, "qv", 2e-4, 0.61),
    (8, "qv", 1e-3, 0.45),
    (16, "all-linear", 2e-3, 0.405),
]
CONFIRM = [(2, 1, 0.41), (5, 1, 0.395), (1, 1, 0.43)]  # (origin, seed, val loss)


def study_with_confirmation() -> optuna.Study:
    """A finished search and a confirmation round, as Optuna stores them (in memory)."""
    study = optuna.create_study(direction="minimize", study_name="page")
    distributions = {
        "rank": CategoricalDistribution([2, 4, 8, 16]),
        "target_modules": CategoricalDistribution(["qv", "all-linear"]),
        "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
    }

    def add(rank, modules, lr, loss, pruned=False, **attrs):
        multiplier = 6 if modules == "all-linear" else 2
        study.add_trial(
            create_trial(
                state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
                value=None if pruned else loss,
                params={"rank": rank, "target_modules": modules, "learning_rate": lr},
                distributions=distributions,
                intermediate_values={2: loss + 0.2, 4: loss},
                user_attrs={
                    "config": config_attr(rank, modules, lr),
                    "trainable_params": rank * 1000 * multiplier,
                    "wall_seconds": 10.0 + rank,
                    "val_loss_se": 0.02,
                    "seed": 0,
                    **attrs,
                },
            )
        )

    for number, (rank, modules, lr, loss) in enumerate(SEARCH):
        add(rank, modules, lr, loss, pruned=number == 3)
    for origin, seed, loss in CONFIRM:
        rank, modules, lr, _ = SEARCH[origin]
        add(rank, modules, lr, loss, confirmation=True, confirm_of=origin, seed=seed)
    return study


@pytest.mark.services
def test_report_html_renders_offline_in_chromium(tmp_path):
    chromium = require_chromium()
    from playwright.sync_api import sync_playwright

    study = study_with_confirmation()
    report = build_report(study)
    figs = figures(study)
    pngs = make_plots(study, tmp_path / "plots")
    page_file = write_html(report, figs, pngs, tmp_path / "report.html")
    text = page_file.read_text()
    assert text.count(get_plotlyjs()[:2000]) == 1  # plotly.js embedded once, not per plot
    assert "<script src=" not in text
    recommended = report["recommended"]["trial"]
    fetched = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        context = browser.new_context(offline=True, viewport={"width": 1300, "height": 900})
        context.route(
            "**/*",
            lambda route: (
                route.continue_()
                if route.request.url.startswith("file:")
                else (fetched.append(route.request.url), route.abort())
            ),
        )
        page = context.new_page()
        page.goto(page_file.as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
        answer = page.locator("#answer + .answer").inner_text()
        plots = page.locator(".js-plotly-plot")
        drawn = [plots.nth(i).locator("svg.main-svg").count() for i in range(plots.count())]
        images = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        confirmation = page.locator("#confirmation").count()
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "report-html.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"report.html screenshot: {shot}")
    assert fetched == []  # nothing asked of the network
    assert f"Recommended: trial {recommended}" in answer
    assert f"Confirmed recommendation: trial {report['confirmation']['recommended']}" in answer
    assert confirmation == 1
    assert len(drawn) == len(figs) >= 3 and all(n > 0 for n in drawn)  # every plot drew an svg
    # the PNG plots plotly does not draw: val loss by rank, the two Pareto fronts
    assert len(images) == len([p for p in pngs if p.stem not in figs]) == 3 and all(images)
    assert shot.stat().st_size > 50_000


def study_of_six_parameters() -> optuna.Study:
    """Six searched parameters (Optuna draws its slice view 300 px wide per parameter) and a
    replayed duplicate of trial 1, as the orchestrator records one."""
    study = optuna.create_study(direction="minimize", study_name="wide")
    distributions = {
        "rank": CategoricalDistribution([2, 4, 8, 16]),
        "alpha_ratio": CategoricalDistribution([1, 2]),
        "dropout": CategoricalDistribution([0.0, 0.1]),
        "target_modules": CategoricalDistribution(["qv", "all-linear"]),
        "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
        "use_rslora": CategoricalDistribution([False, True]),
    }
    rows = [(2, 1, 0.0, "qv", 1e-3, False, 0.5), (4, 2, 0.1, "qv", 3e-3, True, 0.42),
            (8, 2, 0.0, "all-linear", 5e-3, False, 0.40), (16, 1, 0.1, "qv", 2e-4, True, 0.61),
            (8, 1, 0.0, "qv", 1e-3, False, 0.45), (4, 2, 0.1, "qv", 3e-3, True, 0.42)]  # fmt: skip
    for number, (rank, ratio, dropout, modules, lr, rslora, loss) in enumerate(rows):
        attrs = {"config": config_attr(rank, modules, lr), "trainable_params": rank * 1000,
                 "wall_seconds": 10.0, "val_loss_se": 0.02}  # fmt: skip
        if number == 5:
            attrs["duplicate_of"] = 1
        params = {"rank": rank, "alpha_ratio": ratio, "dropout": dropout,
                  "target_modules": modules, "learning_rate": lr, "use_rslora": rslora}  # fmt: skip
        study.add_trial(
            create_trial(
                value=loss,
                params=params,
                distributions=distributions,
                user_attrs=attrs,
                intermediate_values={2: loss + 0.2, 4: loss},
            )  # fmt: skip
        )
    return study


def test_the_slice_fits_the_page_its_legend_clear_and_duplicates_drawn_once(tmp_path):
    chromium = require_chromium()
    from playwright.sync_api import sync_playwright

    study = study_of_six_parameters()
    figs = figures(study)
    numbers = [n for trace in figs["slice"].data[:1] for n in trace.marker.color]
    assert sorted(numbers) == [0, 1, 2, 3, 4]  # the study's own numbers, trial 5 replays 1
    lines = [trace for trace in figs["parallel_coordinate"].data if trace.customdata]
    assert len(lines) == 5  # one line per trial, drawn with its values as hover data
    page_file = write_html(build_report(study), figs, [], tmp_path / "report.html")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(page_file.as_uri())
        slice_plot = page.locator("#plot-slice")
        slice_plot.locator(".legend").wait_for(timeout=30_000)
        width = slice_plot.locator("svg.main-svg").first.bounding_box()["width"]
        legend = slice_plot.locator(".legend").bounding_box()
        colorbar = slice_plot.locator(".colorbar").bounding_box()
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "report-slice.png"
        slice_plot.screenshot(path=str(shot))
        browser.close()
    print(f"slice screenshot: {shot}")
    assert width <= 1200
    apart_x = (
        legend["x"] + legend["width"] <= colorbar["x"]
        or colorbar["x"] + colorbar["width"] <= legend["x"]
    )
    apart_y = (
        legend["y"] >= colorbar["y"] + colorbar["height"]
        or legend["y"] + legend["height"] <= colorbar["y"]
    )
    assert apart_x or apart_y, (legend, colorbar)
