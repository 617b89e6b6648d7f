"""The shipped defaults and the candidates, replayed on every stored grid and wrong-prior
variant (benchmarks/replay.py on the grid files of `replay.py convert`): reach at 2 / 4 / 6
full trials of compute, and where the budget rules stop. BENCHMARKS.md section 1's table.

    python benchmarks/replay.py convert --out /work/bench/grids
    python benchmarks/replay_table.py --grids /work/bench/grids --repeats 300 --out table.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gridfile  # noqa: E402
import replay  # noqa: E402

GRIDS = tuple(replay.STORED)


def candidates() -> dict[str, replay.Method]:
    """The shipped defaults, the mechanisms measured for the informed trial, the baselines."""
    ship, out = replay.shipped(), {}
    out["shipped defaults"] = ship
    out["informed first, in the rungs (before)"] = replace(ship, informed_in_rung=True,
                                                           informed_position=1)  # fmt: skip
    out["informed first, outside the rungs"] = replace(ship, informed_in_rung=False,
                                                       informed_position=1)  # fmt: skip
    for pos in (2, 3):
        out[f"informed as trial {pos}, in the rungs"] = replace(
            ship, informed_in_rung=True, informed_position=pos
        )
    out["no informed trial"] = replace(ship, informed=False)
    out["TPE, no pruning, informed first"] = replace(ship, pruner="none", informed_position=1)
    out["TPE, no pruning"] = replay.Method(pruner="none", informed=False)
    out["random, no pruning"] = replay.Method("random", "none", informed=False)
    return out


def pct(r: dict, rule: str) -> str:
    return "-" if rule not in r else f"{100 * r[rule]['reach']:.0f}"


def markdown(results: dict) -> None:
    """BENCHMARKS.md's tables from the results: reach, then cost and the test gap."""
    ship, tpe, rnd = "shipped defaults", "TPE, no pruning", "random, no pruning"
    fixed = [f"{b:g} full trials" for b in replay.BUDGETS]
    print("| grid | variant | prior | shipped defaults | TPE, no pruning | random |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        grid, _, variant = name.partition(" ")
        cells = [" / ".join(pct(row[m], b) for b in fixed) + " %" for m in (ship, tpe, rnd)]
        print(f"| {grid} | {variant or 'all'} | {row.get('prior', '?')} | {' | '.join(cells)} |")
    print("\n| grid | variant | cost at 2 / 4 / 6: median (max) | converged (patience 2): reach, "
          "cost min / median / p90 / max | test gap at 4 / 6: mean (p90) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, row in results.items():
        grid, _, variant = name.partition(" ")
        r = row[ship]
        costs = " / ".join(f"{r[b]['cost_median']:.2f} ({r[b]['cost_max']:.2f})" for b in fixed)
        c = r.get("converged, patience 2")
        conv = "- (no per-example losses)" if c is None else (
            f"{100 * c['reach']:.0f} %, {c['cost_min']:.2f} / {c['cost_median']:.2f} / "
            f"{c['cost_p90']:.2f} / {c['cost_max']:.2f}")  # fmt: skip
        gaps = " / ".join(
            "-"
            if r[b]["gap_mean"] is None
            else f"{100 * r[b]['gap_mean']:.2f} ({100 * r[b]['gap_p90']:.2f}) pt"
            for b in fixed[1:]
        )
        print(f"| {grid} | {variant or 'all'} | {costs} | {conv} | {gaps} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grids", type=Path, required=True, help="the folder of `replay.py convert`")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--methods", nargs="*", help="only these methods (default: all)")
    p.add_argument("--variants", nargs="*", default=list(gridfile.VARIANTS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--markdown", action="store_true", help="print the tables of --out and stop")
    a = p.parse_args()
    if a.markdown:
        return markdown(json.loads(a.out.read_text()))
    methods = {k: m for k, m in candidates().items() if not a.methods or k in a.methods}
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    for name in GRIDS:
        for v in a.variants:
            grid = gridfile.load(a.grids / f"{name}.jsonl", v)
            row = results.setdefault(grid.name, {"notes": replay.notes(grid)})
            guess = replay.informed(grid, replay.shipped())
            row["informed_reaches"] = (
                guess is not None
                and min(
                    gridfile.final(grid.rows[k], grid.max_steps)
                    for k in grid.rows
                    if k == replay.guess_key(grid, guess)
                )
                <= grid.target
            )
            for m, method in methods.items():
                row[m] = replay.evaluate(grid, method, a.repeats, replay.stop_rules())
                r = row[m]
                cells = " ".join(f"{r[f'{b:g} full trials']['reach']:4.0%}" for b in replay.BUDGETS)
                stop = "".join(
                    f" | {k[-3:]} {c['reach']:4.0%} at {c['cost_median']:.2f}"
                    for k, c in r.items()
                    if k.startswith("converged")
                )
                print(f"{grid.name:28s} {m:40s} {cells}{stop}", flush=True)
            a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
