"""Warm workers: one process per trial slot that pays the start-up (imports, the base model)
once and trains that slot's trials one after another (`launch.reuse_workers`).

A warm worker is `python -m ranksearch.worker --serve <study dir>`, started with the environment
accelerate's launcher computes for a one-process trial. The orchestrator hands it one job at a
time on its stdin; the trial reports on its own channel as a cold one does, and ends with an
`exit` event there. To the trial's `TrialRun` a `WarmTrial` looks like a `WorkerProcess`: it
is polled, read, stopped and reaped the same way.

A worker is reused only when its state is known: its last trial ended with an `exit` event that
did not ask to retire (a failed trial, memory grown past its first trial's), or was stopped and
said so within `launch.stop_grace_seconds`. Anything else (killed, wedged, past its timeout) is
killed with its process group, and the slot's next trial starts a fresh worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from ranksearch.search.launch import LaunchPlan, TrialFiles, worker_module

CLOSE_GRACE_SECONDS = 5  # for an idle worker to leave after its stdin closes


def serve_plan(plan: LaunchPlan, study_dir: Path) -> LaunchPlan | None:
    """The warm-worker command for the slot of a one-process trial's plan; None where the plan
    runs accelerate's launcher itself (it would sit between the worker and its signals)."""
    if not plan.launcher or plan.argv[1:3] != ["-m", worker_module()]:
        return None
    return LaunchPlan([*plan.argv[:3], "--serve", str(study_dir.absolute())], plan.env)


class WarmWorker:
    """One `ranksearch.worker --serve` process, its process group and its job pipe."""

    def __init__(self, plan: LaunchPlan, log_path: Path):
        self.plan = plan
        self.log_path = log_path
        self.trials = 0  # trials handed to it
        env = {**os.environ, **plan.env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {plan.command_line()}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                plan.argv,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: killed as a whole
            )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def exit_code(self) -> int | None:
        return self._proc.poll()

    def run(self, spec_path: Path, files: TrialFiles, launcher: str) -> WarmTrial:
        """Hand it a trial (`launcher`: the trial's `accelerate launch` line, for its log)."""
        self.trials += 1
        files.start_log(
            f"# warm worker pid {self.pid}, its trial {self.trials} (launch.reuse_workers), "
            f"as one-process `accelerate launch` starts it: {launcher}\n"
        )
        job = {"spec": str(spec_path.absolute()), "log": str(files.log_path.absolute())}
        try:
            self._proc.stdin.write((json.dumps(job) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died meanwhile: the trial's poll returns its exit code
        return WarmTrial(self, files)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self._proc.pid, sig)

    def kill(self) -> None:
        """Kill the whole process group, now, and wait for it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        with contextlib.suppress(OSError):
            self._proc.stdin.close()

    def close(self) -> None:
        """Ask an idle worker to leave (end of its stdin); kill it if it does not."""
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(CLOSE_GRACE_SECONDS)
        self.kill()


class WarmTrial:
    """A trial running on a warm worker, with the face of a `WorkerProcess`."""

    def __init__(self, worker: WarmWorker, files: TrialFiles):
        self.worker = worker
        self.files = files
        self._pending: list[dict] = []
        self._exit: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.worker.pid

    @property
    def reusable(self) -> bool:
        """Its worker can take the next trial: this one ended cleanly and it is alive."""
        return (
            self._exit is not None
            and not self._exit.get("retire")
            and self.worker.exit_code() is None
        )

    def _read(self) -> None:
        for rec in self.files.read_reports():
            if rec.get("event") == "exit":
                self._exit = rec
            elif self._exit is None:
                self._pending.append(rec)

    def poll(self) -> int | None:
        """The trial's exit code once it is over: from its `exit` event, or the worker's own
        when the worker died (negative: the signal that killed it)."""
        self._read()
        if self._exit is not None:
            return self._exit["rc"]
        rc = self.worker.exit_code()
        if rc is not None:
            self._read()  # what it wrote before it died
            return self._exit["rc"] if self._exit is not None else (rc or 1)
        return None

    def read_reports(self) -> list[dict]:
        self._read()
        out, self._pending = self._pending, []
        return out

    def stop(self, grace_seconds: float, retire: bool = False) -> None:
        """Stop the trial at its next step (SIGUSR1) and wait up to `grace_seconds` for it to
        say so; past that, or with `retire`, kill the worker."""
        if self.poll() is not None:
            return
        if not retire:
            self.worker.signal(signal.SIGUSR1)
            deadline = time.monotonic() + grace_seconds
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._exit is not None:
                return
        self.worker.kill()

    def reap(self) -> None:
        """A dead worker's group goes; a live one waits for its next trial."""
        if self.worker.exit_code() is not None:
            self.worker.kill()

    def log_tail(self, lines: int = 15) -> str:
        return self.files.log_tail(lines)


class WarmPool:
    """This orchestrator's idle warm workers, matched to a trial by their command and
    environment (which carry the slot's threads, GPUs and precision)."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self._idle: list[WarmWorker] = []

    def take(self, plan: LaunchPlan) -> WarmWorker:
        for worker in self._idle:
            same = (worker.plan.argv, worker.plan.env) == (plan.argv, plan.env)
            if same and worker.exit_code() is None:
                self._idle.remove(worker)
                return worker
        return WarmWorker(plan, self.log_path)

    def give_back(self, trial: WarmTrial) -> None:
        if trial.reusable:
            self._idle.append(trial.worker)
        else:
            trial.worker.kill()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
