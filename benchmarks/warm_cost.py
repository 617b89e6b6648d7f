"""Warm workers against cold starts: the fixed cost per trial and a study's wall time.

Runs the same study (`--study`, default cls-task) with `launch.reuse_workers` true and false,
alternating (warm, cold, cold, warm, ...) so that both see the same machine load, `--repeats`
times each, and reports for each mode:

- the fixed cost per trial: a trial's wall time minus its training and evaluation time (its
  start, imports, data, model, adapter saving, end), over every trial that trained;
- the study's wall time, `ranksearch run` from start to exit;
- with `--memory N`: a warm worker's resident memory after each of N trials (a study of N
  unpruned trials), to show it does not grow from trial to trial.

    python benchmarks/warm_cost.py --out bench/warm-cost                     # cls-task
    python benchmarks/warm_cost.py --out bench/warm-sft --study sft-smollm2 --repeats 1
    python benchmarks/warm_cost.py --out bench/warm-mem --repeats 0 --memory 20
    python benchmarks/warm_cost.py --out /tmp/w --study tiny.yaml --quick      # CI smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from _run import run_study


def study_run(study: str, out: Path, warm: bool, overrides: dict[str, str]) -> dict:
    """One `ranksearch run`; its wall time and the fixed cost of each trial it trained."""
    import optuna

    shutil.rmtree(out, ignore_errors=True)
    sets = {
        "study_name": "warm-cost",
        "launch.reuse_workers": str(warm).lower(),
        "tracking": "none",
        **overrides,
    }
    t0 = time.perf_counter()
    run_study(study, out, sets)
    wall = time.perf_counter() - t0
    trials = optuna.load_study(
        study_name="warm-cost", storage=f"sqlite:///{out / 'optuna.db'}"
    ).trials
    states = [t.state.name for t in trials]
    return {"warm": warm, "wall_seconds": wall, "fixed_seconds": fixed_costs(out, trials),
            "states": states, "rss_mb": resident_memory(out)}  # fmt: skip


def fixed_costs(out: Path, trials) -> list[float]:
    """Each trained trial's wall time minus the training and evaluation time of its last
    report (a pruned trial's includes its stop)."""
    fixed = []
    for t in trials:
        if not t.user_attrs.get("wall_seconds"):
            continue  # replayed from a finished twin, or never started
        lines = (out / "trials" / str(t.number) / "reports.jsonl").read_text().splitlines()
        last = [r for r in map(json.loads, lines) if "val_loss" in r][-1]
        fixed.append(t.user_attrs["wall_seconds"] - last["train_seconds"] - last["eval_seconds"])
    return fixed


def resident_memory(out: Path) -> list[float]:
    """The warm worker's RSS after each trial, in trial order, from the trials' exit events."""
    rss = []
    for reports in sorted(
        (out / "trials").glob("*/reports.jsonl"), key=lambda p: int(p.parent.name)
    ):
        for line in reports.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "exit" and rec.get("rss_mb"):
                rss.append(rec["rss_mb"])
    return rss


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/warm-cost"))
    p.add_argument("--study", default="cls-task", help="a study name or file (default: cls-task)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each mode (default 3)")
    p.add_argument("--memory", type=int, default=0, metavar="N", help="RSS over N warm trials")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="one short run of each mode (CI smoke)")
    args = p.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.quick:
        args.repeats, args.memory = 1, 0  # the warm run's trials report their RSS too
        overrides |= {"budget.n_trials": "3", "training.max_steps": "4", "training.eval_every": "2"}
    args.out.mkdir(parents=True, exist_ok=True)

    runs = []
    for i in range(args.repeats):
        for warm in (True, False) if i % 2 == 0 else (False, True):
            name = f"{'warm' if warm else 'cold'}-{i}"
            runs.append(study_run(args.study, args.out / name, warm, overrides))
            r = runs[-1]
            print(f"{name}: study {r['wall_seconds']:.1f} s, "
                  f"fixed cost per trial {spread(r['fixed_seconds'])} s (min/median/max)",
                  flush=True)  # fmt: skip
    result: dict = {"study": args.study, "overrides": overrides, "runs": runs}
    if runs:
        by = {w: [r for r in runs if r["warm"] is w] for w in (True, False)}
        walls = {w: [r["wall_seconds"] for r in rs] for w, rs in by.items()}
        fixed = {w: [f for r in rs for f in r["fixed_seconds"]] for w, rs in by.items()}
        result["summary"] = {
            "fixed_seconds": {
                m: {
                    "min": min(fixed[w]),
                    "median": statistics.median(fixed[w]),
                    "max": max(fixed[w]),
                }
                for m, w in (("warm", True), ("cold", False))
            },
            "wall_seconds": {m: walls[w] for m, w in (("warm", True), ("cold", False))},
            "wall_ratio_cold_over_warm": statistics.median(walls[False])
            / statistics.median(walls[True]),
        }
        print(f"\n| | warm | cold |\n|---|---|---|\n"
              f"| fixed cost per trial, min / median / max | {spread(fixed[True])} s "
              f"| {spread(fixed[False])} s |\n"
              f"| study wall time, min / median / max | {spread(walls[True])} s "
              f"| {spread(walls[False])} s |\n"
              f"| study wall time, cold / warm (medians) "
              f"| **{result['summary']['wall_ratio_cold_over_warm']:.2f}x** | |")  # fmt: skip
    if args.memory:
        out = args.out / "memory"
        mem_sets = {**overrides, "budget.n_trials": str(args.memory), "pruner": "none"}
        study_run(args.study, out, True, mem_sets)
        rss = resident_memory(out)
        result["rss_mb"] = rss
        print(f"\nwarm worker RSS after each of {len(rss)} trials (MB): "
              + " ".join(f"{x:.0f}" for x in rss))  # fmt: skip
    (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
