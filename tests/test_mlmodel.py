"""The recommendation as an MLflow model: logged under the parent run, registered, loaded back
with one call and scored, against the trial's own adapter loaded with PEFT."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from ranksearch.answer.recommend import answer

from .conftest import run_cli, write_study

TEXTS = ["the movie was great and fine", "awful plot so sad", "it was the cast", "love love"]


@pytest.fixture(scope="module")
def registered(grid_study):
    """conftest's finished study: its recommendation is logged and registered as `reg-lora`."""
    _, _, out, study = grid_study
    return out, study, MlflowClient(f"sqlite:///{out / 'mlflow.db'}")


@contextlib.contextmanager
def _tracking(client: MlflowClient):
    """MLflow's global tracking URI (models:/ URIs resolve through it), unset afterwards:
    MLflow exports it to the environment, where later `ranksearch run`s would find it."""
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def _parent(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`ranksearch.role` = 'study'")
    return parent


def _peft_scores(out, trial, texts: list[str]) -> list[tuple[str, float]]:
    """The trial's kept adapter on its base model, loaded by hand: what the model must say."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = json.loads((out / "trials" / str(trial.number) / "spec.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(spec["model"]["path"], num_labels=2)
    base.config.pad_token_id = 0
    model = PeftModel.from_pretrained(base, out / "trials" / str(trial.number) / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(spec["model"]["path"])
    with torch.no_grad():
        probs = model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    return [(("neg", "pos")[int(i)], float(p)) for p, i in zip(*probs.max(-1), strict=True)]


def test_the_recommended_model_loads_with_one_call_and_scores(registered, tiny_bert):
    out, study, client = registered
    recommended = answer(study.trials).recommended
    parent = _parent(client, "reg")
    assert parent.data.tags["ranksearch.model_trial"] == str(recommended.number)
    with _tracking(client):
        model = mlflow.pyfunc.load_model(parent.data.tags["ranksearch.model_uri"])
        files = Path(mlflow.artifacts.download_artifacts(parent.data.tags["ranksearch.model_uri"]))
    scored = model.predict(pd.DataFrame({"text": TEXTS}))
    assert list(scored.columns) == ["label", "score"] and len(scored) == len(TEXTS)
    expected = _peft_scores(out, recommended, TEXTS)
    assert scored["label"].tolist() == [label for label, _ in expected]
    assert scored["score"].tolist() == pytest.approx([p for _, p in expected], abs=1e-5)
    # what it carries: the export folder, with the label names and the base model's reference
    logged = client.get_logged_model(parent.data.tags["ranksearch.model_uri"].split("/")[-1])
    assert logged.source_run_id == parent.info.run_id
    # in the study's experiment, its files in the study directory (a moved study keeps them)
    assert logged.experiment_id == parent.info.experiment_id
    assert logged.artifact_location.startswith((out / "mlartifacts").resolve().as_uri())
    assert logged.tags["ranksearch.trial"] == str(recommended.number)
    assert (files / "artifacts/adapter/adapter_model.safetensors").is_file()
    manifest = json.loads((files / "artifacts/adapter/ranksearch.json").read_text())
    assert manifest["trial"] == recommended.number
    assert manifest["id2label"] == {"0": "neg", "1": "pos"}
    assert manifest["base_model_reference"] == str(tiny_bert)  # as the study gave it
    assert model.metadata.metadata["labels"] == ["neg", "pos"]


def test_register_names_a_registry_version_of_the_same_model(registered):
    out, study, client = registered
    parent = _parent(client, "reg")
    (version,) = client.search_model_versions("name = 'reg-lora'")
    assert version.run_id == parent.info.run_id
    assert parent.data.tags["ranksearch.registered_model"] == f"models:/reg-lora/{version.version}"
    with _tracking(client):
        model = mlflow.pyfunc.load_model(f"models:/reg-lora/{version.version}")
    scored = model.predict(pd.DataFrame({"text": TEXTS[:2]}))
    assert set(scored["label"]) <= {"neg", "pos"}


def test_a_second_finish_with_the_same_answer_logs_no_second_model(registered, tmp_path):
    out, study, client = registered
    study_file = out.parent / "reg.yaml"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=out.parent)
    assert r.returncode == 0, r.stdout + r.stderr  # resumed: nothing to train, same answer
    assert len(client.search_model_versions("name = 'reg-lora'")) == 1


@pytest.mark.parametrize(
    ("tracking", "fix"),
    [
        ({"register": "a/b"}, "without '/' or ':'"),
        ({"register": "m", "log_adapters": "none"}, "set log_adapters to answer"),
    ],
)
def test_bad_register_exits_2_naming_the_key(tmp_path, tiny_bert, sentiment_csv, tracking, fix):
    study_file = write_study(tmp_path / "bad.yaml", tiny_bert, sentiment_csv, tracking=tracking)
    r = run_cli("validate", "--study", str(study_file), "--schema-only", cwd=tmp_path)
    assert r.returncode == 2 and "`tracking.register`" in r.stderr and fix in r.stderr


def test_a_causal_lm_model_loads_and_completes(tmp_path, tiny_gpt2, sentiment_csv):
    study_file = write_study(
        tmp_path / "lm.yaml",
        tiny_gpt2,
        sentiment_csv,
        task="causal-lm",
        data={"source": str(sentiment_csv), "text_column": "review", "max_length": 16},
        search={
            "rank": 4,
            "alpha_ratio": 2,
            "target_modules": {"attn": ["c_attn"]},
            "learning_rate": 1e-3,
        },
        pruner={"type": "none"},
        budget={"n_trials": 1},
        training={"max_steps": 2, "eval_every": 2, "batch_size": 8},
    )
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    with _tracking(client):
        model = mlflow.pyfunc.load_model(_parent(client, "lm").data.tags["ranksearch.model_uri"])
    done = model.predict(pd.DataFrame({"text": ["the movie was"]}), params={"max_new_tokens": 3})
    assert list(done.columns) == ["completion"] and isinstance(done["completion"][0], str)
    assert 1 <= len(done["completion"][0].split()) <= 3  # a word per token (the word tokenizer)
