"""One real `ranksearch run` beside its replay (BENCHMARKS.md, "One real run against the replay").

  study    the study file of a real run: a grid file's space (optionally a wrong-prior variant,
           docs/replay.md), trained as the grid was (search_cost.py's data and training), with the
           shipped sampler and pruner and the replay's study name for the seed (Hyperband's
           brackets hash it), so that `replay.py` replays the same search.
  compare  the run's trials against `replay.py`'s replay of the same seed: configurations in
           order, where each was pruned, its reported val losses against the grid's curves,
           the cost in full trials and the pick; and where the run's cost and pick sit in the
           replay's distribution over seeds at the same number of trials.

    python benchmarks/real_run.py study /work/bench/grids/sst2-random.jsonl \\
        --variant no-all-linear --out real.yaml
    ranksearch run --study real.yaml --out /work/bench/real/out --plain
    python benchmarks/real_run.py compare /work/bench/grids/sst2-random.jsonl \\
        --variant no-all-linear --study real.yaml --run /work/bench/real/out --json result.json

The space is the grid study's own (gridfile.build), module sets in its order: a categorical's
choice order is part of what TPE draws, so a study that lists them otherwise is another search
at the same seed. Only the study's keys taken from the grid differ from `search_cost.study`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gridfile  # noqa: E402
import replay  # noqa: E402
import search_cost as sc  # noqa: E402

from ranksearch.config import space  # noqa: E402
from ranksearch.config.schema import StudyConfig  # noqa: E402
from ranksearch.search import budget  # noqa: E402
from ranksearch.search.repeats import MAX_REPEATS_IN_A_ROW  # noqa: E402
from ranksearch.search.storage import default_storage_url  # noqa: E402


def study_file(
    grid: gridfile.Grid, data: str, seed: int, n_trials: int, parallel: int, grouped: bool
) -> dict:
    """search_cost.study's data and training, the grid's space, the shipped sampler and pruner
    (the schema's defaults, written out), the replay's study name, `n_trials` trials."""
    raw = sc.study(Path(data), quick=False, grouped=grouped)
    raw["data"]["source"] = f"{data.rstrip('/')}/train.tsv"  # as given: relative to the cwd
    searched = grid.cfg.search
    for key in ("rank", "learning_rate", "alpha_ratio", "dropout"):
        mine = raw["search"][key]
        if mine != getattr(searched, key):
            raise SystemExit(f"search.{key}: the grid holds {getattr(searched, key)}, not {mine}")
    raw["search"]["target_modules"] = dict(searched.target_modules)  # the grid's, in its order
    shipped = StudyConfig.model_validate({"study_name": "x", "model": "m", "data": {"source": "d"}})
    method = replay.shipped()
    if (method.sampler, method.pruner) != (shipped.sampler.type, shipped.pruner.type):
        raise SystemExit("replay.shipped() is not the schema's defaults")
    raw.update(
        study_name=f"replay-{seed}",  # replay.study_for's name for this seed
        pruner={"type": shipped.pruner.type, "reduction_factor": shipped.pruner.reduction_factor},
        sampler={**shipped.sampler.model_dump(), "seed": seed},
        budget={"n_trials": n_trials},
        launch={"device": "cpu", "parallel_trials": parallel},
        tracking="none",
        report={"tolerance": "1se"},
    )
    return raw


def real_trials(run_dir: Path, study_name: str) -> list:
    storage = optuna.storages.RDBStorage(default_storage_url(run_dir))
    s = optuna.load_study(study_name=study_name, storage=storage)
    return sorted(s.get_trials(deepcopy=False), key=lambda t: t.number)


def describe(trials: list, max_steps: int, with_config: bool = True) -> list[dict]:
    """Each trial as real-run-sst2-seed0.json lists them."""
    out, spent = [], 0.0
    for t in trials:
        spent += budget.trial_steps(t) / max_steps
        last = max(t.intermediate_values, default=None)
        row = {
            "number": t.number,
            "state": t.state.name,
            "steps": last,
            "value": t.value if t.value is not None else t.intermediate_values.get(last),
            "last_val_loss": t.intermediate_values.get(last),
            "duplicate_of": t.user_attrs.get("duplicate_of"),
            "cost_so_far": round(spent, 4),
        }
        if with_config:
            row["config"] = space.shown_config(t)
        out.append(row)
    return out


def short(key: str) -> str:
    c = json.loads(key)
    return f"r{c['rank']} {c['target_modules']} {c['learning_rate']:g}"


def trial_key(grid: gridfile.Grid, t) -> str:
    return space.config_key(space.suggest(optuna.trial.FixedTrial(t.params), grid.cfg.search))


def pick(trials: list) -> tuple[str | None, float | None]:
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(done, key=lambda t: t.value, default=None)
    return (best.user_attrs["config_key"], best.value) if best else (None, None)


def until_trainings(trials: list, n: int) -> list:
    """The trials `run` holds when it stops at `budget.n_trials` = n: repeated proposals
    (`duplicate_of`) use no trial of the budget (ranksearch/search/repeats.py), so it runs
    until n trainings finished, or MAX_REPEATS_IN_A_ROW repeats in a row end it."""
    trained, in_a_row = 0, 0
    for i, t in enumerate(trials):
        repeat = "duplicate_of" in t.user_attrs
        trained, in_a_row = trained + (not repeat), in_a_row + 1 if repeat else 0
        if trained >= n or in_a_row >= MAX_REPEATS_IN_A_ROW:
            return trials[: i + 1]
    return trials


def replayed(grid: gridfile.Grid, seed: int, n: int) -> list:
    """The replay of the shipped defaults at `seed`, cut where `run` with n_trials n stops (n
    trainings cost at most n full trials: the replay runs past that, then is cut)."""
    return until_trainings(replay.replay(grid, replay.shipped(), seed, max_cost=n + 1), n)


def compare(grid: gridfile.Grid, cfg: dict, run_dir: Path, repeats: int) -> dict:
    seed, n = cfg["sampler"]["seed"], cfg["budget"]["n_trials"]
    full = grid.max_steps
    real = real_trials(run_dir, cfg["study_name"])
    rep = replayed(grid, seed, n)
    rows = []
    worst = 0.0
    for i in range(max(len(real), len(rep))):
        r = real[i] if i < len(real) else None
        p = rep[i] if i < len(rep) else None
        key = trial_key(grid, r) if r is not None else None
        row = {
            "number": i,
            "real": None if r is None else {
                "config": short(key), "state": r.state.name,
                "steps": max(r.intermediate_values, default=None),
                "duplicate_of": r.user_attrs.get("duplicate_of"),
            },
            "replay": None if p is None else {
                "config": short(p.user_attrs["config_key"]), "state": p.state.name,
                "steps": max(p.intermediate_values, default=None),
                "duplicate_of": p.user_attrs.get("duplicate_of"),
            },
        }  # fmt: skip
        row["same"] = row["real"] == row["replay"]
        if r is not None and "duplicate_of" not in r.user_attrs:  # trained here: its curve
            curve = grid.rows[key]["curve"]
            reported = sorted(r.intermediate_values.items())
            diffs = {s: v - curve[str(s)] for s, v in reported}
            row["val_loss"] = {str(s): v for s, v in reported}
            row["grid_val_loss"] = {str(s): curve[str(s)] for s, _ in reported}
            row["val_loss_minus_grid"] = {str(s): d for s, d in diffs.items()}
            worst = max(worst, *(abs(d) for d in diffs.values()))
        rows.append(row)
    real_cost = budget.full_trials_spent(real, full)
    rep_cost = budget.full_trials_spent(rep, full)
    costs, picks, n_trials = [], [], []
    for s in range(repeats):
        trials = replayed(grid, s, n)
        n_trials.append(len(trials))
        costs.append(budget.full_trials_spent(trials, full))
        picks.append(pick(trials)[1])
    real_pick, rep_pick = pick(real), pick(rep)
    valid = [p for p in picks if p is not None]
    real_on_grid = None
    if real_pick[0] is not None:
        real_on_grid = gridfile.final(grid.rows[real_pick[0]], full)

    def dist(xs: list[float]) -> dict:
        return {
            "min": min(xs), "p10": replay.quantile(xs, 0.1), "median": statistics.median(xs),
            "p90": replay.quantile(xs, 0.9), "max": max(xs), "mean": statistics.mean(xs),
        }  # fmt: skip

    return {
        "grid": grid.name,
        "seed": seed,
        "n_trials": n,  # trainings: repeats use none of the budget
        "trials_real": len(real),
        "trials_replay": len(rep),
        "same_trials": all(r["same"] for r in rows),
        "max_abs_val_loss_minus_grid": worst,
        "real": {
            "full_trials": real_cost,
            "pick": short(real_pick[0]) if real_pick[0] else None,
            "pick_val_loss": real_pick[1],
        },
        "replay": {
            "full_trials": rep_cost,
            "pick": short(rep_pick[0]) if rep_pick[0] else None,
            "pick_val_loss": rep_pick[1],
        },
        f"replay_{repeats}_seeds": {
            "full_trials": dist(costs),
            "trials_with_repeats": dist(n_trials),
            "full_trials_at_or_below_real": sum(c <= real_cost + 1e-9 for c in costs) / repeats,
            "full_trials_below_real": sum(c < real_cost - 1e-9 for c in costs) / repeats,
            "pick_val_loss": dist(valid),
            # the real pick by its grid value: the run's own differs in the 7th decimal
            "pick_at_or_below_real": sum(p <= real_on_grid + 1e-9 for p in valid) / repeats
            if real_on_grid is not None
            else None,
            "pick_within_target": sum(p <= grid.target + 1e-12 for p in valid) / repeats,
            "grid_best": short(grid.best),
            "grid_best_val_loss": gridfile.final(grid.rows[grid.best], full),
            "target": grid.target,
        },
        "trials": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("study", help="the study file of a real run of a grid's space")
    st.add_argument("grid", type=Path)
    st.add_argument("--variant", choices=gridfile.VARIANTS, default="all")
    st.add_argument("--data", default="../shared/data/sst2", help="relative to where run runs")
    st.add_argument("--grouped", action="store_true", help="the grid trained length-grouped")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--n-trials", type=int, default=10)
    st.add_argument("--parallel", type=int, default=1)
    st.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="a finished real run against the replay of its seed")
    c.add_argument("grid", type=Path)
    c.add_argument("--variant", choices=gridfile.VARIANTS, default="all")
    c.add_argument("--study", type=Path, required=True, help="the real run's study file")
    c.add_argument("--run", type=Path, required=True, help="the real run's --out")
    c.add_argument("--repeats", type=int, default=300)
    c.add_argument("--json", type=Path, help="the run's trials, as real-run-sst2-seed0.json "
                   "lists them, and the comparison (`against_replay`)")  # fmt: skip
    c.add_argument("--wall", type=float, help="the run's wall seconds")
    c.add_argument("--command-line", default="", help="the run's command, as run")
    c.add_argument("--date", default="")
    a = p.parse_args()
    grid = gridfile.load(a.grid, a.variant)
    if a.command == "study":
        raw = study_file(grid, a.data, a.seed, a.n_trials, a.parallel, a.grouped)
        a.out.write_text(yaml.safe_dump(raw, sort_keys=False))
        print(f"{grid.name}: {len(grid.rows)} configurations -> {a.out}")
        return
    cfg = yaml.safe_load(a.study.read_text())
    result = compare(grid, cfg, a.run, a.repeats)
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}, indent=1))
    for r in result["trials"]:
        print(r["number"], "same" if r["same"] else "DIFFERENT", r["real"], r["replay"])
    if a.json:
        real = real_trials(a.run, cfg["study_name"])
        out = {
            "command": a.command_line,
            "date": a.date,
            "wall_seconds": a.wall,
            "full_trials_spent": round(budget.full_trials_spent(real, grid.max_steps), 4),
            "trials": describe(real, grid.max_steps),
            "against_replay": result,
        }
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
