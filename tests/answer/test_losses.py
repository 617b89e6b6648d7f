"""Per-example validation losses: kept compactly and out of Optuna's own tools, on a real study
and through the real `optuna` CLI; old studies (a plain list attribute) still read."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ranksearch.answer.losses import KEY, OLD_KEY, decode, encode, per_example
from ranksearch.answer.recommend import answer


def _trials(out):
    study = optuna.load_study(study_name="finished", storage=f"sqlite:///{out / 'optuna.db'}")
    return study.trials


def test_encoding_gives_back_the_rounded_losses_exactly():
    losses = [0.0, 0.1234, 2.5, 17.0001, 0.3 + 0.0001, 123.4567]
    assert decode(encode(losses)) == losses


def test_optuna_cli_lines_keep_ordinary_widths(finished_study):
    out = finished_study
    trials = _trials(out)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete and all(OLD_KEY not in t.user_attrs for t in trials)
    for t in complete:  # the worker's own record, in the trial folder, kept exactly
        end = [json.loads(x) for x in (out / "trials" / str(t.number) / "reports.jsonl").open()]
        assert per_example(t) == next(e for e in end if e.get("event") == "end")["val_losses"]
        assert len(per_example(t)) == 60
    cmd = [str(Path(sys.executable).parent / "optuna"), "trials", "--study-name", "finished"]
    cmd += ["--storage", f"sqlite:///{out / 'optuna.db'}"]
    lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) > len(trials)
    # every column is a few words (the configuration's is the widest, ~200 characters); the
    # 60 losses of this study alone made lines 470 characters longer
    assert max(map(len, lines)) < 1_400
    best = subprocess.run(
        [cmd[0], "best-trial", *cmd[2:], "-f", "yaml"], capture_output=True, text=True
    )
    assert best.returncode == 0 and len(best.stdout.splitlines()) < 80


def _as_old(t: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """The same trial as a study recorded before: the losses as a plain list attribute."""
    old = copy.deepcopy(t)
    if KEY in t.system_attrs:
        old.user_attrs = {**t.user_attrs, OLD_KEY: per_example(t)}
        old.system_attrs = {k: v for k, v in t.system_attrs.items() if k != KEY}
    return old


@pytest.mark.parametrize("tolerance", ["1se", "1se-mean"])
def test_the_paired_rule_answers_as_before_on_the_same_losses(finished_study, tolerance):
    trials = _trials(finished_study)
    new, old = answer(trials, tolerance), answer([_as_old(t) for t in trials], tolerance)
    assert new.tolerance_rule == ("1se" if tolerance == "1se" else "1se-mean")
    assert (new.best.number, new.recommended.number) == (old.best.number, old.recommended.number)
    assert new.margins == old.margins and new.candidates == old.candidates
