"""Packing trials onto this machine's devices: how many run at once, with which GPUs and port.

Not sequence packing (`training.packing`, in sft.py and worker.py), which fills training rows
with several examples. Here: the device `launch.device` resolves to, the GPUs this process may
use, and the slots (`plan_slots`, pure, so the rules are tested without a GPU): each running
trial holds a disjoint set of `gpus_per_trial` GPUs and its own main process port; a finished or
pruned trial gives them back for the next. On CPU, parallel trials share the cores.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ranksearch.config.problems import Problem

if TYPE_CHECKING:
    from ranksearch.config.schema import StudyConfig


class SlotError(ValueError):
    """The GPUs cannot hold the trials as `launch` asks; `key` names the setting to change."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


def resolve_device(device: str) -> str:
    """`launch.device` as trials get it: `auto` is cuda when a GPU is visible, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def local_gpus(device: str) -> list[str]:
    """The GPUs this process may give trials on `device` (none on CPU)."""
    if device != "cuda":
        return []
    import os

    import torch

    return visible_gpus(os.environ, torch.cuda.device_count())


def available_memory_gb(device: str) -> float | None:
    """The memory a trial can have here: one GPU's (the first visible), or on CPU what the
    kernel reports available now (MemAvailable); None where it cannot be read."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():  # `launch.device: cuda` here: plan_slots says so
            return None
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def packed_memory(cfg: StudyConfig, device: str) -> dict[str, float]:
    """What `plan_slots` checks `launch.trials_per_gpu` against: one GPU's memory and the
    largest configuration's estimate (nothing to check unless trials share a GPU)."""
    if device != "cuda" or cfg.launch.trials_per_gpu == 1:
        return {"trials_per_gpu": cfg.launch.trials_per_gpu}
    from ranksearch.data.estimate import estimate_space  # torch: only when memory is checked

    worst = max(e.memory_estimate_mb for e in estimate_space(cfg))
    return {
        "trials_per_gpu": cfg.launch.trials_per_gpu,
        "gpu_memory_gb": available_memory_gb(device),
        "trial_memory_gb": worst / 1024,
    }


def memory_problems(cfg: StudyConfig, device: str, available_gb: float | None) -> list[Problem]:
    """Refuse a study whose largest configuration would not fit: `launch.max_memory_gb` when
    set, else `available_gb` (CPU trials run side by side share it)."""
    from ranksearch.data.estimate import estimate_space  # torch: only when memory is checked

    limit = cfg.launch.max_memory_gb or available_gb
    if limit is None:
        return []
    worst = max(estimate_space(cfg), key=lambda e: e.memory_estimate_mb)
    parallel = (cfg.launch.parallel_trials or 1) if device == "cpu" and available_gb else 1
    need = worst.memory_estimate_mb / 1024 * (1 if cfg.launch.max_memory_gb else parallel)
    if need <= limit:
        return []
    what = (
        f"rank {worst.rank} on {worst.target_modules} needs about "
        f"{worst.memory_estimate_mb / 1024:.1f} GB to train at batch "
        f"{cfg.training.batch_size} x {cfg.data.max_length} tokens (ranksearch estimate)"
    )
    smaller = "lower the largest rank, the batch size or max_length"
    if cfg.launch.max_memory_gb:
        return [Problem("launch.max_memory_gb", f"{what}; {smaller}, or raise the limit")]
    times = f" x {parallel} parallel trials" if parallel > 1 else ""
    where = "on the GPU" if device == "cuda" else "available on this machine now"
    return [
        Problem(
            "search.rank",
            f"{what}{times}, more than the {limit:.1f} GB {where}; {smaller}, or set "
            "`launch.max_memory_gb` to check against the machine that will run it",
        )
    ]


def visible_gpus(env: Mapping[str, str], device_count: int) -> list[str]:
    """The GPUs this process may use, as the ids `CUDA_VISIBLE_DEVICES` takes.

    With `CUDA_VISIBLE_DEVICES=2,3,5` the trials get 2, 3 and 5 (indices or UUIDs, passed on
    as written); without it, 0..device_count-1.
    """
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(device_count)]
    ids = [g.strip() for g in listed.split(",") if g.strip()]
    # CUDA stops at the first invalid entry (`-1`, empty): nothing after it is visible
    valid = []
    for g in ids:
        if g.startswith("-"):
            break
        valid.append(g)
    return valid[:device_count] if device_count else valid


@dataclass(frozen=True)
class Slots:
    """How this process runs trials: `parallel` at once, each with `gpus_per_trial` GPUs
    (0 on CPU) and `threads` CPU threads per rank."""

    parallel: int
    gpus_per_trial: int
    threads: int
    trials_per_gpu: int = 1


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset, a
    batch scheduler's allocation), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def plan_slots(
    *,
    device: str,
    gpus: list[str],
    gpus_per_trial: int,
    parallel_trials: int | None,
    num_processes: int,
    cpu_count: int,
    trials_per_gpu: int = 1,
    gpu_memory_gb: float | None = None,
    trial_memory_gb: float | None = None,
) -> Slots:
    """Resolve `launch.parallel_trials` (None: as many as the GPUs allow; 1 on CPU).

    `trials_per_gpu` packs several one-GPU trials onto each GPU (fractional GPUs), checked
    against the memory one trial is estimated to need. Raises ValueError naming the key and
    the fix (a `SlotError`) when the GPUs cannot hold one trial, the packed trials, or the
    parallel trials.
    """
    if device == "cpu":
        parallel = parallel_trials or 1
        threads = max(1, cpu_count // (parallel * num_processes))
        return Slots(parallel, 0, threads)
    if gpus_per_trial > len(gpus):
        raise SlotError(
            "launch.gpus_per_trial",
            f"{gpus_per_trial} GPUs per trial but {len(gpus)} visible "
            f"({','.join(gpus) or 'none'}); lower gpus_per_trial or make more GPUs visible",
        )
    if trials_per_gpu > 1 and gpus_per_trial > 1:
        raise SlotError(
            "launch.trials_per_gpu",
            f"{trials_per_gpu} trials per GPU with {gpus_per_trial} "
            "GPUs per trial; packing shares single GPUs, so set gpus_per_trial: 1 or "
            "trials_per_gpu: 1",
        )
    if trials_per_gpu > 1 and gpu_memory_gb and trial_memory_gb:
        room = int(0.9 * gpu_memory_gb // trial_memory_gb)  # a tenth left for the allocator
        if trials_per_gpu > room:
            raise SlotError(
                "launch.trials_per_gpu",
                f"{trials_per_gpu} trials of about {trial_memory_gb:.1f} "
                f"GB (ranksearch estimate, largest configuration) do not fit a "
                f"{gpu_memory_gb:.0f} GB GPU; use trials_per_gpu <= {max(room, 1)}",
            )
    fits = len(gpus) // gpus_per_trial * trials_per_gpu
    parallel = parallel_trials or fits
    if parallel > fits:
        raise SlotError(
            "launch.parallel_trials",
            f"{parallel} trials x {gpus_per_trial} GPUs need "
            f"{parallel * gpus_per_trial} GPUs but {len(gpus)} are visible; "
            f"use parallel_trials <= {fits} (or leave it out)",
        )
    threads = max(1, cpu_count // (parallel * gpus_per_trial))
    return Slots(parallel, gpus_per_trial, threads, trials_per_gpu)


class GpuPool:
    """GPU sets for running trials: `take` the least busy ids, `give_back` when done.

    Each GPU seats `per_gpu` trials (launch.trials_per_gpu); with the default 1 the sets are
    disjoint. Trials spread over idle GPUs before any GPU takes a second one.
    """

    def __init__(self, gpus: list[str], per_trial: int, per_gpu: int = 1):
        self.gpus = list(gpus)
        self.per_trial = per_trial
        self.per_gpu = per_gpu
        self.load: dict[str, int] = dict.fromkeys(self.gpus, 0)

    @property
    def busy(self) -> set[str]:
        return {g for g, n in self.load.items() if n}

    def take(self) -> list[str] | None:
        """`per_trial` GPUs with a free seat, now held; None when not enough have one."""
        free = sorted((g for g in self.gpus if self.load[g] < self.per_gpu), key=self.load.get)
        if len(free) < self.per_trial:
            return None
        chosen = sorted(free[: self.per_trial], key=self.gpus.index)
        for g in chosen:
            self.load[g] += 1
        return chosen

    def give_back(self, ids: list[str]) -> None:
        unknown = {g for g in ids if not self.load.get(g)}
        if unknown:
            raise ValueError(f"GPUs {sorted(unknown)} were not held")
        for g in ids:
            self.load[g] -= 1


def free_port(taken: set[int] = frozenset(), host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, not among `taken` (ports given to running trials)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise RuntimeError("no free TCP port found for the trial's main process")
