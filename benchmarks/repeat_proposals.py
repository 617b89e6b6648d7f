"""How TPE reacts to its proposal of a configuration the study already trained: told with the
twin's value (what ranksearch records, search/repeats.py) or hidden from it (told FAIL, which
TPE ignores). Replayed on every stored grid, without pruning, with and without the informed
first trial: repeats per search, the share of searches stuck (STUCK repeats before 6 full
trials), and reach (a complete trial within one seed std of the grid best) at 2 / 4 / 6 full
trials, as search_cost.py counts it. A repeat costs no compute.

    python benchmarks/repeat_proposals.py --repeats 100   # ~10 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import optuna

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import rung_sweep  # noqa: E402
import search_cost as sc  # noqa: E402

BUDGETS = (2.0, 4.0, 6.0)
STUCK = 200  # repeats after which a search counts as stuck (ranksearch ends it after 20 in a row)


def replay(table: dict, seed: int, told: bool, informed: bool) -> tuple[list, list, int]:
    """One TPE search to 6 full trials: its trace and costs (search_cost.replay's shape) and how
    many of its proposals repeated a trained configuration."""
    from ranksearch.config import space
    from ranksearch.config.schema import StudyConfig
    from ranksearch.search.sampling import create_sampler, informed_params

    raw = sc.study(Path("."), table.get("quick", False), space=table.get("space") or "full")
    raw.update(sampler={"type": "tpe", "seed": seed, "n_startup_trials": 4})
    cfg = StudyConfig.model_validate(raw)
    study = optuna.create_study(sampler=create_sampler(cfg))
    if informed and (params := informed_params(cfg.search)) is not None:
        study.enqueue_trial(params)
    seen: dict[str, float] = {}
    trace, spent, repeats = [], [], 0
    n_space = len(table["configs"])
    while len(trace) < max(BUDGETS) and len(seen) < n_space and repeats < STUCK:
        trial = study.ask()
        key = space.config_key(space.suggest(trial, cfg.search))
        if key in seen:
            repeats += 1
            if told:
                study.tell(trial, seen[key])
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        seen[key] = table["configs"][key]["val_loss"]
        study.tell(trial, seen[key])
        trace.append((float(len(trace) + 1), key))
        spent.append(float(len(trace)))
    return trace, spent, repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=100, help="sampler seeds per setting")
    p.add_argument("--out", type=Path, default=HERE / "results/repeat-proposals.json")
    a = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {}
    for grid, path in rung_sweep.GRIDS.items():
        table = json.loads(path.read_text())
        for informed in (True, False):
            for told in (True, False):
                runs = [replay(table, seed, told, informed) for seed in range(a.repeats)]
                reach = [
                    sc.aggregate([sc.summarize(table, *sc.truncate(t, s, b)) for t, s, _ in runs])[
                        "reached_fraction"
                    ]
                    for b in BUDGETS
                ]
                per_search = sum(r for *_, r in runs) / a.repeats
                stuck = sum(r >= STUCK for *_, r in runs) / a.repeats
                name = f"{grid}|{'informed' if informed else 'tpe'}|{'told' if told else 'hidden'}"
                out[name] = {"reach": reach, "repeats_per_search": per_search, "stuck": stuck}
                cells = " ".join(f"{100 * r:5.1f}%" for r in reach)
                print(
                    f"{name:32s} {cells}  repeats/search {per_search:6.2f}  "
                    f"stuck {100 * stuck:5.1f}%",
                    flush=True,
                )
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
