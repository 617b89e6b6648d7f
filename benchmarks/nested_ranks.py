"""Nested-rank trials against independently trained ranks, on the stored grids.

For every (target modules, learning rate) of a grid in BENCHMARKS.md, `train` runs one nested
trial (`search.rank_mode: nested`: one LoRA at the grid's largest rank, every rank of the grid
reported) through `ranksearch run`, with the grid's own data, steps and seed; `table` compares
each nested rank curve with the grid's separately trained ranks: rank correlation, the smallest
rank within one seed std chosen by each, the gap between them, the whole grid's answer, and
the cost of a nested trial in full trials.

    python benchmarks/search_cost.py tweets-data --data /work/bench/tweets3-data   # once
    python benchmarks/nested_ranks.py train --grid sst2-random --out /work/bench/nested
    python benchmarks/nested_ranks.py table --out /work/bench/nested --json results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import search_cost  # noqa: E402

from ranksearch.search import budget  # noqa: E402

RESULTS = HERE / "results" / "search-cost-i14"
# name: (data folder, search_cost space, length-grouped batches, the grid's table)
GRIDS = {
    "sst2-random": ("../shared/data/sst2", "full", False, "sst2-random-rerun-table.json"),
    "sst2-grouped": ("../shared/data/sst2", "full", True, "sst2-grouped-rerun-table.json"),
    "tweets3": ("/work/bench/tweets3-data", "small", False, "tweets3-table.json"),
    "sft": ("../shared/data/sst2", "sft", False, "sft-table.json"),  # data unused
}


def nested_study(
    grid: str,
    data: Path | None = None,
    sampling: str = "by-rank",
    quick: bool = False,
    model: str = search_cost.MODEL,
) -> dict:
    """The grid's study with `rank_mode: nested`: one trial per (modules, lr), two at a time
    (`quick`: search_cost's quick grid, one nested trial of 4 steps)."""
    folder, space, grouped, _ = GRIDS[grid]
    raw = search_cost.study(Path(data or folder), quick, model, grouped, space)
    raw["study_name"] = "nested-ranks"
    raw["search"]["rank_mode"] = "nested"
    raw["search"]["nested_sampling"] = sampling
    modules, lrs = raw["search"]["target_modules"], raw["search"]["learning_rate"]
    raw["budget"]["n_trials"] = len(modules) * len(lrs)
    return raw


def train(grid: str, out: Path, data: Path | None, sampling: str, quick: bool, model: str) -> None:
    folder = out / grid
    folder.mkdir(parents=True, exist_ok=True)
    study_file = folder / "nested.yaml"
    raw = nested_study(grid, data, sampling, quick, model)
    study_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "ranksearch.cli", "run", "--study", str(study_file),
         "--out", str(folder / "study"), "--plain"],
        check=True,
    )  # fmt: skip
    (folder / "wall.json").write_text(json.dumps({"wall_seconds": time.time() - started}))


def nested_trials(folder: Path) -> dict[tuple[str, float], dict]:
    """(modules, lr) -> the nested trial's per-rank final val losses and its seconds."""
    import optuna

    from ranksearch.config.space import TrialConfig

    study = optuna.load_study(
        study_name="nested-ranks", storage=f"sqlite:///{folder}/study/optuna.db"
    )
    out = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        config = TrialConfig.of(t)
        a = t.user_attrs
        if "ranks" not in a:  # the plain check of the nested answer `run` trains after them
            continue
        out[(config.target_modules, round(config.learning_rate, 8))] = {
            "ranks": {int(r): m["val_loss"] for r, m in a["ranks"].items()},
            "rank_params": {int(r): n for r, n in a["rank_params"].items()},
            "wall_seconds": a.get("wall_seconds"),
            "train_seconds": a.get("train_seconds"),
            "eval_seconds": a.get("eval_seconds"),
            "curve": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "trial": t.number,
        }
    return out


def grid_ranks(table: dict) -> dict[tuple[str, float], dict[int, dict]]:
    """(modules, lr) -> rank -> the grid's independently trained row."""
    out: dict[tuple[str, float], dict[int, dict]] = {}
    for key, row in table["configs"].items():
        c = json.loads(key)
        out.setdefault((c["target_modules"], round(c["learning_rate"], 8)), {})[c["rank"]] = row
    return out


def smallest_within(losses: dict[int, float], margin: float) -> int:
    """The smallest rank whose loss is within `margin` of the curve's best."""
    best = min(losses.values())
    return min(r for r, v in losses.items() if v <= best + margin)


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 2:
        return None

    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    ra, rb = ranks(a), ranks(b)
    if len(set(ra)) < 2 or len(set(rb)) < 2:
        return None
    return statistics.correlation(ra, rb)


def grid_table(grid: str, table: Path | None = None) -> dict:
    """The grid's stored table (search_cost.py's table.json), or the one at `table`."""
    return json.loads((table or RESULTS / GRIDS[grid][3]).read_text())


def compare(grid: str, out: Path, table_path: Path | None = None) -> dict:
    table = grid_table(grid, table_path)
    std = table["best_seeds"]["std"]
    independent = grid_ranks(table)
    nested = nested_trials(out / grid)
    if not nested:
        return {"grid": grid, "rows": [], "answer": None, "trials": {}}
    rows = []
    for key, n in sorted(nested.items()):
        g = {r: row["val_loss"] for r, row in independent[key].items()}
        ranks = sorted(g)
        pick_n, pick_g = smallest_within(n["ranks"], std), smallest_within(g, std)
        plain_seconds = statistics.mean(
            independent[key][r]["wall_seconds"]
            for r in ranks
            if independent[key][r].get("wall_seconds")
        )
        rows.append({
            "modules": key[0], "learning_rate": key[1],
            "nested": {r: n["ranks"][r] for r in ranks}, "grid": g,
            "spearman": spearman([n["ranks"][r] for r in ranks], [g[r] for r in ranks]),
            "nested_pick": pick_n, "grid_pick": pick_g,
            "gap": g[pick_n] - g[pick_g],  # the grid's loss at the nested pick, over its own
            "within_noise": g[pick_n] - g[pick_g] <= std,
            # a plain trial's clock: the same steps, one rank evaluated (nested_cost)
            "cost_full_trials": nested_cost({key: n}),
            # against the grid's own trials (trained on another day, under another load)
            "wall_vs_grid": n["wall_seconds"] / plain_seconds,
            "eval_share": n["eval_seconds"] / (n["train_seconds"] + n["eval_seconds"]),
        })  # fmt: skip
    # the whole grid's answer: the smallest configuration within one seed std of the best
    # (fewest trainable parameters), from the nested curves against the grid's own
    flat_n = {(k, r): v for k, n in nested.items() for r, v in n["ranks"].items()}
    flat_g = {(k, r): row["val_loss"] for k, rs in independent.items() for r, row in rs.items()}
    params = {(k, r): p for k, n in nested.items() for r, p in n["rank_params"].items()}

    def pick(losses: dict) -> tuple:
        best = min(losses.values())
        return min((c for c, v in losses.items() if v <= best + std), key=lambda c: params[c])

    answer_n, answer_g = (
        pick({c: v for c, v in flat_n.items() if c in flat_g}),
        pick({c: v for c, v in flat_g.items() if c in params}),
    )
    grid_best = min(flat_g.values())
    return {
        "grid": grid,
        "seed_std": std,
        "rows": rows,
        "answer": {
            "nested": [*answer_n[0], answer_n[1]],
            "grid": [*answer_g[0], answer_g[1]],
            "nested_pick_grid_loss": flat_g[answer_n],
            "grid_best": grid_best,
            "within_noise": flat_g[answer_n] <= grid_best + std,
        },
        "trials": {f"{k[0]} {k[1]:g}": n for k, n in nested.items()},
    }


def nested_cost(trials: dict) -> float:
    """Full trials per full nested trial, from the nested trials' own clocks: a plain trial
    trains the same steps and evaluates one rank where a nested one evaluates every rank."""
    ratios = []
    for n in trials.values():
        ranks, train, evals = len(n["ranks"]), n["train_seconds"], n["eval_seconds"]
        ratios.append((train + evals) / (train + evals / ranks))
    return statistics.mean(ratios)


VARIANTS = ("all", "no-all-linear", "low-lr")  # as benchmarks/gridfile.py's, where one applies


def keep(variant: str, keys) -> set:
    """The (modules, lr) of a wrong-prior variant (gridfile.variant: the informed trial's
    module set removed, or the highest learning rate)."""
    keys = set(keys)
    if variant == "no-all-linear":
        return {k for k in keys if k[0] != "all-linear"}
    if variant == "low-lr":
        return {k for k in keys if k[1] != max(lr for _, lr in keys)}
    return keys


def nested_grid(grid: str, out: Path, table_path: Path | None = None, variant: str = "all"):
    """The nested trials as a replayable grid: one row per (modules, lr) whose curve is the
    best rank's (what the pruner and the sampler see), and the row's pick, its best rank at
    the end, looked up in the grid's independently trained table (`pick_loss`)."""
    import gridfile

    table = grid_table(grid, table_path)
    independent = grid_ranks(table)
    nested = nested_trials(out / grid)
    kept = keep(variant, independent)
    independent = {k: v for k, v in independent.items() if k in kept}
    nested = {k: v for k, v in nested.items() if k in kept}
    top = max(r for n in nested.values() for r in n["ranks"])
    rows = []
    for key, n in nested.items():
        pick = min(n["ranks"], key=lambda r: (n["ranks"][r], r))
        rows.append({
            "params": {"target_modules": key[0], "learning_rate": key[1], "rank": top,
                       "alpha_ratio": 2, "dropout": 0.0},
            "curve": n["curve"],
            "pick_loss": independent[key][pick]["val_loss"],
        })  # fmt: skip
    header = {"max_steps": table["max_steps"], "seed_std": table["best_seeds"]["std"]}
    g = gridfile.build(f"{grid} nested", header, rows)
    search = g.cfg.search.model_copy(
        update={
            "rank": sorted({r for n in nested.values() for r in n["ranks"]}),
            "rank_mode": "nested",
        }  # fmt: skip
    )
    g.cfg = g.cfg.model_copy(update={"search": search})
    g.rows = {gridfile.row_key(g.cfg, r["params"]): r for r in rows}
    # the target is the independently trained grid's: best plain configuration + seed noise
    g.target = min(row["val_loss"] for rs in independent.values() for row in rs.values())
    g.target += table["best_seeds"]["std"]
    return g, nested_cost(nested)


def reach(
    grid: str,
    out: Path,
    repeats: int,
    table_path: Path | None = None,
    variant: str = "all",
    budgets=(2.0, 4.0, 6.0),
) -> dict:
    """The nested search (shipped sampler and pruner, informed first trial, pruning on the
    best rank's loss) replayed over `repeats` sampler seeds: where it first holds a nested
    trial whose best rank, trained plain, is within the grid's target; cost in full trials
    (a full nested trial costs `nested_cost`), without and with the one plain check."""
    import replay

    g, per_trial = nested_grid(grid, out, table_path, variant)
    method = replay.shipped()
    reached = []
    for seed in range(repeats):
        trials = replay.replay(g, method, seed, max_cost=max(budgets) / per_trial + 1)
        spent, at = 0.0, None
        for t in trials:
            spent += per_trial * budget.trial_steps(t) / g.max_steps
            row = g.rows[t.user_attrs["config_key"]]
            if at is None and t.state.name == "COMPLETE" and row["pick_loss"] <= g.target:
                at = spent
        reached.append(at)
    rates = {}
    for b in budgets:
        rates[f"{b:g}"] = sum(a is not None and a <= b + 1e-9 for a in reached) / repeats
        rates[f"{b:g} with check"] = sum(
            a is not None and a + 1 <= b + 1e-9 for a in reached
        ) / repeats  # fmt: skip
    costs = sorted(a for a in reached if a is not None)
    return {"grid": grid, "variant": variant, "nested_cost": per_trial,
            "configurations": len(g.rows), "reach": rates, "seeds": repeats,
            "cost_to_reach_median": statistics.median(costs) if costs else None}  # fmt: skip


def markdown(results: list[dict]) -> None:
    print("| grid | modules | lr | nested / grid val loss per rank | Spearman | pick nested "
          "/ grid | gap | cost (full trials) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for r in res["rows"]:
            curve = ", ".join(
                f"r{k} {r['nested'][k]:.4f}/{r['grid'][k]:.4f}" for k in sorted(r["grid"])
            )
            rho = "-" if r["spearman"] is None else f"{r['spearman']:.2f}"
            print(f"| {res['grid']} | {r['modules']} | {r['learning_rate']:g} | {curve} | {rho} "
                  f"| r{r['nested_pick']} / r{r['grid_pick']} | {r['gap']:+.4f} "
                  f"| {r['cost_full_trials']:.2f} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=["train", "table", "reach"])
    p.add_argument("--repeats", type=int, default=100, help="reach: sampler seeds")
    p.add_argument("--table", type=Path, help="the grid's table.json, if not the stored one")
    p.add_argument("--model", default=search_cost.MODEL, help="train: the base model")
    p.add_argument("--quick", action="store_true", help="train: one nested trial of 4 steps")
    p.add_argument("--grid", choices=list(GRIDS), action="append")
    p.add_argument("--out", type=Path, default=Path("/work/bench/nested"))
    p.add_argument("--data", type=Path, help="the grid's data folder, if not the default")
    p.add_argument("--json", type=Path, help="table: write the comparison here too")
    p.add_argument("--sampling", choices=["by-rank", "uniform"], default="by-rank",
                   help="train: search.nested_sampling (how a step draws its rank)")  # fmt: skip
    a = p.parse_args()
    grids = a.grid or list(GRIDS)
    if a.phase == "train":
        for grid in grids:
            train(grid, a.out, a.data, a.sampling, a.quick, a.model)
        return
    if a.phase == "reach":
        found = []
        for g in grids:
            if not (a.out / g / "study" / "optuna.db").exists() or not nested_trials(a.out / g):
                continue
            keys = set(nested_trials(a.out / g))
            # a variant that leaves nothing, or everything (nothing to remove), is no variant
            variants = [v for v in VARIANTS if v == "all" or set() < keep(v, keys) < keys]
            found += [reach(g, a.out, a.repeats, a.table, v) for v in variants]
        for r in found:
            print(json.dumps(r))
        if a.json:
            a.json.write_text(json.dumps(found, indent=1))
        return
    results = [
        compare(g, a.out, a.table) for g in grids if (a.out / g / "study" / "optuna.db").exists()
    ]
    results = [r for r in results if r["rows"]]
    markdown(results)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
