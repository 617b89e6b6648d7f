"""A scripted worker: the report protocol of ranksearch.worker, with no model behind it.

The loop tests run it through the seam in `ranksearch.search.launch.worker_module`:

    RANKSEARCH_WORKER_MODULE=tests.fake_worker RANKSEARCH_FAKE_SCRIPT=script.json ranksearch run ...

It reads the trial's spec.json as the real worker does (`TrialSpec.read`), and writes what the
real worker writes to the spec's report channel: a `start` event, one evaluation per
`eval_every` optimizer steps (and at `max_steps`), an `end` event; as a warm worker
(`--serve <dir>`) one job per stdin line and an `exit` event after each. Every line is checked
against the vocabulary of worker/spec.py, so the fake cannot drift from the protocol unseen.
It stops as the real worker stops: a cold one dies of SIGTERM (no handler, as in the real
one), a warm one ends its trial at the next step after SIGUSR1, and both give up once the
orchestrator that started them is gone.

The curve is a function of the configuration unless the script says otherwise. The script is
a JSON list of rules; the first rule whose `when` matches the trial applies (`when` keys:
`trial`, any LoraConfig keyword of the spec such as `r`, or `learning_rate`; no `when`
matches every trial):

    [{"when": {"trial": 0}, "hang_at": 2},                 # report step 2, then go quiet
     {"when": {"r": 4}, "losses": [0.9, 0.8, 0.7]},        # val_loss per evaluation
     {"when": {"r": 2}, "nan_at": 4},                      # val_loss NaN at step 4
     {"kill_at": 3},                                       # SIGKILL itself: an OOM kill
     {"crash_at": 0, "error": "model.safetensors: bad"}]   # raise (0: before `start`)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ranksearch.worker.spec import EVALUATION_KEYS, EVENT_KEYS, Reporter, TrialSpec

SCRIPT_ENV = "RANKSEARCH_FAKE_SCRIPT"
EXAMPLES = 20  # validation examples the fake evaluates (per-example losses in `end`)
STOP_REQUESTED = [False]  # a warm worker's SIGUSR1


class TrialStopped(Exception):
    """Asked to stop (warm worker, SIGUSR1), between two steps, as the real worker is."""


def default_loss(lora: dict[str, Any], learning_rate: float, step: int, max_steps: int) -> float:
    """A falling curve whose level depends on the configuration alone: best at learning rate
    10^-2.5, better with a higher rank. Curves of two configurations never cross, so which
    trials Hyperband prunes depends on the sampled configurations and nothing else."""
    floor = 0.25 + 0.15 * abs(math.log10(learning_rate) + 2.5) + 0.3 / lora["r"]
    return floor + 0.45 * math.exp(-4 * step / max_steps)


def rule_for(spec: TrialSpec) -> dict[str, Any]:
    """The first rule of the script that matches the trial; {} without one."""
    path = os.environ.get(SCRIPT_ENV)
    rules = json.loads(Path(path).read_text()) if path else []
    facts = {**spec.lora, "trial": spec.trial, "learning_rate": spec.training["learning_rate"]}
    for rule in rules:
        if all(facts.get(k) == v for k, v in rule.get("when", {}).items()):
            return rule
    return {}


def emit(reporter: Reporter, **record: Any) -> None:
    """One report line, refused unless worker/spec.py's vocabulary has every key of it."""
    event = record.get("event")
    allowed = {"event", *EVENT_KEYS[event]} if event else set(EVALUATION_KEYS)
    unknown = set(record) - allowed
    if unknown:
        raise AssertionError(f"report keys outside worker/spec.py's vocabulary: {unknown}")
    reporter.emit(**record)


def check_continue(pid: int | None) -> None:
    """Between steps, as the real worker: stop when asked, or when the orchestrator is gone."""
    if STOP_REQUESTED[0]:
        raise TrialStopped
    if pid is not None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise RuntimeError(f"orchestrator (pid {pid}) is gone; stopping this trial") from None


def train(spec: TrialSpec) -> None:
    """One scripted trial: what `ranksearch.worker.train.training_function` reports."""
    rule, training = rule_for(spec), spec.training
    max_steps, every, lr = training["max_steps"], training["eval_every"], training["learning_rate"]
    if rule.get("crash_at") == 0:
        raise RuntimeError(rule.get("error", "scripted crash before the first step"))
    reporter = Reporter(spec.reports)
    modules = spec.lora["target_modules"]
    emit(
        reporter,
        event="start",
        trainable_params=spec.lora["r"] * 100 * (6 if isinstance(modules, str) else len(modules)),
        total_params=100_000,
        num_processes=1,
        device="cpu",
        mixed_precision="no",
        setup_seconds=0.0,
    )
    started, evaluations, val_loss = time.time(), 0, math.nan
    for step in range(1, max_steps + 1):
        check_continue(spec.orchestrator_pid)
        if rule.get("crash_at") == step:
            raise RuntimeError(rule.get("error", f"scripted crash at step {step}"))
        if rule.get("kill_at") == step:
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        if step % every and step != max_steps:
            continue
        losses = rule.get("losses")
        if losses:
            val_loss = losses[min(evaluations, len(losses) - 1)]
        else:
            val_loss = default_loss(spec.lora, lr, step, max_steps)
        if rule.get("nan_at") == step:
            val_loss = math.nan
        evaluations += 1
        emit(
            reporter,
            step=step,
            epoch=0,
            train_loss=val_loss + 0.02,
            learning_rate=lr,
            train_seconds=0.01 * step,
            eval_seconds=0.01 * evaluations,
            val_loss=val_loss,
            val_loss_se=0.01,
            eval_examples=EXAMPLES,
            accuracy=max(0.0, min(1.0, 1.2 - val_loss)) if math.isfinite(val_loss) else 0.0,
            f1=max(0.0, min(1.0, 1.1 - val_loss)) if math.isfinite(val_loss) else 0.0,
        )
        if rule.get("hang_at") == step:
            while True:  # quiet until stopped or orphaned, as a wedged trial would be
                time.sleep(0.05)
                check_continue(spec.orchestrator_pid)
    emit(
        reporter,
        event="end",
        step=max_steps,
        peak_memory_mb=1.0,
        train_seconds=0.01 * max_steps,
        eval_seconds=0.01 * evaluations,
        wall_seconds=time.time() - started,
        # per example, with the final evaluation's mean: what paired comparisons read
        val_losses=[round(val_loss * (0.5 + i / (EXAMPLES - 1)), 4) for i in range(EXAMPLES)],
    )
    reporter.close()


def serve() -> int:
    """A warm worker, as ranksearch.worker.serve: one job per stdin line, the trial's output
    in its log, an `exit` event per job; a failed trial retires the worker."""
    signal.signal(signal.SIGUSR1, lambda signum, frame: STOP_REQUESTED.__setitem__(0, True))
    home = os.dup(1)
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
            train(spec)
        except TrialStopped:
            stopped = True
        except Exception:  # noqa: BLE001 - the trial fails; the worker is replaced
            traceback.print_exc()
            rc, retire = 1, True
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(home, 1)
        os.dup2(home, 2)
        os.close(log)
        reporter = Reporter(spec.reports)
        emit(reporter, event="exit", rc=rc, stopped=stopped, retire=retire, rss_mb=1.0)
        reporter.close()
        if retire:
            break
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A scripted ranksearch worker, for tests.")
    parser.add_argument("spec", type=Path, nargs="?")
    parser.add_argument("--serve", metavar="STUDY_DIR")
    args = parser.parse_args(argv)
    if args.serve is not None:
        return serve()
    train(TrialSpec.read(args.spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
