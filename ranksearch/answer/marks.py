"""How every plot names and marks trials: `#3 r8 qv lr 1e-3`, a star for the best, a ring for
the recommended, and which trials are drawn at all."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.answer.recommend import Answer
from ranksearch.config.space import TrialConfig

# how the answer is drawn: role -> (color, matplotlib marker, plotly symbol)
MARKS = {"best": ("#d62728", "*", "star"), "recommended": ("#2ca02c", "o", "circle-open")}
# every other trial or group: colors apart from those two
OTHERS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


# how a run name marks the answer (the plots' star and ring)
RUN_MARKS = {"best": "★ best", "recommended": "◎ recommended"}


def trial_label(t: FrozenTrial) -> str:
    """`#3 r8 qv lr 1e-3`: a trial by its number and configuration."""
    return config_label(t.number, TrialConfig.of(t))


def config_label(number: int, c: TrialConfig | None) -> str:
    """`#3 r8 qv lr 1e-3`: trial `number` with configuration `c` (before it is a FrozenTrial)."""
    if c is None:
        return f"#{number}"
    mantissa, exponent = f"{c.learning_rate:.1e}".split("e")
    lr = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"#{number} r{c.rank} {c.target_modules} lr {lr}"


def run_name(label: str, roles: list[str]) -> str:
    """A trial's MLflow run name: the answer's marks it carries, then its label (`★ best #9
    r8 qv lr 1e-3`); marks first, since the UI's narrow name column cuts a name's end."""
    return " ".join([*(RUN_MARKS[r] for r in roles), label])


def answer_roles(ans: Answer) -> list[tuple[str, FrozenTrial]]:
    """(role, trial) of the best and the recommended trial, those the study has."""
    return [(r, t) for r, t in (("best", ans.best), ("recommended", ans.recommended)) if t]


def curve_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Search trials that reported (confirmation trainings and replayed duplicates left out)."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and t.intermediate_values
        and "duplicate_of" not in t.user_attrs
        and not t.user_attrs.get("confirmation")
    ]


def drawn_study(study: optuna.Study) -> tuple[optuna.Study, list[int]]:
    """The study as Optuna's own plots and importances should see it: an in-memory copy holding
    the search trials that trained, and their numbers in the study (the copy numbers them from
    0). A replayed duplicate (`= trial N (not retrained)`) repeats its original's result and a
    confirmation training repeats a configuration with another seed: counted again, each would
    weigh its configuration twice."""
    kept = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and "duplicate_of" not in t.user_attrs
        and not t.user_attrs.get("confirmation")
    ]
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials(kept)
    return copy, [t.number for t in kept]
