"""Build the `accelerate launch` command of a trial (pure) and supervise the process it starts.

Unlike supervise.py (a running trial's reports, pruning, heartbeat), this starts and stops it.

Each trial is its own process group (a new session), so a pruned, timed-out or interrupted trial
is stopped as a whole: SIGTERM to every rank, a grace period, then SIGKILL. No rank is orphaned
and no rendezvous port stays bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def worker_module() -> str:
    """The module every trial runs (`python -m`), named here once: `accelerate_argv` launches
    it and `warm.serve_plan` recognises it. `RANKSEARCH_WORKER_MODULE` replaces it, the seam
    through which tests run a scripted worker (tests/fake_worker.py) that speaks the report
    protocol of ranksearch.worker, so the loop is tested without training a model."""
    return os.environ.get("RANKSEARCH_WORKER_MODULE", "ranksearch.worker")


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the orchestrator's environment
    launcher: str = ""  # the `accelerate launch` line this plan stands for, when started directly

    def command_line(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + " ".join(self.argv)


def resolve_mixed_precision(requested: str, device: str, bf16_supported: bool) -> str:
    """`auto` = bf16 where the GPU supports it, else fp16; always `no` on CPU."""
    if device == "cpu":
        return "no"
    if requested != "auto":
        return requested
    return "bf16" if bf16_supported else "fp16"


def accelerate_argv(
    spec_path: Path,
    *,
    num_processes: int,
    device: str,
    mixed_precision: str,
    gpu_ids: list[str] | list[int] | None = None,
    main_process_port: int = 0,
    cpu_threads: int | None = None,
    python: str = sys.executable,
) -> LaunchPlan:
    """The `accelerate launch ... -m ranksearch.worker <spec>` command for one trial.

    CPU with several ranks uses the multi-GPU code path over gloo (`ACCELERATE_USE_CPU=true`
    with `--multi_gpu`); `--cpu --num_processes 2` would start a single process.
    """
    argv = [python, "-m", "accelerate.commands.accelerate_cli", "launch"]
    env: dict[str, str] = {}
    if num_processes > 1:
        argv.append("--multi_gpu")
    if device == "cpu":
        if num_processes > 1:
            env["ACCELERATE_USE_CPU"] = "true"
        else:
            argv.append("--cpu")
        if cpu_threads:
            argv += ["--num_cpu_threads_per_process", str(cpu_threads)]
            env["OMP_NUM_THREADS"] = str(cpu_threads)  # this trial's share of the cores
    elif gpu_ids:
        if len(gpu_ids) != num_processes:
            raise ValueError(f"{len(gpu_ids)} GPU ids for {num_processes} processes; give one each")
        ids = ",".join(str(g) for g in gpu_ids)
        argv += ["--gpu_ids", ids]
        env["CUDA_VISIBLE_DEVICES"] = ids  # what accelerate sets too; stated for the log
    argv += [
        "--num_processes", str(num_processes),
        "--num_machines", "1",
        "--mixed_precision", mixed_precision,
        "--dynamo_backend", "no",
        "--main_process_port", str(main_process_port),
        "-m", worker_module(), str(spec_path),
    ]  # fmt: skip
    return LaunchPlan(argv, env)


def single_process_plan(plan: LaunchPlan) -> LaunchPlan:
    """A one-process trial, started as `accelerate launch` starts one: accelerate's own argument
    validation and simple launcher compute the command and environment, here, in the
    orchestrator. What is saved is the launcher's own Python start-up and torch import, about
    2.5 s per trial. Multi-process trials keep the real launcher (it starts and watches the
    ranks). Should accelerate's launcher internals change, the plan is returned unchanged."""
    try:
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser
        from accelerate.utils.launch import prepare_simple_launcher_cmd_env

        args = launch_command_parser().parse_args(plan.argv[4:])
        if args.multi_gpu or (args.num_processes or 1) > 1:
            return plan
        args = _validate_launch_command(args)[0]
        argv, env = prepare_simple_launcher_cmd_env(args)
    except Exception:  # noqa: BLE001 - a private API of accelerate; the launcher still works
        return plan
    added = {k: v for k, v in env.items() if os.environ.get(k) != v}
    return LaunchPlan([plan.argv[0], *argv[1:]], {**added, **plan.env}, plan.command_line())


class TrialFiles:
    """A trial's log file and report channel, read as the worker writes them."""

    def __init__(self, log_path: Path, reports_path: Path):
        self.log_path = log_path
        self.reports_path = reports_path
        self._offset = 0
        self._output_start = 0

    def start_log(self, header: str) -> None:
        """Write the log's header; what the worker writes comes after it."""
        with open(self.log_path, "ab") as log:
            log.write(header.encode())
            self._output_start = log.tell()

    def read_reports(self) -> list[dict]:
        """Every complete new line of the report channel since the last call."""
        try:
            with open(self.reports_path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._offset += end
        return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]

    def log_tail(self, lines: int = 15) -> str:
        """The last non-blank lines the worker wrote (the header above them left out)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._output_start)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


class WorkerProcess:
    """A running trial: its process group, its log file and its report channel."""

    def __init__(self, plan: LaunchPlan, log_path: Path, reports_path: Path):
        self.plan = plan
        self.files = TrialFiles(log_path, reports_path)
        self._proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        env = {
            **os.environ,
            **self.plan.env,
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        header = f"$ {self.plan.command_line()}\n"
        if self.plan.launcher:  # started directly, as accelerate's simple launcher does
            header = f"# accelerate launch, single process: {self.plan.launcher}\n" + header
        self.files.start_log(header)
        with open(self.files.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.plan.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """The exit code once the launcher has exited, else None."""
        return self._proc.poll() if self._proc else None

    def read_reports(self) -> list[dict]:
        return self.files.read_reports()

    def stop(self, grace_seconds: float, retire: bool = True) -> None:
        """SIGTERM the whole group, wait up to `grace_seconds`, then SIGKILL what is left.
        (`retire`: a cold worker always ends; the argument is a warm worker's.)"""
        if self._proc is None:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._signal_group(signal.SIGKILL)
        self._proc.wait()

    def reap(self) -> None:
        """After the launcher exits, make sure no rank of its group lives on."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def log_tail(self, lines: int = 15) -> str:
        return self.files.log_tail(lines)
