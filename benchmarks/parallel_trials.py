"""Wall-clock speed-up of `launch.parallel_trials` on this machine's CPU.

The same four trials (the default study's model and data, a 4-point grid over rank, no pruning)
run one at a time, then two at a time, each in a fresh study directory.

    python benchmarks/parallel_trials.py --out bench/parallel            # about 5 minutes
    python benchmarks/parallel_trials.py --out /tmp/p --study tiny.yaml --quick   # CI smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from _run import run_study


def run(out: Path, study: str, parallel: int, quick: bool) -> tuple[float, float]:
    steps = 4 if quick else 60
    overrides = {
        "study_name": f"parallel-{parallel}",
        "search.rank": "[4, 8]" if quick else "[4, 8, 16, 32]",
        "search.alpha_ratio": "2",
        "search.dropout": "0.0",
        "search.target_modules": "[query, value]",
        "search.learning_rate": "1.0e-3",
        "training.max_steps": str(steps),
        "training.eval_every": str(steps // 2),
        "pruner": "none",
        "sampler": "grid",
        "budget.n_trials": "2" if quick else "4",
        "launch.parallel_trials": str(parallel),
        "launch.device": "cpu",
        "tracking": "none",
        "enqueue": "[]",
    }
    study_dir = out / f"parallel-{parallel}"
    shutil.rmtree(study_dir, ignore_errors=True)
    started = time.perf_counter()
    run_study(study, study_dir, overrides)
    wall = time.perf_counter() - started
    import optuna

    trials = optuna.load_study(
        study_name=f"parallel-{parallel}", storage=f"sqlite:///{study_dir / 'optuna.db'}"
    ).trials
    # first trial started -> last trial finished: the trials alone, data preparation left out
    span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    return wall, span.total_seconds()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/parallel"))
    p.add_argument("--study", default="cls-task", help="a study name or file (default: cls-task)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    (serial, serial_trials), (parallel, parallel_trials) = (
        run(a.out, a.study, n, a.quick) for n in (1, 2)
    )
    result = {
        "cpus": os.cpu_count(),
        "one_at_a_time": {"wall_s": round(serial, 1), "trials_s": round(serial_trials, 1)},
        "two_at_a_time": {"wall_s": round(parallel, 1), "trials_s": round(parallel_trials, 1)},
        "speedup_trials": round(serial_trials / parallel_trials, 2),
        "speedup_wall": round(serial / parallel, 2),
    }
    (a.out / "parallel.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
