"""Export round-trip: the adapter loads with PeftModel and reproduces the trial's val loss."""

import functools
import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from datasets import load_from_disk
from torch.utils.data import DataLoader

from ranksearch.worker import TrialSpec
from ranksearch.worker.batches import pad_collate

from ..conftest import FIXED, run_cli, write_study


def _val_loss(adapter: Path, spec: TrialSpec) -> float:
    """Evaluate an exported adapter on the study's validation split, outside ranksearch."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(spec.model.path, num_labels=2)
    base.config.pad_token_id = 0
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    val = load_from_disk(str(Path(spec.data.path) / "validation"))
    collate = functools.partial(pad_collate, pad_id=0, causal=False)
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(val, batch_size=16, collate_fn=collate):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            total += torch.nn.functional.cross_entropy(
                logits, batch["labels"], reduction="sum"
            ).item()
            n += len(batch["labels"])
    return total / n


def test_export_copies_a_loadable_adapter_with_its_settings(grid_study):
    tmp, study_file, out, study = grid_study
    dest = tmp / "best"
    r = run_cli(
        "export",
        "--study",
        str(study_file),
        "--out",
        str(out),
        "--trial",
        "best",
        "--to",
        str(dest),
        cwd=tmp,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    best = min(study.trials, key=lambda t: t.value)
    manifest = json.loads((dest / "ranksearch.json").read_text())
    assert manifest["trial"] == best.number and manifest["retrained"] is False
    assert manifest["command"] == "ranksearch run --study study.yaml"
    # the label names of data.labels, in the form from_pretrained takes them
    assert manifest["id2label"] == {"0": "neg", "1": "pos"}
    assert manifest["label2id"] == {"neg": 0, "pos": 1}
    from transformers import AutoConfig

    id2label = {int(i): name for i, name in manifest["id2label"].items()}  # the README's recipe
    labelled = AutoConfig.from_pretrained(
        manifest["base_model"], id2label=id2label, label2id=manifest["label2id"]
    )
    assert labelled.id2label == {0: "neg", 1: "pos"} and labelled.num_labels == 2
    assert json.loads((dest / "lora_config.json").read_text())["r"] == best.params["rank"]
    assert (dest / "study.yaml").read_text() == study_file.read_text()
    spec = TrialSpec.read(out / best.user_attrs["trial_dir"] / "spec.json")
    assert _val_loss(dest, spec) == pytest.approx(best.value, abs=1e-5)


@pytest.mark.e2e
def test_a_missing_adapter_is_retrained_from_the_spec_with_the_same_seed(grid_study):
    tmp, study_file, shared, study = grid_study
    out = tmp / "missing-adapter"  # a copy: the study is shared with other tests
    shutil.copytree(shared, out)
    trial = study.trials[1]
    shutil.rmtree(out / trial.user_attrs["trial_dir"] / "adapter")
    dest = tmp / "retrained"
    r = run_cli(
        "export",
        "--study",
        str(study_file),
        "--out",
        str(out),
        "--trial",
        "1",
        "--to",
        str(dest),
        cwd=tmp,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "retrained from its spec" in r.stdout
    manifest = json.loads((dest / "ranksearch.json").read_text())
    assert manifest["retrained"] and manifest["retrained_val_loss"] == pytest.approx(
        trial.value, abs=1e-6
    )  # deterministic on CPU: the same fine-tune
    spec = TrialSpec.read(out / trial.user_attrs["trial_dir"] / "spec.json")
    assert _val_loss(dest, spec) == pytest.approx(trial.value, abs=1e-5)


def test_export_names_a_bad_trial(grid_study):
    tmp, study_file, out, _ = grid_study
    r = run_cli(
        "export",
        "--study",
        str(study_file),
        "--out",
        str(out),
        "--trial",
        "99",
        "--to",
        str(tmp / "x"),
        cwd=tmp,
    )
    assert r.returncode == 2 and "--trial 99" in r.stderr


def test_a_spec_of_another_version_is_refused_before_anything_is_written(grid_study):
    tmp, study_file, out, _ = grid_study
    other = tmp / "other-version"
    shutil.copytree(out, other)
    spec = other / "trials" / "0" / "spec.json"
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "version": 99}))
    dest = tmp / "refused"
    r = run_cli("export", "--study", str(study_file), "--out", str(other), "--trial", "0",
                "--to", str(dest), cwd=tmp)  # fmt: skip
    assert r.returncode == 2 and "spec key 'version' is 99" in r.stderr, r.stdout + r.stderr
    assert "rerun the trial" in r.stderr and not dest.exists()


@pytest.mark.e2e
def test_a_moved_study_reports_exports_and_resumes(tmp_path, tiny_bert, sentiment_csv):
    """A finished study directory, moved: every command works on the new place, and nothing is
    read from or written into the old one (which no longer exists)."""
    from mlflow import MlflowClient

    study_file = write_study(
        tmp_path / "moved.yaml",
        tiny_bert,
        sentiment_csv,
        search={**FIXED, "rank": [2, 4, 8]},
        sampler="grid",
        pruner={"type": "none"},
        budget={"n_trials": 2},
        training={"max_steps": 4, "eval_every": 2, "batch_size": 8},
    )
    original, copy = tmp_path / "original", tmp_path / "elsewhere" / "copy"
    r = run_cli("run", "--study", str(study_file), "--out", str(original), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    study = optuna.load_study(study_name="moved", storage=f"sqlite:///{copy / 'optuna.db'}")
    assert {t.user_attrs["trial_dir"] for t in study.trials} == {"trials/0", "trials/1"}

    r = run_cli("report", "--study", str(study_file), "--out", str(copy), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (copy / "plots" / "curves.png").is_file()
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("moved")
    assert exp.artifact_location == (copy / "mlartifacts").resolve().as_uri()
    (parent,) = client.search_runs([exp.experiment_id], "tags.`ranksearch.role` = 'study'")
    assert parent.info.artifact_uri.startswith(exp.artifact_location)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/curves.png" in logged
    assert (copy / "mlartifacts" / parent.info.run_id / "artifacts/plots/curves.png").is_file()

    # export: the kept adapter is copied; a deleted one is retrained from the moved spec
    shutil.rmtree(copy / "trials" / "1" / "adapter")
    for which in ("0", "1"):
        r = run_cli("export", "--study", str(study_file), "--out", str(copy), "--trial", which,
                    "--to", str(tmp_path / f"export-{which}"), cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        manifest = json.loads((tmp_path / f"export-{which}" / "ranksearch.json").read_text())
        if manifest["retrained"]:
            assert manifest["retrained_val_loss"] == pytest.approx(manifest["val_loss"], abs=1e-6)
    assert "retrained from its spec" in r.stdout

    # resume with one more trial: it trains in the copy and logs there
    r = run_cli("run", "--study", str(study_file), "--out", str(copy), "--set",
                "budget.n_trials=3", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert (copy / "trials" / "2" / "adapter" / "adapter_config.json").is_file()
    runs = client.search_runs([exp.experiment_id], "tags.`optuna.trial_number` = '2'")
    assert runs[0].info.artifact_uri.startswith(exp.artifact_location)
    assert not original.exists()
