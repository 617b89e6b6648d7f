"""Proposals of a configuration the study already finished, and when they end the search.

The orchestrator answers such a proposal from the stored result (`= trial N (not retrained)`)
and records it, told with its twin's value; it does not use a trial of the budget (the
`duplicate` count of recommend.count_states), so the loop asks again. Two things end that:
every configuration of a discrete space trained, or too many proposals of finished ones in a row.

Why the repeat stays a recorded trial, told with the twin's value, rather than one hidden from
the sampler (told FAIL, which TPE ignores): a repeat changes no curve, but it adds an observation
to TPE's split of trials into good and bad, and that moves it on. Hidden, TPE's model is the one
that proposed the finished configuration, and it proposes it again. Replayed on the stored grids
(benchmarks/repeat_proposals.py, BENCHMARKS.md section 7), TPE made 1.0-1.7 repeats per search
to 6 full trials when told, 20-187 when hidden, where 24-85 % of the searches on the 18- and
12-configuration grids never got past 200 repeats; reach was the same.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial, TrialState

from ranksearch.config.schema import StudyConfig
from ranksearch.search.sampling import space_size

# Proposals of finished configurations in a row (in one `run`) before the search ends. Each
# costs an ask and a row, no training; a sampler that keeps proposing what it has has converged.
MAX_REPEATS_IN_A_ROW = 20


def trained_configs(trials: Sequence[FrozenTrial]) -> set[str]:
    """Config keys of the search trainings that finished (complete or pruned)."""
    return {
        t.user_attrs["config_key"]
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and "config_key" in t.user_attrs
        and "duplicate_of" not in t.user_attrs
        and not t.user_attrs.get("confirmation")
    }


def search_over(cfg: StudyConfig, trials: Sequence[FrozenTrial], repeats: int) -> str | None:
    """Why the search ends before its budget: the discrete space exhausted, or `repeats`
    proposals of finished configurations in a row; None while it goes on."""
    size = space_size(cfg)
    if size is not None and len(trained_configs(trials)) >= size:
        return (
            f"every configuration of the search space ({size}) is trained: the search is "
            "exhaustive, and the study ends here"
        )
    if repeats >= MAX_REPEATS_IN_A_ROW:
        return (
            f"the sampler's last {repeats} proposals were configurations the study had "
            "already trained: it has converged on what it tried, and the study ends here "
            f"({len(trained_configs(trials))} configurations trained). For more, widen "
            "`search:` or use `sampler.type: random`"
        )
    return None
