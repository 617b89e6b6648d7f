"""A warm worker (`--serve`): one process that imports and loads the base model once and
trains the trials it is handed on stdin, one after another, each as a cold start would."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

from ranksearch.worker.model import KeptBase
from ranksearch.worker.spec import Reporter, TrialSpec
from ranksearch.worker.train import STOP_REQUESTED, TrialStopped, training_function


def _request_stop(signum, frame) -> None:
    STOP_REQUESTED[0] = True


def _resident_mb() -> float | None:
    """This process's resident memory now (Linux), None where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _release_freed_memory() -> None:
    """Give the memory freed by the last trial back to the system (glibc keeps it otherwise,
    and a warm worker's resident size would creep up trial after trial)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _grown(now: float | None, first: float | None, slack_mb: float = 512) -> bool:
    """Memory past what the first trial left by a quarter plus `slack_mb`: state in doubt."""
    return now is not None and first is not None and now > 1.25 * first + slack_mb


def serve() -> int:
    """A warm worker: imports and loads the base model once, then trains the trials it is
    handed, one at a time, each as a cold start would.

    Each line on stdin is a job, `{"spec": <spec.json>, "log": <the trial's log>}`; stdout and
    stderr go to that log while it runs. SIGUSR1 stops the running trial at its next step (a
    pruned or interrupted trial) and the worker waits for the next job. Every job ends with an
    `exit` event on the trial's report channel: `rc` (0, or 1 with the traceback in its log),
    `stopped`, and `retire`, set when the worker's state is in doubt (a failed trial, memory
    grown past what the first trial left), after which it exits and the orchestrator starts a
    fresh one. End of stdin (the orchestrator is gone or done) ends the worker.
    """
    signal.signal(signal.SIGUSR1, _request_stop)
    kept = KeptBase()
    home = os.dup(1)  # the worker's own log, between trials
    first: dict[str, float | None] = {}
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        log = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        STOP_REQUESTED[0] = False
        rc, stopped, retire = 0, False, False
        spec = TrialSpec.read(Path(job["spec"]))
        try:
            training_function(spec, kept)
        except TrialStopped:
            stopped = True
        except BaseException:  # noqa: BLE001 - the trial fails; the worker is replaced
            traceback.print_exc()
            rc, retire = 1, True
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(home, 1)
        os.dup2(home, 2)
        os.close(log)
        gc.collect()
        _release_freed_memory()
        memory = {"rss_mb": _resident_mb()}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            memory["cuda_mb"] = torch.cuda.memory_allocated() / 2**20
        if not first:
            first = memory
        retire = retire or any(_grown(memory[k], first.get(k)) for k in memory)
        reporter = Reporter(spec.reports)
        reporter.emit(event="exit", rc=rc, stopped=stopped, retire=retire, **memory)
        reporter.close()
        if retire:
            break
    return 0
