"""The accelerate command line (pure) and stopping a trial's whole process group."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ranksearch.search.launch import (
    LaunchPlan,
    WorkerProcess,
    accelerate_argv,
    resolve_mixed_precision,
    single_process_plan,
)


def _opts(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, argv[1:], strict=False) if a.startswith("--")}


def test_single_process_cpu():
    plan = accelerate_argv(
        Path("s.json"),
        num_processes=1,
        device="cpu",
        mixed_precision="no",
        cpu_threads=2,
        python="py",
    )
    assert plan.argv[:4] == ["py", "-m", "accelerate.commands.accelerate_cli", "launch"]
    assert "--cpu" in plan.argv and "--multi_gpu" not in plan.argv
    assert plan.argv[-3:] == ["-m", "ranksearch.worker", "s.json"]
    opts = _opts(plan.argv)
    assert opts["--num_processes"] == "1" and opts["--main_process_port"] == "0"
    assert opts["--num_cpu_threads_per_process"] == "2"
    assert plan.env == {"OMP_NUM_THREADS": "2"}  # its share of the cores


DUMP_ENV = """import json, os, sys
keys = ("ACCELERATE_", "OMP_", "KMP_", "CUDA_VISIBLE", "MASTER_", "LOCAL_RANK", "WORLD_SIZE")
print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(keys)}, sort_keys=True))
"""


@pytest.mark.parametrize(
    "kw",
    [{"cpu_threads": 1}, {}, {"device": "cuda", "mixed_precision": "bf16", "gpu_ids": ["3"]}],
    ids=["cpu-1-thread", "cpu-default-threads", "one-gpu"],
)
def test_a_single_process_trial_starts_directly_with_the_launchers_environment(tmp_path, kw):
    """Started without the launcher's own Python, a one-process trial sees exactly the
    environment a real `accelerate launch` gives it."""
    script = tmp_path / "dump_env.py"
    script.write_text(DUMP_ENV)
    kw = {"device": "cpu", "mixed_precision": "no", **kw}
    plan = accelerate_argv(script, num_processes=1, **kw)
    plan = LaunchPlan([*plan.argv[:-3], str(script)], plan.env)  # a script instead of -m worker
    direct = single_process_plan(plan)
    assert "accelerate.commands.accelerate_cli" not in direct.argv
    assert direct.argv == [sys.executable, str(script)] and direct.launcher == plan.command_line()

    def env_seen(p: LaunchPlan) -> dict:
        out = subprocess.run(p.argv, env={**os.environ, **p.env}, capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        return json.loads(out.strip().splitlines()[-1])

    seen = env_seen(direct)
    assert seen == env_seen(plan)
    assert seen["ACCELERATE_USE_CPU"] == str(kw["device"] == "cpu")
    assert seen["ACCELERATE_MIXED_PRECISION"] == kw["mixed_precision"]


def test_a_multi_process_trial_keeps_the_launcher():
    plan = accelerate_argv(Path("s.json"), num_processes=2, device="cpu", mixed_precision="no")
    assert single_process_plan(plan) is plan


def test_two_cpu_ranks_use_the_multi_gpu_path_over_gloo():
    plan = accelerate_argv(Path("s.json"), num_processes=2, device="cpu", mixed_precision="no")
    assert "--multi_gpu" in plan.argv and "--cpu" not in plan.argv
    assert plan.env == {"ACCELERATE_USE_CPU": "true"}
    assert _opts(plan.argv)["--num_processes"] == "2"


def test_gpu_ids_and_precision():
    plan = accelerate_argv(
        Path("s.json"),
        num_processes=2,
        device="cuda",
        mixed_precision="bf16",
        gpu_ids=[2, 3],
        main_process_port=29511,
    )
    opts = _opts(plan.argv)
    assert opts["--gpu_ids"] == "2,3" and opts["--mixed_precision"] == "bf16"
    assert opts["--main_process_port"] == "29511"
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(ValueError, match="one each"):
        accelerate_argv(
            Path("s"), num_processes=2, device="cuda", mixed_precision="no", gpu_ids=[0]
        )


@pytest.mark.parametrize(
    ("requested", "device", "bf16", "expected"),
    [
        ("auto", "cpu", False, "no"),
        ("bf16", "cpu", True, "no"),
        ("auto", "cuda", True, "bf16"),
        ("auto", "cuda", False, "fp16"),
        ("no", "cuda", True, "no"),
    ],
)
def test_mixed_precision_resolution(requested, device, bf16, expected):
    assert resolve_mixed_precision(requested, device, bf16) == expected


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_stop_ends_every_process_of_the_group_even_if_sigterm_is_ignored(tmp_path):
    # a launcher that ignores SIGTERM and has a child (a "rank") that does too
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal,time;"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    worker = WorkerProcess(
        LaunchPlan([sys.executable, "-c", script]), tmp_path / "log", tmp_path / "reports.jsonl"
    ).start()
    pid_file = tmp_path / "child.pid"
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    started = time.monotonic()
    worker.stop(grace_seconds=0.5)
    assert time.monotonic() - started < 5
    time.sleep(0.2)
    assert worker.poll() is not None and not _alive(child)


def test_reports_are_read_line_by_line_and_partial_lines_wait(tmp_path):
    reports = tmp_path / "r.jsonl"
    worker = WorkerProcess(LaunchPlan(["true"]), tmp_path / "log", reports)
    assert worker.read_reports() == []
    reports.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert worker.read_reports() == [{"step": 1}, {"step": 2}]
    with open(reports, "a") as f:
        f.write('ep": 3}\n')
    assert worker.read_reports() == [{"step": 3}]


def test_worker_log_starts_with_the_command(tmp_path):
    plan = LaunchPlan([sys.executable, "-c", "print('hello from rank 0')"], {"X": "1"})
    worker = WorkerProcess(plan, tmp_path / "worker.log", tmp_path / "r").start()
    while worker.poll() is None:
        time.sleep(0.05)
    log = (tmp_path / "worker.log").read_text()
    assert log.startswith("$ X=1 ") and "hello from rank 0" in worker.log_tail()
    assert subprocess.run(["true"]).returncode == 0
