"""Where the first rung goes: TPE + Hyperband replayed on every stored grid with the first rung
at 10-50 % of the budget, the derived rung (the evaluation step nearest max_steps / 3), a noise
margin on the cut, and no pruning (no informed first trial: the search's own reach). Reach rate
at 4 and 6 full trials of compute, as search_cost.py counts it.

    python benchmarks/rung_sweep.py --repeats 300    # ~6 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import search_cost as sc  # noqa: E402

RESULTS = HERE / "results"
GRIDS = {
    "sst2-random": RESULTS / "search-cost/table.json",
    "sst2-grouped": RESULTS / "search-cost-grouped/table.json",
    "tweets3": RESULTS / "search-cost-i14/tweets3-table.json",
    "sft": RESULTS / "search-cost-i14/sft-table.json",
}
# name: (sampler, pruner, first rung as a share of max_steps or None: derived, reduction factor,
# informed first trial[, noise margin in standard errors]). "rung 0.4" is the rule shipped
# before (max_steps / 3 rounded up to an evaluation step) on all four grids.
METHODS = {f"rung {r}": ("tpe", "hyperband", r, 3, False) for r in (0.1, 0.2, 0.3, 0.4, 0.5)}
METHODS["derived"] = ("tpe", "hyperband", None, 3, False)
METHODS["rung 0.2 rf2"] = ("tpe", "hyperband", 0.2, 2, False)
METHODS["derived margin 1se"] = ("tpe", "hyperband", None, 3, False, 1.0)
METHODS["derived margin 2se"] = ("tpe", "hyperband", None, 3, False, 2.0)
METHODS["rung 0.4 margin 2se"] = ("tpe", "hyperband", 0.4, 3, False, 2.0)
METHODS["no pruning"] = ("tpe", "none", 0.2, 3, False)
METHODS["random"] = ("random", "none", 0.2, 3, False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=300, help="sampler seeds per method")
    p.add_argument("--out", type=Path, default=RESULTS / "search-cost-i14/rung-sweep.json")
    a = p.parse_args()
    out = {}
    for grid, path in GRIDS.items():
        table = json.loads(path.read_text())
        for name, method in METHODS.items():
            runs = [sc.replay(table, method, seed, 10**9, 6.0) for seed in range(a.repeats)]
            row = []
            for budget in (4.0, 6.0):
                summaries = [sc.summarize(table, *sc.truncate(t, s, budget)) for t, s in runs]
                share = sc.aggregate(summaries)["reached_fraction"]
                out[f"{grid}|{name}|{budget:g}"] = share
                row.append(f"{share * 100:5.1f}%")
            print(f"{grid:13s} {name:20s} {' '.join(row)}", flush=True)
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
