"""`ranksearch ui`: the real command and its real `mlflow server`, stopped by signals."""

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from mlflow import MlflowClient

from ranksearch.tracking.store import TrackingError
from ranksearch.tracking.ui import wait_healthy

from ..conftest import free_port, write_study


@pytest.mark.services
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_ui_stops_its_whole_server_on_sigterm_and_sighup(tmp_path, tiny_bert, sentiment_csv, sig):
    study_file = write_study(tmp_path / "ui.yaml", tiny_bert, sentiment_csv)
    out = tmp_path / "out"
    out.mkdir()
    MlflowClient(f"sqlite:///{out / 'mlflow.db'}").create_experiment("ui")
    port = free_port()
    command = [sys.executable, "-m", "ranksearch.cli", "ui", "--study", str(study_file),
               "--out", str(out), "--port", str(port), "--no-browser"]  # fmt: skip
    ui = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = [ui.stdout.readline(), ui.stdout.readline()]
        assert f"http://127.0.0.1:{port}/#/experiments/" in lines[1], lines
        server = psutil.Process(ui.pid).children(recursive=True)
        assert server, "the mlflow server runs as a child of `ranksearch ui`"
        # without MLflow's job consumers (eight processes no study uses), it starts sooner
        assert not [p for p in server if "huey" in " ".join(p.cmdline())], server
        os.kill(ui.pid, sig)  # as `kill` or a closed terminal does
        assert ui.wait(timeout=60) == 0
    finally:
        if ui.poll() is None:
            ui.kill()
    gone, alive = psutil.wait_procs(server, timeout=10)
    assert not alive, f"left running after {sig.name}: {[p.pid for p in alive]}"
    with socket.socket() as probe:  # nothing of the server is left listening
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_start_up_waits_while_the_server_makes_progress(tmp_path):
    """A server that works (uses CPU) for longer than the stall limit is waited for; one that
    stops making progress is given up `stall` seconds later."""
    busy = "import time\nt = time.time()\nwhile time.time() - t < 5: pass\ntime.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", busy], start_new_session=True)
    started = time.monotonic()
    try:
        with pytest.raises(TrackingError, match="made no progress"):
            wait_healthy(f"http://127.0.0.1:{free_port()}", proc, stall=3.0)
        assert time.monotonic() - started >= 5.0  # not cut while it was busy
    finally:
        proc.kill()
        proc.wait()
