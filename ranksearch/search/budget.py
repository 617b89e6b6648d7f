"""A search's budget in compute, and when a study has its answer.

Compute is counted in full trials: the optimizer steps the study's search trials trained,
over `training.max_steps`. A trial pruned at step 40 of 100 costs 0.4; a configuration answered
from a finished twin (`duplicate_of`) costs nothing; confirmation runs are outside the search.

Two rules end a search before `budget.n_trials` (pure functions on the study's trials, used by
the orchestrator and by `benchmarks/replay.py` alike, so the replays measure what ships):
- `budget.full_trials: N`: no trial starts once N full trials of compute are spent.
- `budget.stop_when_converged: true`: no trial starts once the last CONVERGED_PATIENCE full
  trials of compute brought no new best lower than the old one by more than the noise (the
  paired standard error of their per-example validation losses, `recommend.paired_se`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from optuna.trial import FrozenTrial, TrialState

from ranksearch.answer.recommend import paired_se
from ranksearch.config.schema import StudyConfig
from ranksearch.search.sampling import space_size

# full trials of compute without a better answer before a study stops by itself; and how many
# standard errors a new best must gain to count. Chosen on BENCHMARKS.md's replays of every
# grid and wrong-prior variant ("The shipped defaults").
CONVERGED_PATIENCE = 2.0
CONVERGED_Z = 1.0


def trial_steps(t: FrozenTrial) -> int:
    """Optimizer steps a search trial trained: up to its last report (the trial's whole budget
    once complete); 0 for a replayed duplicate or a confirmation run."""
    if "duplicate_of" in t.user_attrs or t.user_attrs.get("confirmation"):
        return 0
    return max(t.intermediate_values, default=0)


def full_trials_spent(trials: Sequence[FrozenTrial], max_steps: int) -> float:
    """Compute the study's search trials spent (running ones so far), in full trials."""
    return sum(trial_steps(t) for t in trials) / max_steps


def improves(new: FrozenTrial, best: FrozenTrial, z: float = CONVERGED_Z) -> bool:
    """Whether `new` beats `best` by more than `z` standard errors of their difference: paired
    over per-example losses where both carry them, else from each mean's standard error."""
    se = paired_se(new, best)
    if se is None:
        a, b = new.user_attrs.get("val_loss_se"), best.user_attrs.get("val_loss_se")
        se = math.hypot(a, b) if a is not None and b is not None else 0.0
    return new.value < best.value - z * se


def last_gain(trials: Sequence[FrozenTrial], max_steps: int, z: float = CONVERGED_Z) -> float:
    """Full trials of compute spent, in trial order, up to the end of the last trial that gave
    the study a better answer (`improves`); inf while no search trial is complete."""
    spent, best, at = 0.0, None, math.inf
    for t in sorted(trials, key=lambda t: t.number):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        spent += trial_steps(t) / max_steps
        if t.state != TrialState.COMPLETE or trial_steps(t) == 0:
            continue  # pruned, failed, a duplicate or a confirmation: no new answer
        if best is None or improves(t, best, z):
            best, at = t, spent
        elif t.value < best.value:
            best = t  # the best moves, within the noise: no gain
    return at


def converged(
    trials: Sequence[FrozenTrial],
    max_steps: int,
    patience: float = CONVERGED_PATIENCE,
    z: float = CONVERGED_Z,
) -> bool:
    """True once `patience` full trials of compute finished after the last real gain."""
    finished = [t for t in trials if t.state.is_finished()]
    return full_trials_spent(finished, max_steps) - last_gain(trials, max_steps, z) >= patience


def stop_reason(trials: Sequence[FrozenTrial], cfg: StudyConfig) -> str | None:
    """Why the study starts no more trials, or None while its compute budget holds."""
    b, max_steps = cfg.budget, cfg.training.max_steps
    spent = full_trials_spent(trials, max_steps)
    if b.full_trials is not None and spent >= b.full_trials - 1e-9:
        return f"budget.full_trials: {spent:.2f} of {b.full_trials:g} full trials spent"
    if b.stop_when_converged and converged(trials, max_steps):
        return (
            f"converged: no better answer beyond the noise in the last {CONVERGED_PATIENCE:g} "
            f"full trials of compute ({spent:.2f} spent; budget.stop_when_converged: false "
            "runs on)"
        )
    return None


def compute_line(trials: Sequence[FrozenTrial], cfg: StudyConfig) -> str:
    """What `status`, the live view and the end of `run` print: compute spent in full trials,
    the budget in compute, and what training every configuration once would cost."""
    spent = full_trials_spent(trials, cfg.training.max_steps)
    cap = cfg.budget.full_trials
    line = f"compute: {spent:.2f} full trials" + (f" of {cap:g}" if cap is not None else "")
    grid = space_size(cfg)
    if grid is not None:
        line += f"; the exhaustive grid: {grid} full trials"
    return line
