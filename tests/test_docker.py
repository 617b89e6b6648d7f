"""docker/: the compose stack is parsed, then each service's command runs outside a container.

No Docker engine runs here. The compose file is read as data (services, environment, volumes,
healthchecks, how the workers reach the database and the tracking server); then PostgreSQL is
the local server, and the `mlflow` and `worker` services run their own commands on this machine,
with the service names mapped to 127.0.0.1 and fresh databases.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pytest
import sqlalchemy
import tomllib
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from .conftest import PG_ADMIN_URL, free_port, postgres_database, write_study

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR}` and `${VAR:-default}`, from `env` only (not this shell's)."""
    env = env or {}

    def sub(m: re.Match) -> str:
        return env.get(m["name"]) or (m["default"] or "")

    return re.sub(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}", sub, value)


def _option(args: list[str], name: str) -> str:
    for a in args:
        if a.startswith(f"{name}="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def _healthy_when(service: dict) -> set[str]:
    deps = service["depends_on"]
    return {name for name, dep in deps.items() if dep["condition"] == "service_healthy"}


def test_workers_point_at_the_database_and_the_tracking_service():
    assert set(SERVICES) == {"postgres", "mlflow", "worker"}
    db = SERVICES["postgres"]["environment"]
    pg_check = " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in pg_check and db["POSTGRES_USER"] in pg_check

    worker_env = {k: interpolate(v) for k, v in SERVICES["worker"]["environment"].items()}
    storage = sqlalchemy.engine.make_url(worker_env["RANKSEARCH_STORAGE"])
    assert (storage.host, storage.port, storage.database) == ("postgres", 5432, db["POSTGRES_DB"])
    assert storage.username == db["POSTGRES_USER"]
    assert storage.password == interpolate(db["POSTGRES_PASSWORD"])

    mlflow_args = [interpolate(a) for a in SERVICES["mlflow"]["command"]]
    tracking = urlsplit(worker_env["MLFLOW_TRACKING_URI"])
    assert tracking.hostname == "mlflow"
    assert str(tracking.port) == _option(mlflow_args, "--port")
    # the server accepts the Host header the workers send
    assert tracking.netloc in _option(mlflow_args, "--allowed-hosts").split(",")
    backend = sqlalchemy.engine.make_url(_option(mlflow_args, "--backend-store-uri"))
    assert backend.host == "postgres" and backend.database != db["POSTGRES_DB"]
    init_sql = " ".join(p.read_text() for p in (DOCKER / "initdb").glob("*.sql"))
    assert f"CREATE DATABASE {backend.database}" in init_sql
    assert "/health" in " ".join(SERVICES["mlflow"]["healthcheck"]["test"])

    assert _healthy_when(SERVICES["mlflow"]) == {"postgres"}
    assert _healthy_when(SERVICES["worker"]) == {"postgres", "mlflow"}
    assert SERVICES["worker"]["deploy"]["replicas"] >= 2
    # every named volume is declared; artifacts and runs outlive the containers
    named = {
        v.split(":")[0]
        for s in SERVICES.values()
        for v in s.get("volumes", [])
        if not v.startswith((".", "/"))
    }
    assert named == set(COMPOSE["volumes"]) >= {"pgdata", "mlartifacts", "runs"}
    assert _option(mlflow_args, "--artifacts-destination") in " ".join(
        SERVICES["mlflow"]["volumes"]
    )
    for name in ("mlflow", "worker"):
        build = SERVICES[name]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    (device,) = gpu["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_the_dockerfile_installs_ranksearch_with_the_pinned_torch():
    text = (DOCKER / "Dockerfile").read_text()
    lines = [ln for ln in re.sub(r"\\\n", " ", text).splitlines() if ln and not ln.startswith("#")]
    instructions = [ln.split(None, 1) for ln in lines]
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    ci_pin = re.search(r"torch==([\d.]+)", (ROOT / ".ci" / "run").read_text())[1]
    assert args["TORCH_VERSION"] == ci_pin  # the image and CI test the same torch
    runs = [rest for op, rest in instructions if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r)
    install = next(i for i, r in enumerate(runs) if re.search(r'pip install "\.\[', r))
    assert torch_step < install  # torch first, from the chosen index
    assert "--index-url" in runs[torch_step] and "TORCH_INDEX_URL" in runs[torch_step]
    extras = set(re.search(r'"\.\[([\w,]+)\]"', runs[install])[1].split(","))
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extras <= set(declared["optional-dependencies"]) and "postgres" in extras
    for op, rest in instructions:
        if op == "COPY":
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src
    assert ("ENTRYPOINT", '["ranksearch"]') in [tuple(i) for i in instructions]
    assert ("USER", "ranksearch") in [tuple(i) for i in instructions]


def _local_postgres(url: str, databases: dict[str, str]) -> str:
    """A compose URL (host `postgres`) as the same database name mapped on the local server."""
    parsed = sqlalchemy.engine.make_url(url)
    assert parsed.host == "postgres"
    local = sqlalchemy.engine.make_url(PG_ADMIN_URL).set(database=databases[parsed.database])
    return local.render_as_string(hide_password=False)


def _run_healthcheck(test: list[str], port: int, timeout: float = 90) -> None:
    argv = [a.replace("5000", str(port)) for a in test[1:]]
    argv[0] = shutil.which(argv[0]) or argv[0]
    deadline = time.monotonic() + timeout
    while subprocess.run(argv, capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, f"healthcheck never passed: {argv}"
        time.sleep(0.5)


def test_the_stack_runs_its_service_commands_outside_containers(tmp_path, tiny_bert, sentiment_csv):
    db = SERVICES["postgres"]["environment"]
    mlflow_svc, worker_svc = SERVICES["mlflow"], SERVICES["worker"]
    study = write_study(
        tmp_path / "compose-study.yaml",
        tiny_bert,
        sentiment_csv,
        training={"max_steps": 4, "eval_every": 2, "batch_size": 8},
        pruner={"type": "none"},
        sampler={"type": "random", "seed": 0},
        budget={"n_trials": 3},
    )
    port = free_port()
    paths = {"/mlartifacts": str(tmp_path / "mlartifacts"), "/runs": str(tmp_path / "runs")}
    with postgres_database() as optuna_url, postgres_database() as mlflow_url:
        databases = {
            db["POSTGRES_DB"]: sqlalchemy.engine.make_url(optuna_url).database,
            "mlflow": sqlalchemy.engine.make_url(mlflow_url).database,
        }

        def local(arg: str) -> str:
            arg = interpolate(arg, {"STUDY": str(study)})
            if "postgresql://" in arg:
                key, sep, url = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
                return key + sep + _local_postgres(url, databases)
            if arg.startswith("http://mlflow:"):
                return f"http://127.0.0.1:{port}"
            for path, mapped in paths.items():
                arg = arg.replace(f"={path}", f"={mapped}") if arg != path else mapped
            return arg.replace("0.0.0.0", "127.0.0.1").replace("5000", str(port))

        server = subprocess.Popen(
            [shutil.which(mlflow_svc["entrypoint"][0])] + [local(a) for a in mlflow_svc["command"]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _run_healthcheck(mlflow_svc["healthcheck"]["test"], port)
            env = {k: local(v) for k, v in worker_svc["environment"].items()}
            argv = [shutil.which("ranksearch")] + [local(a) for a in worker_svc["command"]]
            replicas = worker_svc["deploy"]["replicas"]
            workers = [
                subprocess.Popen(
                    argv,
                    env={**os.environ, **env, "RANKSEARCH_HOST": f"worker-{i}"},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for i in range(replicas)
            ]
            for w in workers:
                out, _ = w.communicate(timeout=300)
                assert w.returncode == 0, out
                assert "ranksearch:ranksearch@" not in out  # the password is never printed

            result = optuna.load_study(
                study_name="compose-study",
                storage=_local_postgres(
                    interpolate(worker_svc["environment"]["RANKSEARCH_STORAGE"]), databases
                ),
            )
            states = Counter(t.state for t in result.trials)
            assert states[TrialState.COMPLETE] == 3 and len(result.trials) == 3
            client = MlflowClient(f"http://127.0.0.1:{port}")
            exp = client.get_experiment_by_name("compose-study")
            runs = client.search_runs([exp.experiment_id], "tags.`ranksearch.role` = 'trial'")
            assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == [0, 1, 2]
            # the best trial's adapter went to the server's artifact volume
            assert any((tmp_path / "mlartifacts").rglob("adapter_config.json"))
        finally:
            server.terminate()
            server.wait(timeout=30)
