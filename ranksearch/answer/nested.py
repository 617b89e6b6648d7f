"""A nested trial (search.rank_mode: nested) as the candidates it stands for: one per rank.

A nested trial trains one LoRA at the largest rank and reports every leading rank of it
(worker/nested.py). For the answer each rank is a candidate of its own: the trial's number,
the configuration at that rank (lora_alpha as a plain LoRA of that rank has it), that rank's
final val loss, metrics, per-example losses and trainable parameters. A rank the study then
trained again as a plain LoRA (a trial with `rank_check_of`) is answered by that training,
and its estimate steps aside.

Pure functions over FrozenTrials: no storage, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial, TrialState

from ranksearch.answer.losses import KEY, rank_key
from ranksearch.config.space import TrialConfig

PER_RANK = ("val_loss", "val_loss_se", "accuracy", "f1", "answer_accuracy", "perplexity")


def is_nested(t: FrozenTrial) -> bool:
    """A trial that trained nested ranks and reported them (its candidates are its ranks)."""
    return "nested" in t.user_attrs and "ranks" in t.user_attrs


def ranks_of(t: FrozenTrial) -> list[int]:
    return sorted(int(r) for r in t.user_attrs["ranks"])


def at_rank(t: FrozenTrial, rank: int) -> FrozenTrial:
    """Nested trial `t` as the plain LoRA of `rank` it holds (same number; `nested_rank` set)."""
    a = t.user_attrs
    nested = a["nested"]
    alpha = nested["alphas"][nested["ranks"].index(rank)]
    config = TrialConfig.of(t)
    shown = TrialConfig(**{**config.as_attr(), "rank": rank, "lora_alpha": alpha})
    metrics = a["ranks"][str(rank)]
    params = a.get("rank_params", {}).get(str(rank))
    attrs = {
        **{k: v for k, v in a.items() if k not in PER_RANK},
        **{k: metrics[k] for k in PER_RANK if k in metrics},
        "config": shown.as_attr(),
        "nested_rank": rank,
        "best_val_loss": metrics["val_loss"],
    }
    if params is not None:
        attrs["trainable_params"] = params
        if a.get("total_params"):
            attrs["trainable_fraction"] = params / a["total_params"]
    system = {k: v for k, v in t.system_attrs.items() if not k.startswith(KEY)}
    if rank_key(rank) in t.system_attrs:
        system[KEY] = t.system_attrs[rank_key(rank)]
    return FrozenTrial(
        number=t.number,
        state=t.state,
        value=metrics["val_loss"],
        values=None,
        datetime_start=t.datetime_start,
        datetime_complete=t.datetime_complete,
        params=t.params,
        distributions=t.distributions,
        user_attrs=attrs,
        system_attrs=system,
        intermediate_values=t.intermediate_values,
        trial_id=t._trial_id,
    )


def expand(trials: Sequence[FrozenTrial], keep_checked: bool = False) -> list[FrozenTrial]:
    """The candidates of these trained trials: a plain trial as it is, a nested one as its
    ranks, less the ranks a plain check of that trial trained again (`keep_checked`: all)."""
    checked = {
        (t.user_attrs["rank_check_of"], TrialConfig.of(t).rank)
        for t in trials
        if "rank_check_of" in t.user_attrs and t.state == TrialState.COMPLETE and not keep_checked
    }
    out: list[FrozenTrial] = []
    for t in trials:
        if is_nested(t):
            out += [at_rank(t, r) for r in ranks_of(t) if (t.number, r) not in checked]
        else:
            out.append(t)
    return out
