"""Orchestration cost at scale: a dummy worker that only reports, 500 trials, 4 processes, one
PostgreSQL study, MLflow logging on.

Each process runs ranksearch's own path for a trial, without a model: next trial under the
study lock (lost-trial check, counts, ask), suggest the configuration, then per report
`trial.report` + `should_prune` (Hyperband) and an MLflow `log_report`, then `tell` and the
MLflow end of the trial. Reports follow a synthetic learning curve. Times are per call, split by
how many trials the study already held, to show how the cost grows.

    python benchmarks/orchestration.py --storage postgresql://postgres@127.0.0.1:5432/bench
    python benchmarks/orchestration.py --storage sqlite:////tmp/orch.db --quick      # CI smoke
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import statistics
import tempfile
import time
from pathlib import Path

STUDY = "orchestration-bench"


def _config(n_trials: int):
    """The default study's search space, pruner and steps, with the benchmark's budget."""
    import yaml

    from ranksearch.config.paths import resolve_study_file
    from ranksearch.config.schema import StudyConfig

    data = yaml.safe_load(resolve_study_file("cls-task").read_text())
    data.update(study_name=STUDY, enqueue=[], budget={"n_trials": n_trials})
    return StudyConfig.model_validate(data)


def work(index: int, storage: str, tracking: str, n_trials: int, out: list) -> None:
    """One orchestrator process: trials until the study's budget is spent."""
    import optuna

    from ranksearch.config import space
    from ranksearch.search.loop import open_study, trial_counts
    from ranksearch.search.recovery import fail_lost
    from ranksearch.search.sampling import asks_pruner
    from ranksearch.search.storage import study_lock
    from ranksearch.tracking.tracker import MlflowTracker

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = _config(n_trials)
    tracker = MlflowTracker(tracking, STUDY, "none", Path(tempfile.mkdtemp()))
    study, view = open_study(cfg, storage), _Silent()  # the loop's pieces, without a launcher
    _attach(tracker, study)
    rng = random.Random(index)
    timings: list[dict] = []
    while True:
        t0 = time.perf_counter()
        with study_lock(study._storage, STUDY):
            fail_lost(study, cfg, tracker, view)
            c = trial_counts(study)
            if c["complete"] + c["pruned"] + c["running"] >= n_trials:
                break
            trial = study.ask()
        config = space.suggest(trial, cfg.search)
        trial.set_user_attr("config", config.as_attr())
        run_id = tracker.start_trial(trial.number, config)
        trial.set_user_attr("mlflow_run_id", run_id)
        ask_s = time.perf_counter() - t0
        quality = rng.random()
        report_s, log_s, pruned = [], [], False
        for step in range(cfg.training.eval_every, cfg.training.max_steps + 1,
                          cfg.training.eval_every):  # fmt: skip
            loss = 0.3 + 0.4 * quality + 0.3 * math.exp(-step / 30) + rng.gauss(0, 0.01)
            t1 = time.perf_counter()
            trial.report(loss, step)
            prune = asks_pruner(step, cfg.training.max_steps) and trial.should_prune()
            report_s.append(time.perf_counter() - t1)
            t2 = time.perf_counter()
            tracker.log_report(trial.number, {"step": step, "val_loss": loss})
            log_s.append(time.perf_counter() - t2)
            if prune:
                pruned = True
                break
        t3 = time.perf_counter()
        state = optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE
        study.tell(trial, None if pruned else loss, state=state)
        tracker.end_trial(study._storage.get_trial(trial._trial_id))
        tell_s = time.perf_counter() - t3
        timings.append(
            {
                "number": trial.number,
                "ask": ask_s,
                "report": report_s,
                "log": log_s,
                "tell": tell_s,
                "pruned": pruned,
            }  # fmt: skip
        )
    out.extend(timings)


class _Silent:
    def message(self, text: str) -> None: ...


def _attach(tracker, study) -> None:
    """The experiment and the parent run, as start_study makes them (without a study file)."""
    tracker.study_name = study.study_name
    tracker.experiment_id = tracker._experiment()
    tracker.parent_id = tracker._parent(study.study_name)


def summarize(timings: list[dict], buckets: int = 5) -> dict:
    timings.sort(key=lambda t: t["number"])
    size = max(1, math.ceil(len(timings) / buckets))
    rows = []
    for start in range(0, len(timings), size):
        part = timings[start : start + size]
        reports = [r for t in part for r in t["report"]]
        logs = [x for t in part for x in t["log"]]
        rows.append(
            {
                "trials": f"{part[0]['number']}-{part[-1]['number']}",
                "ask_ms": 1000 * statistics.median(t["ask"] for t in part),
                "report_prune_ms": 1000 * statistics.median(reports),
                "report_prune_p95_ms": 1000 * sorted(reports)[int(0.95 * (len(reports) - 1))],
                "tell_ms": 1000 * statistics.median(t["tell"] for t in part),
                "mlflow_log_ms": 1000 * statistics.median(logs),
                "per_report_total_ms": 1000
                * (statistics.median(reports) + statistics.median(logs)),
            }
        )
    return {
        "trials": len(timings),
        "pruned": sum(t["pruned"] for t in timings),
        "reports": sum(len(t["report"]) for t in timings),
        "by_trials": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--storage", required=True, help="Optuna storage URL (a fresh database)")
    p.add_argument("--tracking-uri", default=None, help="default: a SQLite store in --out")
    p.add_argument("--out", type=Path, default=Path("bench/orchestration"))
    p.add_argument("--trials", type=int, default=500)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.trials, a.processes = 12, 2
    a.out.mkdir(parents=True, exist_ok=True)
    tracking = a.tracking_uri or f"sqlite:///{(a.out / 'mlflow.db').resolve()}"
    from ranksearch.search.loop import open_study

    open_study(_config(a.trials), a.storage)  # created once, before the workers race
    with mp.Manager() as manager:
        out = manager.list()
        started = time.perf_counter()
        procs = [
            mp.Process(target=work, args=(i, a.storage, tracking, a.trials, out))
            for i in range(a.processes)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        wall = time.perf_counter() - started
        timings = list(out)
    result = {"processes": a.processes, "wall_s": round(wall, 1), **summarize(timings)}
    (a.out / "orchestration.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
