"""When parameter importances mean something: how many complete trials the report's importances
(ranksearch.answer.importance, Optuna's PED-ANOVA) need before their ranking is the one the
whole grid gives.

For every stored grid, the reference is each parameter's main-effect share of the variance of
final val loss over all its configurations (exact on a full grid). Then,
for N complete trials, many draws of N: how often the subset's most important parameter is the
grid's, and the mean Spearman correlation of the two importance rankings. Two kinds of subset:
N configurations drawn at random (random search), and the first N complete trials of a TPE
search replayed on the grid (informed first trial, no pruning: trials concentrated where TPE
looks, as a study's are).

    python benchmarks/importance_reliability.py --draws 200   # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import rung_sweep  # noqa: E402
import search_cost as sc  # noqa: E402

from ranksearch.answer.importance import param_importances  # noqa: E402

SIZES = range(4, 21)
TPE_METHOD = ("tpe", "none", 0.2, 3, True)  # search_cost.replay: TPE, no pruning, informed
TPE_SEEDS = 60  # replayed TPE searches (each to 20 complete trials: the slow part)


def grid_trials(table: dict) -> dict[str, optuna.trial.FrozenTrial]:
    """Every configuration of the grid as a complete trial (its final val loss)."""
    configs = table["configs"]
    names = next(iter(configs.values()))["params"].keys()
    dists = {
        n: CategoricalDistribution(sorted({c["params"][n] for c in configs.values()}))
        for n in names
    }
    return {
        key: optuna.trial.create_trial(params=c["params"], distributions=dists, value=c["val_loss"])
        for key, c in configs.items()
    }


def main_effects(table: dict) -> dict[str, float]:
    """The grid's own answer: each parameter's share of the variance of final val loss explained
    by its main effect (on a full grid, the first-order functional ANOVA that fANOVA estimates),
    normalised to sum to 1, largest first."""
    configs = list(table["configs"].values())
    losses = [c["val_loss"] for c in configs]
    mean, total = statistics.mean(losses), statistics.pvariance(losses)
    shares = {}
    for name in configs[0]["params"]:
        groups: dict = {}
        for c in configs:
            groups.setdefault(c["params"][name], []).append(c["val_loss"])
        between = sum(len(g) * (statistics.mean(g) - mean) ** 2 for g in groups.values())
        shares[name] = between / len(losses) / total
    norm = sum(shares.values())
    return dict(sorted(((k, v / norm) for k, v in shares.items()), key=lambda kv: -kv[1]))


def agreement(found: dict[str, float] | None, ref: dict[str, float]) -> tuple[bool, float]:
    """(same top parameter, Spearman of the importances); a missing answer agrees in nothing."""
    if not found:
        return False, 0.0
    names = list(ref)
    rho = spearmanr([ref[n] for n in names], [found.get(n, 0.0) for n in names])[0]
    return max(found, key=found.get) == names[0], 0.0 if rho != rho else float(rho)


def ped_anova(trials: list) -> dict[str, float] | None:
    """What the report printed before: PED-ANOVA (the top 10 % against all trials)."""
    study = optuna.create_study()
    study.add_trials(trials)
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
        )
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None


def subset_main_effects(trials: list) -> dict[str, float]:
    """main_effects over the subset's trials alone."""
    configs = {str(i): {"params": t.params, "val_loss": t.value} for i, t in enumerate(trials)}
    return main_effects({"configs": configs})


# evaluator name -> (importances of some complete trials, sizes measured, share of the draws)
EVALUATORS = {
    "ped-anova": (ped_anova, SIZES, 1.0),
    "main-effects": (subset_main_effects, SIZES, 1.0),
    "fanova (shipped)": (param_importances, (5, 8, 10, 12, 16), 0.25),  # ~0.4 s a call
}


def measure(table: dict, draws: int) -> dict:
    trials = grid_trials(table)
    ref = main_effects(table)
    keys = sorted(trials)
    tpe_orders = []
    for seed in range(min(draws, TPE_SEEDS)):
        trace, _ = sc.replay(table, TPE_METHOD, seed, 10**9, float(max(SIZES)))
        tpe_orders.append([k for _, k in trace])
    rows = {}
    for name, (evaluate, sizes, share) in EVALUATORS.items():
        for n in (n for n in sizes if n < len(keys)):
            rng, k = random.Random(n), max(1, round(share * draws))
            subsets = {
                "random": [rng.sample(keys, n) for _ in range(k)],
                "tpe": [order[:n] for order in tpe_orders[:k] if len(order) >= n],
            }
            for kind, picks in subsets.items():
                found = [agreement(evaluate([trials[key] for key in p]), ref) for p in picks]
                rows[f"{name}|{kind}|{n}"] = {
                    "top_match": statistics.mean(top for top, _ in found),
                    "spearman": statistics.mean(rho for _, rho in found),
                    "draws": len(found),
                }
    every = list(trials.values())
    return {
        "reference": ref,
        "ped_anova_all": ped_anova(every),
        "fanova_all": param_importances(every),
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--draws", type=int, default=200, help="subsets per size")
    p.add_argument("--out", type=Path, default=HERE / "results/importance-reliability.json")
    a = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {}
    for grid, path in rung_sweep.GRIDS.items():
        result = out[grid] = measure(json.loads(path.read_text()), a.draws)
        print(f"{grid}: main effects {result['reference']}", flush=True)
        print(f"  PED-ANOVA on every configuration {result['ped_anova_all']}", flush=True)
        print(f"  fANOVA on every configuration {result['fanova_all']}", flush=True)
        for name, r in result["rows"].items():
            print(
                f"  {name:28s} top {100 * r['top_match']:5.1f}%  spearman {r['spearman']:+.2f}",
                flush=True,
            )
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
