"""`ranksearch ui`: the MLflow UI on a study's tracking store, opened at the study's experiment."""

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

from rich.console import Console
from rich.text import Text

from ranksearch.paths import redact_url
from ranksearch.tracking import TrackingError

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def experiment_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def find_experiment(uri: str, name: str) -> str:
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if experiment is None:
        raise TrackingError(
            f"no MLflow experiment {name!r} in {redact_url(uri)}; run the study "
            "first (ranksearch run --study ...) or pass its --out/--tracking-uri"
        )
    return experiment.experiment_id


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingError(
                f"the MLflow UI exited with code {proc.returncode}; run "
                "`mlflow server --backend-store-uri ...` by hand to see why"
            )
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TrackingError(f"the MLflow UI did not answer on {base} within {timeout:.0f}s")


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
        raise TrackingError(f"port {port} is in use on {bind}; pass --port with a free one")
    proc = start_server(uri, bind, port)
    shown_host = LOOPBACK if bind in ("0.0.0.0", "::") else bind
    base = f"http://{shown_host}:{port}"
    try:
        wait_healthy(base, proc)
        url = experiment_url(base, experiment_id)
        console.print(Text(f"MLflow UI for study {experiment}: {url}   (Ctrl-C to stop)"))
        if open_browser:
            webbrowser.open(url)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
    return 0
