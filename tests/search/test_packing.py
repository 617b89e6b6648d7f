"""Packing trials onto a machine: GPU lists in, assignments out (no GPU needed)."""

import socket
import subprocess
import sys

import pytest

from ranksearch.search.packing import GpuPool, SlotError, Slots, free_port, plan_slots, visible_gpus


@pytest.mark.parametrize(
    ("env", "count", "expected"),
    [
        ({}, 4, ["0", "1", "2", "3"]),
        ({"CUDA_VISIBLE_DEVICES": "2,3,5"}, 3, ["2", "3", "5"]),
        ({"CUDA_VISIBLE_DEVICES": " 1 , 0 "}, 2, ["1", "0"]),
        ({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}, 2, ["GPU-aa", "GPU-bb"]),
        ({"CUDA_VISIBLE_DEVICES": "4,-1,5"}, 1, ["4"]),  # CUDA stops at the first invalid id
        ({"CUDA_VISIBLE_DEVICES": ""}, 0, []),
    ],
)
def test_visible_gpus(env, count, expected):
    assert visible_gpus(env, count) == expected


def _slots(gpus: int, per_trial: int, parallel=None, cpus=16):
    return plan_slots(
        device="cuda",
        gpus=[str(i) for i in range(gpus)],
        gpus_per_trial=per_trial,
        parallel_trials=parallel,
        num_processes=1,
        cpu_count=cpus,
    )


def test_default_parallel_fills_the_gpus():
    assert _slots(8, 1) == Slots(parallel=8, gpus_per_trial=1, threads=2)
    assert _slots(8, 2) == Slots(parallel=4, gpus_per_trial=2, threads=2)
    assert _slots(8, 3).parallel == 2  # two GPUs stay idle rather than split a trial
    assert _slots(8, 2, parallel=2).parallel == 2


def test_too_few_gpus_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"launch.gpus_per_trial: 4 GPUs per trial but 2 visible"):
        _slots(2, 4)
    with pytest.raises(ValueError, match=r"launch.parallel_trials: 3 trials x 2 GPUs.*<= 2"):
        _slots(4, 2, parallel=3)
    with pytest.raises(SlotError) as err:  # the key is data for check_study, not text to split
        _slots(2, 4)
    assert err.value.key == "launch.gpus_per_trial" and err.value.message.startswith("4 GPUs")


def test_cpu_trials_share_the_cores():
    def cpu(parallel, ranks, cores):
        return plan_slots(
            device="cpu",
            gpus=[],
            gpus_per_trial=1,
            parallel_trials=parallel,
            num_processes=ranks,
            cpu_count=cores,
        )

    assert cpu(None, 1, 8) == Slots(parallel=1, gpus_per_trial=0, threads=8)
    assert cpu(2, 1, 8).threads == 4
    assert cpu(2, 2, 8).threads == 2
    assert cpu(4, 1, 2).threads == 1  # never below one thread


def test_gpu_sets_are_disjoint_and_come_back():
    pool = GpuPool(["0", "1", "2", "3", "4", "5", "6", "7"], per_trial=2)
    held = [pool.take() for _ in range(4)]
    assert held == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert pool.take() is None  # no GPU is given to two trials
    pool.give_back(["2", "3"])  # a pruned trial frees its GPUs for the next
    assert pool.take() == ["2", "3"]
    with pytest.raises(ValueError, match="not held"):
        pool.give_back(["9"])


def test_pool_packing_under_churn_never_overlaps():
    pool = GpuPool([str(i) for i in range(6)], per_trial=3)
    running: list[list[str]] = []
    for step in range(50):
        if step % 3 == 2 and running:
            pool.give_back(running.pop(0))
        ids = pool.take()
        if ids is not None:
            running.append(ids)
        flat = [g for ids in running for g in ids]
        assert len(flat) == len(set(flat)) and len(running) <= 2


def test_free_port_is_bindable_and_avoids_taken_ports():
    first = free_port()
    second = free_port({first})
    assert second != first
    with socket.socket() as s:
        s.bind(("127.0.0.1", second))


def test_trials_per_gpu_seats_several_trials_on_each_gpu():
    slots = plan_slots(
        device="cuda", gpus=["0", "1"], gpus_per_trial=1, parallel_trials=None,
        num_processes=1, cpu_count=16, trials_per_gpu=4, gpu_memory_gb=140, trial_memory_gb=3,
    )  # fmt: skip
    assert (slots.parallel, slots.trials_per_gpu, slots.threads) == (8, 4, 2)
    pool = GpuPool(["0", "1"], per_trial=1, per_gpu=4)
    held = [pool.take() for _ in range(8)]
    assert held[:2] == [["0"], ["1"]]  # idle GPUs first, then a second seat
    assert sorted(g for ids in held for g in ids) == ["0"] * 4 + ["1"] * 4
    assert pool.take() is None  # every seat taken
    pool.give_back(["1"])
    assert pool.take() == ["1"]
    with pytest.raises(ValueError, match="not held"):
        pool.give_back(["2"])


def test_trials_per_gpu_is_checked_against_the_memory_estimate():
    def plan(per_gpu, per_trial=1):
        return plan_slots(
            device="cuda", gpus=["0"], gpus_per_trial=per_trial, parallel_trials=None,
            num_processes=1, cpu_count=16, trials_per_gpu=per_gpu, gpu_memory_gb=80,
            trial_memory_gb=20,
        )  # fmt: skip

    assert plan(3).parallel == 3  # 3 x 20 GB within 90 % of 80 GB
    with pytest.raises(ValueError, match=r"launch.trials_per_gpu: 4 trials of about 20.0 GB.*<= 3"):
        plan(4)
    with pytest.raises(ValueError, match=r"launch.trials_per_gpu: .*set gpus_per_trial: 1"):
        plan_slots(
            device="cuda", gpus=["0", "1"], gpus_per_trial=2, parallel_trials=None,
            num_processes=1, cpu_count=16, trials_per_gpu=2,
        )  # fmt: skip


def test_cpu_threads_follow_the_process_affinity():
    """Under taskset or a container's cpuset, a trial gets the cores the process may use, not
    every core of the machine."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from ranksearch.search.packing import plan_slots, usable_cpus; "
        "print(usable_cpus(), plan_slots(device='cpu', gpus=[], gpus_per_trial=1, "
        "parallel_trials=None, num_processes=1, cpu_count=usable_cpus()).threads)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]
