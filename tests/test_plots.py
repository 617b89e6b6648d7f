"""Plots of a study built from constructed trials (a real in-memory Optuna study)."""

import re

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from ranksearch.plots import make_plots


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
                    "config": {"rank": rank, "target_modules": "qv", "learning_rate": lr},
                    "trainable_params": rank * 1000,
                    "wall_seconds": 10.0 + rank,
                },
            )
        )
    return study


def test_html_plots_embed_plotly_and_load_nothing_from_the_network(tmp_path):
    files = make_plots(_study(), tmp_path)
    html = [p for p in files if p.suffix == ".html"]
    assert {p.name for p in html} >= {"curves.html", "parallel_coordinate.html", "slice.html"}
    for path in html:
        text = path.read_text()
        # plotly.js names its CDN inside its own code; no script may load from a URL
        assert not re.search(r"<script[^>]*\bsrc=[\"']?https?://", text), path.name
        assert 'src="https://cdn.plot.ly' not in text, path.name
        assert "Plotly.newPlot" in text and len(text) > 1_000_000, path.name  # plotly.js inline
