"""The confirmation round through the CLI: more seeds, outside the budget, analysed, tracked."""

import json

import optuna
import pytest
from mlflow import MlflowClient

from ranksearch.answer.losses import per_example
from ranksearch.answer.recommend import answer

from ..cli.test_commands import FIXED
from ..conftest import run_cli, write_study


@pytest.mark.e2e
def test_confirm_trains_more_seeds_and_updates_the_recommendation(
    tmp_path, tiny_bert, sentiment_csv
):
    study_file = write_study(
        tmp_path / "conf.yaml",
        tiny_bert,
        sentiment_csv,
        search=FIXED,
        sampler="grid",
        pruner={"type": "none"},
        training={"max_steps": 4, "eval_every": 2, "batch_size": 8},
        confirm={"top": 2, "seeds": 2},
    )
    out = tmp_path / "out"
    # `confirm:` in the study file: the round runs right after the search
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "confirmation round: 2 more trainings" in r.stdout
    study = optuna.load_study(study_name="conf", storage=f"sqlite:///{out / 'optuna.db'}")
    search = [t for t in study.trials if not t.user_attrs.get("confirmation")]
    confirmations = [t for t in study.trials if t.user_attrs.get("confirmation")]
    assert len(search) == 2 and len(confirmations) == 2
    for t in confirmations:
        origin = study.trials[t.user_attrs["confirm_of"]]
        assert t.params == origin.params and t.user_attrs["seed"] == 1
        assert sorted(t.intermediate_values) == [2, 4]  # full budget, never pruned
        assert t.value != origin.value  # another seed, another fine-tune
    # a second `confirm` with the same settings has nothing left to do; more seeds add trainings
    r = run_cli(
        "confirm", "--study", str(study_file), "--out", str(out), "--seeds", "3", cwd=tmp_path
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 trainings to go" in r.stdout and "Confirmed recommendation: trial" in r.stdout
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0 and "confirmation round" not in r.stdout  # budget unaffected
    report = json.loads(
        run_cli(
            "report",
            "--study",
            str(study_file),
            "--out",
            str(out),
            "--format",
            "json",
            "--no-plots",
            cwd=tmp_path,
        ).stdout
    )
    confirmation = report["confirmation"]
    assert confirmation["test"] == "welch-t one-sided"
    assert [c["n"] for c in confirmation["candidates"]] == [3, 3]
    for c in confirmation["candidates"]:
        assert c["std_val_loss"] > 0 and len(c["values"]) == 3
    assert confirmation["recommended"] in (0, 1)
    assert report["counts"]["complete"] == 2 and report["counts"]["confirmation"] == 4
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("conf")
    tagged = client.search_runs([exp.experiment_id], "tags.confirmation = 'True'")
    assert len(tagged) == 4 and all(r.info.status == "FINISHED" for r in tagged)
    # the parent run carries the answer after the round, and the round's recommendation
    (parent,) = client.search_runs([exp.experiment_id], "tags.`ranksearch.role` = 'study'")
    ans = answer(
        optuna.load_study(study_name="conf", storage=f"sqlite:///{out / 'optuna.db'}").trials
    )
    assert parent.data.tags["best_trial"] == str(ans.best.number)
    assert parent.data.tags["recommended_trial"] == str(ans.recommended.number)
    assert parent.data.tags["confirmed_recommended_trial"] == str(confirmation["recommended"])
    # the MLflow model under the parent follows the confirmed recommendation
    assert parent.data.tags["ranksearch.model_trial"] == str(confirmation["recommended"])
    model_id = parent.data.tags["ranksearch.model_uri"].removeprefix("models:/")
    assert client.get_logged_model(model_id).tags["ranksearch.trial"] == str(
        confirmation["recommended"]
    )
    # the answer's margin: the paired standard error over the same validation examples, plus
    # the seed noise the round measured
    trials = optuna.load_study(study_name="conf", storage=f"sqlite:///{out / 'optuna.db'}").trials
    assert len({len(per_example(t)) for t in trials}) == 1  # the same examples
    assert len(per_example(trials[0])) > 1
    assert ans.tolerance_rule == "1se+seed" and ans.seed_std > 0
    assert report["tolerance"]["rule"] == "1se+seed" and report["tolerance"]["notes"] == []
    # `run`'s closing lines, `report`, `status` and the parent name the same trials
    assert report["best"]["trial"] == ans.best.number
    assert f"Best: trial {ans.best.number} " in r.stdout
    assert f"Recommended: trial {ans.recommended.number} " in r.stdout
    status = json.loads(
        run_cli("status", "--study", str(study_file), "--out", str(out), "--format", "json",
                cwd=tmp_path).stdout
    )  # fmt: skip
    assert (status["best"], status["recommended"]) == (ans.best.number, ans.recommended.number)
