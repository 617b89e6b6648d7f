"""A nested-rank study end to end: one nested trial per configuration of the other dimensions,
every rank reported, the recommended rank trained once as a plain LoRA and exported as one."""

import json

import optuna
import pytest
from optuna.trial import TrialState

from ..conftest import run_cli, write_study

NESTED = {
    "rank": [2, 4, 8],
    "alpha_ratio": 2,
    "dropout": 0.0,
    "target_modules": {"qv": ["query", "value"], "all-linear": "all-linear"},
    "learning_rate": [5e-3],
    "rank_mode": "nested",
}


@pytest.mark.e2e
def test_a_nested_study_reports_every_rank_and_trains_its_answer_as_a_plain_lora(
    tmp_path, tiny_bert, sentiment_csv
):
    study = write_study(
        tmp_path / "nested.yaml",
        tiny_bert,
        sentiment_csv,
        search=NESTED,
        sampler={"type": "grid", "seed": 0},
        pruner={"type": "none"},
        budget={"n_trials": 2},
        training={"max_steps": 6, "eval_every": 2, "batch_size": 8, "seed": 0},
        tracking="none",
    )
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study), "--out", str(out), "--plain", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    trials = optuna.load_study(
        study_name="nested", storage=f"sqlite:///{out}/optuna.db"
    ).get_trials()
    nested = [t for t in trials if "nested" in t.user_attrs]
    checks = [t for t in trials if "rank_check_of" in t.user_attrs]
    # one nested trial per module set (rank is no sampler dimension), every rank reported
    assert sorted(t.params["target_modules"] for t in nested) == ["all-linear", "qv"]
    assert all("rank" not in t.params for t in trials)
    for t in nested:
        assert t.state == TrialState.COMPLETE
        assert set(t.user_attrs["ranks"]) == {"2", "4", "8"}
        assert set(t.user_attrs["rank_params"]) == {"2", "4", "8"}
        assert t.value == min(m["val_loss"] for m in t.user_attrs["ranks"].values())
        lines = (out / "trials" / str(t.number) / "reports.jsonl").read_text().splitlines()
        evaluations = [json.loads(x) for x in lines if '"val_loss"' in x and "ranks" in x]
        assert [e["step"] for e in evaluations] == [2, 4, 6]
        assert all(set(e["ranks"]) == {"2", "4", "8"} for e in evaluations)

    # the answer's rank trained once as a plain LoRA of that rank, at the full budget; a
    # check outside its margin moves the answer, and a second (the last) check follows
    assert 1 <= len(checks) <= 2, r.stdout[-3000:]
    by_number = {t.number: t for t in trials}
    for check in checks:
        origin = by_number[check.user_attrs["rank_check_of"]]
        rank = check.user_attrs["rank_check_rank"]
        config = check.user_attrs["config"]
        assert check.state == TrialState.COMPLETE and config["rank"] == rank
        assert config["lora_alpha"] == 2 * rank and check.params == origin.params
        estimate = origin.user_attrs["ranks"][str(rank)]["val_loss"]
        assert check.user_attrs["nested_estimate"] == estimate
        assert check.user_attrs["trainable_params"] == origin.user_attrs["rank_params"][str(rank)]
        spec = json.loads((out / "trials" / str(check.number) / "spec.json").read_text())
        assert "nested" not in spec and spec["lora"]["r"] == rank
    assert "nested answer: rank" in r.stdout and "by rank" in r.stdout
    assert "trained as a plain LoRA" in r.stdout

    # the report names the plain training; export writes a plain PEFT adapter of that rank
    report = json.loads(
        run_cli("report", "--study", str(study), "--out", str(out), "--format", "json",
                cwd=tmp_path).stdout
    )  # fmt: skip
    assert report["baselines"] == []  # a plain check is no enqueued baseline
    notes = {row["number"]: row["note"] for row in report["trials"]}
    for check in checks:
        assert notes[check.number].startswith(
            f"plain check of #{check.user_attrs['rank_check_of']}"
        )
    assert all(notes[t.number].startswith("nested: best at r") for t in nested)
    assert (out / "plots" / "nested_ranks.png").is_file()  # the rank curves, one plot
    ranks = {row["rank"]: row for row in report["ranks"]}
    assert set(ranks) == {2, 4, 8} and all(row["nested"] for row in ranks.values())
    assert report["counts"]["complete"] == 2 and report["counts"]["confirmation"] == len(checks)
    # what the study recommends (and exports) is the plain training, beside its estimate
    recommended, brief = report["recommended"]["trial"], report["recommended"]
    if recommended in {t.number for t in checks}:
        check = by_number[recommended]
        assert brief["rank_check_of"] == check.user_attrs["rank_check_of"]
        assert brief["nested_estimate"] == check.user_attrs["nested_estimate"]
        assert brief["nested_rank"] is None
    else:  # both checks did worse than their estimates: the answer stays an estimate
        assert len(checks) == 2 and brief["nested_rank"] is not None
    e = run_cli("export", "--study", str(study), "--out", str(out), "--to", str(tmp_path / "x"),
                cwd=tmp_path)  # fmt: skip
    assert e.returncode == 0, e.stdout[-2000:] + e.stderr[-2000:]
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert adapter["r"] == brief["config"]["rank"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    PeftModel.from_pretrained(base, tmp_path / "x")
