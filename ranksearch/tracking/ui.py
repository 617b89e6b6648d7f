"""`ranksearch ui`: the MLflow UI on a study's tracking store, opened at the study's experiment.

Unlike view.py (what the terminal shows while a study runs), this serves MLflow's web UI.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import webbrowser
from pathlib import Path

from rich.console import Console
from rich.text import Text

from ranksearch.config.paths import redact_url
from ranksearch.tracking.store import TrackingError

LOOPBACK = "127.0.0.1"
STALL_SECONDS = 60.0  # start-up gives up after this long without the server using any CPU
MAX_START_SECONDS = 600.0  # where CPU use cannot be read (no /proc)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # a closed terminal, `kill`: stop as on Ctrl-C


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# The runs page as a study is read. MLflow 3 opens an experiment in its GenAI mode unless the
# URL (or the browser's last choice) says `workflowType=machine_learning`, the "Model training"
# view. Ordered by a metric, its table lists trial runs flat instead of folded under the parent
# run (it nests only when ordered by start time), so the best trial is the first row and the
# recommended one near it, each marked in its run name.
RUNS_VIEW = {
    "workflowType": "machine_learning",
    "orderByKey": "metrics.`final_val_loss`",
    "orderByAsc": "true",
}


def experiment_url(base: str, experiment_id: str) -> str:
    from urllib.parse import urlencode

    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(RUNS_VIEW)}"


def find_experiment(uri: str, name: str) -> str:
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if experiment is None:
        raise TrackingError(
            f"no MLflow experiment {name!r} in {redact_url(uri)}; run the study "
            "first (ranksearch run --study ...) or pass its --out/--tracking-uri",
            key="",
        )
    return experiment.experiment_id


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def group_cpu_seconds(pgid: int) -> float | None:
    """CPU seconds used so far by the processes of group `pgid` (Linux /proc); None elsewhere."""
    total, proc = 0.0, Path("/proc")
    if not proc.is_dir():
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp, ..., utime, stime
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_healthy(base: str, proc: subprocess.Popen, stall: float = STALL_SECONDS) -> None:
    """Wait for the server to answer for as long as it makes progress: its process group keeps
    using CPU (start-up takes minutes on a loaded machine). Give up once it exits, or after
    `stall` seconds without any CPU used (or, without /proc, MAX_START_SECONDS in all)."""
    started = last_progress = time.monotonic()
    last_cpu = -1.0
    while not _answers(base):
        if proc.poll() is not None:
            raise TrackingError(
                f"the MLflow UI exited with code {proc.returncode}; run "
                "`mlflow server --backend-store-uri ...` by hand to see why",
                key="",
            )
        now, cpu = time.monotonic(), group_cpu_seconds(proc.pid)
        if cpu is None:
            cpu = last_cpu + 1 if now - started < MAX_START_SECONDS else last_cpu
        if cpu > last_cpu:
            last_cpu, last_progress = cpu, now
        elif now - last_progress > stall:
            raise TrackingError(
                f"the MLflow UI did not answer on {base} and made no progress (no CPU used) "
                f"for {stall:.0f}s; run `mlflow server --backend-store-uri ...` by hand to see why",
                key="",
            )
        time.sleep(0.5)


def start_server(uri: str, host: str, port: int) -> subprocess.Popen:
    """`mlflow server` on the study's store (artifacts are read from where they were logged)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            uri,
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the server's workers stop with it
        # MLflow's job consumers (GenAI scorers) are eight more processes that a study's runs
        # never use: without them the UI starts about twice as fast on 2 cores (unless the
        # environment turns them on)
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ},
    )


def stop_server(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the server's whole group (gunicorn/uvicorn and job workers), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def serve_ui(
    uri: str, experiment: str, host: str | None, port: int, open_browser: bool, console: Console
) -> int:
    """Serve until Ctrl-C. A study tracked on an MLflow server is only linked, not served."""
    experiment_id = find_experiment(uri, experiment)
    if uri.startswith(("http://", "https://")):
        url = experiment_url(uri, experiment_id)
        console.print(Text(f"this study is tracked on an MLflow server: {redact_url(url)}"))
        if open_browser:
            webbrowser.open(url)
        return 0
    bind = host or LOOPBACK  # never another address unless --host says so
    if not is_loopback(bind):
        console.print(
            Text(
                f"warning: binding {bind}: the UI is reachable from other machines", style="yellow"
            )
        )
    if not _port_free(LOOPBACK if bind in ("0.0.0.0", "::") else bind, port):
        raise TrackingError(f"{port} is in use on {bind}; pass a free one", key="--port")
    shown_host = LOOPBACK if bind in ("0.0.0.0", "::") else bind
    base = f"http://{shown_host}:{port}"
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    proc = None
    try:
        proc = start_server(uri, bind, port)
        console.print(Text("starting the MLflow UI (a minute or more on a busy machine)..."))
        wait_healthy(base, proc)
        url = experiment_url(base, experiment_id)
        console.print(Text(f"MLflow UI for study {experiment}: {url}   (Ctrl-C to stop)"))
        if open_browser:
            webbrowser.open(url)
        proc.wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM / SIGHUP through _interrupt
        pass
    finally:
        if proc is not None:
            stop_server(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)
