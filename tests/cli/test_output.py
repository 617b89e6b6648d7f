"""What `report` and `run` print: the trial table at ordinary terminal widths (rendered by rich
at 80, 100 and 120 columns) and the answer's lines."""

from __future__ import annotations

import io

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from ranksearch.answer.report import build_report
from ranksearch.answer.text import summary_lines
from ranksearch.cli.output import print_report, trials_table

from ..conftest import config_attr

# a default-study run (2026-11-27, the README's then): (rank, modules, lr, final or last val
# loss, pruned at step)
README_RUN = [
    (8, "qv", 1.4e-3, 0.4558, None), (8, "qv", 2.6e-4, 0.6258, 60),
    (32, "qv", 2.2e-3, 0.4000, None), (4, "qv", 2.9e-3, 0.3854, None),
    (4, "qv", 6.6e-4, 0.6369, 20), (4, "qkv", 2.5e-3, 0.4555, 60),
    (16, "all-linear", 8.5e-4, 0.3278, None), (16, "all-linear", 5.2e-4, 0.3908, None),
    (32, "qkv", 6.1e-4, 0.4827, 60), (8, "all-linear", 1.6e-3, 0.3278, None),
    (16, "all-linear", 2.7e-3, 0.4628, 60), (8, "all-linear", 1.8e-3, 0.5530, 20),
]  # fmt: skip
PER_RANK = {"qv": 9312, "qkv": 13_954, "all-linear": 42_336}


def readme_study(baseline_pruned_at: int | None = None) -> optuna.Study:
    """That run's 12 trials; trial 1 enqueued as a baseline, as `enqueue:` makes one."""
    study = optuna.create_study(direction="minimize", study_name="cls-task")
    distributions = {
        "rank": CategoricalDistribution([4, 8, 16, 32]),
        "target_modules": CategoricalDistribution(["qv", "qkv", "all-linear"]),
        "learning_rate": FloatDistribution(2e-4, 3e-3, log=True),
    }
    for number, (rank, modules, lr, loss, pruned) in enumerate(README_RUN):
        if number == 1 and baseline_pruned_at is not None:
            pruned = baseline_pruned_at
        last = pruned or 100
        curve = {s: loss + 0.002 * (last - s) for s in range(20, last + 1, 20)}
        attrs = {"config": config_attr(rank, modules, lr), "last_step": last,
                 "trainable_params": rank * PER_RANK[modules], "wall_seconds": 40.0,
                 "accuracy": 0.8, "val_loss_se": 0.03, "val_loss": loss}  # fmt: skip
        if pruned:
            attrs["pruned_at_step"] = pruned
        study.add_trial(
            create_trial(
                state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=loss,
                params={"rank": rank, "target_modules": modules, "learning_rate": lr},
                distributions=distributions, user_attrs=attrs, intermediate_values=curve,
                system_attrs={"fixed_params": {"rank": rank}} if number == 1 else {},
            )
        )  # fmt: skip
    return study


def _printed(width: int, draw) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    draw(console)
    return console.file.getvalue()


@pytest.mark.parametrize("width", [80, 100, 120])
def test_trial_tables_show_every_number_whole_at_ordinary_widths(width):
    study = readme_study()
    report = build_report(study)
    for text in (
        _printed(width, lambda c: print_report(c, report, False)),
        _printed(width, lambda c: c.print(trials_table(study, "study cls-task", c.width))),
    ):
        assert "…" not in text
        assert max(len(line) for line in text.splitlines()) <= width
        for cell in ("0.3278", "0.6369", "1.6e-03", "all-linear", "COMPLETE", "PRUNED"):
            assert cell in text, cell
    wide = _printed(120, lambda c: c.print(trials_table(study, "", c.width)))
    narrow = _printed(80, lambda c: c.print(trials_table(study, "", c.width)))
    assert "trainable" in wide.splitlines()[1] and "trainable" not in narrow.splitlines()[1]


def test_a_pruned_baseline_is_compared_at_its_own_step():
    report = build_report(readme_study(baseline_pruned_at=40))
    (baseline,) = report["baselines"]
    assert baseline["step"] == 40 and baseline["best_val_loss_at_step"] == pytest.approx(0.4478)
    (line,) = [x for x in summary_lines(report) if x.startswith("Baseline:")]
    assert "0.6258 at step 40 (pruned there)" in line
    assert "the best had 0.4478 at that step, 0.1780 lower" in line


def test_the_qualified_configurations_are_named():
    lines = summary_lines(build_report(readme_study()))
    (line,) = [x for x in lines if "qualified" in x]
    assert "qualified (2): #6 r16 all-linear lr 8.5e-4, #9 r8 all-linear lr 1.6e-3" in line
