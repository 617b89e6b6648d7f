"""Parameter importances, given only where the study's trials can tell them.

Optuna's fANOVA importances (seeded, so a report is reproducible) over the trained complete
search trials: replayed duplicates and confirmation runs are left out, since they repeat a
configuration and would weigh it twice. None below MIN_TRIALS of them: from fewer, the ranking
is noise presented as a finding. `report`'s line, its importances plot and its HTML figure all
come from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial

from ranksearch.answer.recommend import distinct_complete

# Trained complete trials below which no importance is given. Measured on the four stored grids
# (BENCHMARKS.md section 8, benchmarks/importance_reliability.py): fANOVA's top parameter matches
# the grid's in 58-84 % of subsets of 5 complete trials, and in 82-100 % from 12, the smallest
# size where every grid and kind of subset (random, or a TPE search's) is at 80 % or more.
MIN_TRIALS = 12


def param_importances(trials: Sequence[FrozenTrial]) -> dict[str, float] | None:
    """Importance per searched parameter, largest first, over `trials` as they are (no
    threshold: the benchmark measures with it); None when the evaluator cannot say."""
    study = optuna.create_study(direction="minimize")  # in memory, these trials only
    study.add_trials(list(trials))
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None  # too few distinct values to say anything
    return {k: round(float(v), 4) for k, v in found.items()}


def study_importances(trials: Sequence[FrozenTrial]) -> dict[str, float] | None:
    """What `report` shows: importances over the trained complete search trials, or None while
    there are fewer than MIN_TRIALS of them."""
    complete = distinct_complete(trials)
    if len(complete) < MIN_TRIALS:
        return None
    return param_importances(complete)


def withheld_note(n_complete: int) -> str | None:
    """The report's line where importances are withheld (`n_complete` trained complete search
    trials, fewer than MIN_TRIALS); None where they are shown or nothing completed."""
    if not n_complete or n_complete >= MIN_TRIALS:
        return None
    return (
        f"Importance:  not shown below {MIN_TRIALS} complete trials ({n_complete} so far): "
        "from fewer, their ranking is mostly noise"
    )
