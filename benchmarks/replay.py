"""Replay ranksearch's search on any grid of learning curves, without retraining.

A grid file holds one JSON line per configuration: its parameters, its val loss at every
evaluation step, optionally its per-example validation losses and a test score (docs/replay.md;
`convert` writes the grids stored in benchmarks/results that way). `run` replays the shipped
defaults (the study file's defaults: sampler, pruner, derived first rung, informed first trial,
budget rules) and the baselines (TPE without pruning, random search) over many sampler seeds:
reach at 2 / 4 / 6 full trials of compute, where the shipped budget rules stop, and the
recommendation's test gap.

    python benchmarks/replay.py convert --out /work/bench/grids        # the four stored grids
    python benchmarks/replay.py run /work/bench/grids/sst2-random.jsonl --variant no-all-linear
    python benchmarks/replay.py run my-grid.jsonl --repeats 300

Search cost = optimizer steps spent / steps of one full-budget trial. The search runs as
`ranksearch run` does: per-trial seeding, a fixed study name per seed (Hyperband's brackets),
a configuration never trained twice (answered from its first trial at no cost), the pruner
never asked at max_steps, and the stop rules of `ranksearch/search/budget.py` themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gridfile  # noqa: E402

from ranksearch.answer.recommend import answer  # noqa: E402
from ranksearch.config.schema import BudgetConfig, StudyConfig  # noqa: E402
from ranksearch.search import budget, sampling  # noqa: E402

BUDGETS = (2.0, 4.0, 6.0)  # full trials of compute
MAX_COST = 8.0  # where a replay ends when no rule stops it first (full trials)


@dataclass(frozen=True)
class Method:
    """One way to search: sampler, pruner, and how the informed first trial takes part."""

    sampler: str = "tpe"
    pruner: str = "hyperband"
    informed: bool = True  # the informed first trial (tpe only, as `run` does)
    # candidates measured and not shipped (BENCHMARKS.md): `run` runs the informed trial first,
    # its reports in the pruner's rungs like any trial's
    informed_in_rung: bool = True  # False: it never asks the pruner, so it sets no bar
    informed_position: int = 1  # the search trial it runs as (1: first)


def shipped() -> Method:
    """What a study file that leaves every key out runs."""
    s = StudyConfig.model_validate({"study_name": "x", "model": "m", "data": {"source": "d"}})
    return Method(s.sampler.type, s.pruner.type, s.sampler.informed_start)


def methods() -> dict[str, Method]:
    ship = shipped()
    return {
        "shipped defaults": ship,
        "informed trial in the rungs": replace(ship, informed_in_rung=True),
        "informed trial outside the rungs": replace(ship, informed_in_rung=False),
        "no informed trial": replace(ship, informed=False),
        "TPE, no pruning, informed": Method(pruner="none"),
        "TPE, no pruning": Method(pruner="none", informed=False),
        "random, no pruning": Method("random", "none", informed=False),
    }


def study_for(grid: gridfile.Grid, method: Method, seed: int) -> optuna.Study:
    sampler_cfg = {"type": method.sampler, "seed": seed}
    cfg = grid.cfg.model_copy(
        update={
            "sampler": grid.cfg.sampler.model_copy(update=sampler_cfg),
            "pruner": grid.cfg.pruner.model_copy(update={"type": method.pruner}),
        }
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # a fixed name: Hyperband assigns brackets by a hash of the study name and trial number
    s = optuna.create_study(
        study_name=f"replay-{seed}",
        sampler=sampling.create_sampler(cfg),
        pruner=sampling.create_pruner(cfg),
    )
    return s


def informed(grid: gridfile.Grid, method: Method) -> dict | None:
    """The informed trial's params where the method runs one."""
    if not method.informed or method.sampler != "tpe":
        return None
    return sampling.informed_params(grid.cfg.search)


def guess_key(grid: gridfile.Grid, params: dict) -> str:
    """The configuration key of the informed trial's params on this grid."""
    from ranksearch.config import space

    return space.config_key(space.suggest(optuna.trial.FixedTrial(params), grid.cfg.search))


def replay(grid: gridfile.Grid, method: Method, seed: int, max_cost: float = MAX_COST) -> list:
    """One search on the grid's curves until `max_cost` or the space is exhausted: its frozen
    trials, in order (budget.py reads their cost; cut() reads where each rule stops)."""
    from ranksearch.config import space

    s = study_for(grid, method, seed)
    full, seen, cost = grid.max_steps, {}, 0.0
    guess = informed(grid, method)
    while cost < max_cost - 1e-9 and len(seen) < len(grid.rows):
        if guess is not None and len(s.trials) == method.informed_position - 1:
            s.enqueue_trial(guess, user_attrs={"informed_start": True})  # as `run` queues it
        trial = s.ask()
        key = space.config_key(space.suggest(trial, grid.cfg.search))
        row = grid.rows[key]
        trial.set_user_attr("config_key", key)
        for name in ("val_loss_se", "val_losses", "trainable_params"):
            if row.get(name) is not None:
                trial.set_user_attr(name, row[name])
        if key in seen:  # a finished configuration is answered from its result at no cost
            trial.set_user_attr("duplicate_of", seen[key][0])
        asks = method.informed_in_rung or not trial.user_attrs.get("informed_start")
        state = TrialState.COMPLETE
        for step, value in sorted((int(k), v) for k, v in row["curve"].items()):
            trial.report(value, step)
            if key in seen:
                state = seen[key][1]
                if state == TrialState.PRUNED and step >= seen[key][2]:
                    break
                continue
            # never asked at max_steps: a trial that trained every step is complete
            if asks and step < full and trial.should_prune():
                state = TrialState.PRUNED
                cost += step / full
                seen[key] = (trial.number, state, step)
                break
        if key not in seen:
            cost += 1.0
            seen[key] = (trial.number, state, full)
        s.tell(trial, gridfile.final(row, full) if state == TrialState.COMPLETE else None, state)
    return s.get_trials(deepcopy=False)


def cut(trials: list, max_steps: int, full_trials: float | None, patience: float | None) -> list:
    """The trials a search stopped by these rules runs: the same ones (the sampler's draws
    depend on the history only), up to where budget.stop_reason would start no more
    (`patience`: budget.converged with that patience; None: no convergence rule)."""
    for i in range(1, len(trials) + 1):
        spent = budget.full_trials_spent(trials[:i], max_steps)
        if full_trials is not None and spent >= full_trials - 1e-9:
            return trials[:i]
        if patience is not None and budget.converged(trials[:i], max_steps, patience):
            return trials[:i]
    return trials


def summarize(grid: gridfile.Grid, trials: list) -> dict:
    """Cost spent, when the search first held a configuration within the target, and the
    recommendation (`recommend.answer`, the paired rule) with its test gap to the grid best."""
    spent, reached = 0.0, None
    for t in trials:
        spent += budget.trial_steps(t) / grid.max_steps
        if reached is None and t.state == TrialState.COMPLETE and t.value <= grid.target + 1e-12:
            reached = spent
    out = {"cost": spent, "reached_at": reached, "gap": None}
    if grid.has_per_example and grid.has_test:
        ans = answer(trials, "1se")
        if ans.recommended is not None:
            rec = grid.rows[ans.recommended.user_attrs["config_key"]]
            out["gap"] = gridfile.score(grid.rows[grid.best]) - gridfile.score(rec)
    return out


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank), None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def aggregate(runs: list[dict]) -> dict:
    share = sum(r["reached_at"] is not None for r in runs) / len(runs)
    costs, gaps = [r["cost"] for r in runs], [r["gap"] for r in runs if r["gap"] is not None]
    return {
        "reach": share,
        "reach_ci95": 1.96 * math.sqrt(share * (1 - share) / len(runs)),
        "cost_mean": statistics.mean(costs),
        "cost_min": min(costs),
        "cost_median": statistics.median(costs),
        "cost_p90": quantile(costs, 0.9),
        "cost_max": max(costs),
        "gap_mean": statistics.mean(gaps) if gaps else None,
        "gap_p90": quantile(gaps, 0.9),
        "within_half_point": sum(g <= 0.005 for g in gaps) / len(gaps) if gaps else None,
        "seeds": len(runs),
    }


def stop_rules() -> dict[str, tuple[float | None, float | None]]:
    """Fixed compute budgets, what the study file's budget defaults stop at, and the
    convergence rule at other patiences (full trials of compute without a real gain)."""
    b = BudgetConfig()
    rules: dict[str, tuple[float | None, float | None]] = {}
    rules.update({f"{x:g} full trials": (x, None) for x in BUDGETS})
    shipped_patience = budget.CONVERGED_PATIENCE if b.stop_when_converged else None
    rules["shipped stop"] = (b.full_trials, shipped_patience)
    for p in (1.5, 2.0, 3.0):
        rules[f"converged, patience {p:g}"] = (MAX_COST, p)
    return rules


def evaluate(grid: gridfile.Grid, method: Method, repeats: int, rules: dict) -> dict:
    """Every rule's summary over `repeats` sampler seeds, one replay per seed."""
    runs = [replay(grid, method, seed) for seed in range(repeats)]
    out = {}
    for name, (cap, patience) in rules.items():
        if patience is not None and not grid.has_per_example:
            continue  # the convergence rule's noise is paired: skipped, with a note
        out[name] = aggregate(
            [summarize(grid, cut(t, grid.max_steps, cap, patience)) for t in runs]
        )
    return out


def notes(grid: gridfile.Grid) -> list[str]:
    found = []
    if not grid.has_per_example:
        found.append("no per-example losses: the paired recommendation rule and "
                     "budget.stop_when_converged (paired noise) are not replayed")  # fmt: skip
    if not grid.has_test:
        found.append("no test scores: the recommendation's test gap is not replayed")
    informed = sampling.informed_params(grid.cfg.search)
    if informed is None:
        found.append("no guided rank in the space: no informed first trial")
    return found


def print_rows(grid: gridfile.Grid, results: dict) -> None:
    def f(x, fmt=".2f"):
        return "-" if x is None else format(x, fmt)

    for method, rules in results.items():
        for rule, r in rules.items():
            gap = "-" if r["gap_mean"] is None else f"{100 * r['gap_mean']:.2f} pt"
            print(f"| {grid.name} | {method} | {rule} | {r['reach']:.0%} (±{r['reach_ci95']:.0%}) "
                  f"| {f(r['cost_min'])} / {f(r['cost_median'])} / {f(r['cost_p90'])} "
                  f"/ {f(r['cost_max'])} | {gap} |")  # fmt: skip


def run(path: Path, variant: str, repeats: int, out: Path | None) -> dict:
    grid = gridfile.load(path, variant)
    print(f"{grid.name}: {len(grid.rows)} configurations, best {grid.rows[grid.best]['params']} "
          f"at {gridfile.final(grid.rows[grid.best], grid.max_steps):.4f}, target "
          f"{grid.target:.4f}")  # fmt: skip
    for note in notes(grid):
        print(f"note: {note}")
    results = {name: evaluate(grid, m, repeats, stop_rules()) for name, m in methods().items()}
    print("| grid | method | stop | reach (95 % CI) | cost: min / median / p90 / max | test gap |")
    print("|---|---|---|---|---|---|")
    print_rows(grid, results)
    if out is not None:
        out.write_text(json.dumps({"grid": grid.name, "notes": notes(grid), **results}, indent=1))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="replay the shipped defaults and the baselines on a grid file")
    r.add_argument("grid", type=Path)
    r.add_argument("--variant", choices=gridfile.VARIANTS, default="all")
    r.add_argument("--repeats", type=int, default=300, help="sampler seeds per method")
    r.add_argument("--json", type=Path, help="where the results go (JSON)")
    c = sub.add_parser("convert", help="the grids stored in benchmarks/results as grid files")
    c.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.command == "run":
        run(a.grid, a.variant, a.repeats, a.json)
    else:
        convert_stored(a.out)


STORED = {  # name: (table.json under benchmarks/results, module sets by name)
    "sst2-random": "search-cost-i14/sst2-random-rerun-table.json",
    "sst2-grouped": "search-cost-i14/sst2-grouped-rerun-table.json",
    "tweets3": "search-cost-i14/tweets3-table.json",
    "sft": "search-cost-i14/sft-table.json",
}


def convert_stored(out: Path) -> None:
    import search_cost as sc

    for name, rel in STORED.items():
        table = json.loads((HERE / "results" / rel).read_text())
        modules = sc.SFT_MODULES if table.get("space") == "sft" else sc.MODULES
        header, rows = gridfile.from_table(table, modules)
        gridfile.write_lines(out / f"{name}.jsonl", {"name": name, **header}, rows)
        print(f"{name}: {len(rows)} configurations -> {out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
