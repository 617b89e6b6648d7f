"""A nested trial as the answer sees it: one candidate per rank, paired on that rank's
per-example losses, and a plain check of a rank answering for its estimate."""

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from ranksearch.answer.confirm import MAX_RANK_CHECKS, rank_check
from ranksearch.answer.losses import KEY, encode, rank_key
from ranksearch.answer.nested import at_rank, expand
from ranksearch.answer.recommend import answer, best_of, count_states, rank_view

from ..conftest import config_attr

PER_EXAMPLE = {  # 8 validation examples; rank 4 is within noise of rank 8, rank 2 is not
    2: [0.50, 0.62, 0.41, 0.58, 0.55, 0.49, 0.60, 0.52],
    4: [0.41, 0.49, 0.34, 0.46, 0.44, 0.40, 0.47, 0.43],
    8: [0.40, 0.50, 0.32, 0.47, 0.44, 0.39, 0.49, 0.42],
}


def _mean(xs):
    return sum(xs) / len(xs)


def nested_trial(number: int, shift: float = 0.0, **attrs) -> optuna.trial.FrozenTrial:
    losses = {r: [x + shift for x in v] for r, v in PER_EXAMPLE.items()}
    ranks = {str(r): {"val_loss": _mean(v), "val_loss_se": 0.01, "accuracy": 0.8}
             for r, v in losses.items()}  # fmt: skip
    return create_trial(
        state=TrialState.COMPLETE,
        value=min(m["val_loss"] for m in ranks.values()),
        params={"learning_rate": 1e-3},
        distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
        user_attrs={
            "config": config_attr(8),
            "nested": {"ranks": [2, 4, 8], "alphas": [4, 8, 16]},
            "ranks": ranks,
            "rank_params": {"2": 1_200, "4": 2_400, "8": 4_800},
            "total_params": 100_000,
            "trainable_params": 4_800,
            **attrs,
        },
        system_attrs={
            KEY: encode(losses[8]),
            **{rank_key(r): encode(v) for r, v in losses.items()},
        },  # fmt: skip
    )


def numbered(trials):
    for i, t in enumerate(trials):
        t.number = i
    return trials


def test_each_rank_of_a_nested_trial_is_a_candidate_of_its_own():
    t = numbered([nested_trial(0)])[0]
    r4 = at_rank(t, 4)
    assert r4.number == 0 and r4.value == pytest.approx(_mean(PER_EXAMPLE[4]))
    assert r4.user_attrs["config"]["rank"] == 4 and r4.user_attrs["config"]["lora_alpha"] == 8
    assert r4.user_attrs["trainable_params"] == 2_400
    assert r4.user_attrs["trainable_fraction"] == pytest.approx(0.024)
    assert r4.user_attrs["nested_rank"] == 4
    from ranksearch.answer.losses import per_example

    assert per_example(r4) == PER_EXAMPLE[4]  # the paired rule compares that rank's losses
    assert [c.user_attrs["nested_rank"] for c in expand([t])] == [2, 4, 8]


def test_the_answer_picks_the_smallest_rank_within_the_paired_margin():
    trials = numbered([nested_trial(0), nested_trial(0, shift=0.2)])
    ans = answer(trials)
    assert ans.best.number == 0 and ans.best.user_attrs["nested_rank"] == 8
    assert ans.recommended.number == 0 and ans.recommended.user_attrs["nested_rank"] == 4
    assert "0@r4" in ans.margins and "0@r2" in ans.margins
    assert [c.user_attrs["nested_rank"] for c in ans.within] == [4, 8]
    assert ans.candidates == [0]
    assert best_of(trials).user_attrs["nested_rank"] == 8
    rows = {row["rank"]: row for row in rank_view(trials)}
    assert rows[4]["best_trainable_params"] == 2_400 and rows[4]["nested"]
    assert rows[8]["trials"] == 2


def test_a_plain_check_answers_for_its_estimate_and_checks_stop():
    trials = numbered([nested_trial(0)])
    job = rank_check(trials, "1se")
    assert job["attrs"] == {"rank_check_of": 0, "rank_check_rank": 4,
                            "nested_estimate": pytest.approx(_mean(PER_EXAMPLE[4]))}  # fmt: skip
    # the plain rank-4 training came out as its estimate: it is the answer, nothing to check
    check = create_trial(
        state=TrialState.COMPLETE,
        value=_mean(PER_EXAMPLE[4]) + 0.001,
        params={"learning_rate": 1e-3},
        distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
        user_attrs={"config": config_attr(4), "trainable_params": 2_400, **job["attrs"]},
        system_attrs={KEY: encode([x + 0.001 for x in PER_EXAMPLE[4]])},
    )
    trials = numbered([*trials, check])
    ans = answer(trials)
    assert ans.recommended.number == 1 and "nested_rank" not in ans.recommended.user_attrs
    assert "0@r4" not in ans.margins  # the estimate steps aside for the training
    assert rank_check(trials, "1se") is None
    assert count_states(trials)["confirmation"] == 1 and count_states(trials)["complete"] == 1

    # a check far worse than its estimate moves the answer; the next check is the last one
    worse = create_trial(
        state=TrialState.COMPLETE, value=0.9, params=check.params,
        distributions=check.distributions, user_attrs=check.user_attrs,
        system_attrs={KEY: encode([0.9] * 8)},
    )  # fmt: skip
    trials = numbered([nested_trial(0), worse])
    assert answer(trials).recommended.user_attrs["nested_rank"] == 8
    job = rank_check(trials, "1se")
    assert job["attrs"]["rank_check_rank"] == 8
    assert MAX_RANK_CHECKS == 2
    interrupted = {**job["attrs"], "fail_reason": "interrupted"}  # planned again by `run`
    again = rank_check([*trials, create_trial(state=TrialState.FAIL, user_attrs=interrupted)],
                       "1se")  # fmt: skip
    assert again["attrs"] == job["attrs"]
    assert rank_check([*trials, create_trial(state=TrialState.FAIL, user_attrs=job["attrs"])],
                      "1se") is None  # fmt: skip
