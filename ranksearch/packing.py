"""Packing trials onto one machine: how many run at once, which GPUs and port each one gets.

Pure functions and a small pool, so the rules are tested without a GPU: each running trial holds
a disjoint set of `gpus_per_trial` GPUs and its own main process port; a finished or pruned trial
gives them back for the next. On CPU, parallel trials share the cores.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass


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


def plan_slots(
    *,
    device: str,
    gpus: list[str],
    gpus_per_trial: int,
    parallel_trials: int | None,
    num_processes: int,
    cpu_count: int,
) -> Slots:
    """Resolve `launch.parallel_trials` (None: as many as the GPUs allow; 1 on CPU).

    Raises ValueError naming the key and the fix when the GPUs cannot hold one trial, or the
    requested parallel trials.
    """
    if device == "cpu":
        parallel = parallel_trials or 1
        threads = max(1, cpu_count // (parallel * num_processes))
        return Slots(parallel, 0, threads)
    if gpus_per_trial > len(gpus):
        raise ValueError(
            f"launch.gpus_per_trial: {gpus_per_trial} GPUs per trial but {len(gpus)} visible "
            f"({','.join(gpus) or 'none'}); lower gpus_per_trial or make more GPUs visible"
        )
    fits = len(gpus) // gpus_per_trial
    parallel = parallel_trials or fits
    if parallel > fits:
        raise ValueError(
            f"launch.parallel_trials: {parallel} trials x {gpus_per_trial} GPUs need "
            f"{parallel * gpus_per_trial} GPUs but {len(gpus)} are visible; "
            f"use parallel_trials <= {fits} (or leave it out)"
        )
    threads = max(1, cpu_count // (parallel * gpus_per_trial))
    return Slots(parallel, gpus_per_trial, threads)


class GpuPool:
    """Disjoint GPU sets for running trials: `take` the lowest free ids, `give_back` when done."""

    def __init__(self, gpus: list[str], per_trial: int):
        self.gpus = list(gpus)
        self.per_trial = per_trial
        self.busy: set[str] = set()

    def take(self) -> list[str] | None:
        """`per_trial` free GPUs, now held; None when not enough are free."""
        free = [g for g in self.gpus if g not in self.busy]
        if len(free) < self.per_trial:
            return None
        chosen = free[: self.per_trial]
        self.busy.update(chosen)
        return chosen

    def give_back(self, ids: list[str]) -> None:
        unknown = set(ids) - self.busy
        if unknown:
            raise ValueError(f"GPUs {sorted(unknown)} were not held")
        self.busy.difference_update(ids)


def free_port(taken: set[int] = frozenset(), host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, not among `taken` (ports given to running trials)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise RuntimeError("no free TCP port found for the trial's main process")
