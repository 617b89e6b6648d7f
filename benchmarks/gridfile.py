"""Grid files: a grid of learning curves, one JSON line per configuration (docs/replay.md).

A grid trained anywhere (another model, another task, another tool) is replayed by
`benchmarks/replay.py` without retraining. `convert` writes the grids stored in
benchmarks/results (search_cost.py's table.json) in this format; `variant` filters a grid into a
space where the informed first trial's guess is wrong.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from ranksearch.config import space
from ranksearch.config.schema import StudyConfig

FORMAT = "ranksearch-grid/1"


@dataclass
class Grid:
    """A grid ready to replay: the study its space makes, and every row by configuration key."""

    name: str
    header: dict[str, Any]
    rows: dict[str, dict[str, Any]]  # config key -> row
    cfg: StudyConfig  # the space of the grid's parameters, its max_steps and eval_every
    best: str  # the key of the lowest final val loss
    target: float  # best + the seed noise: a search "reaches" a configuration at or below it

    @property
    def max_steps(self) -> int:
        return self.cfg.training.max_steps

    @property
    def has_per_example(self) -> bool:
        return all(r.get("val_losses") for r in self.rows.values())

    @property
    def has_test(self) -> bool:
        return all(r.get("test_score") is not None for r in self.rows.values())


def read_lines(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header (the first line, when it has `format`) and the configuration lines."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    header = lines.pop(0) if lines and "format" in lines[0] else {}
    if header.get("format", FORMAT) != FORMAT:
        raise ValueError(f"{path}: format {header['format']!r}; expected {FORMAT!r}")
    return header, lines


def write_lines(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"format": FORMAT, **header}, *rows]
    path.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))


def build(name: str, header: dict[str, Any], rows: list[dict[str, Any]]) -> Grid:
    """The grid's study (its space from the values its rows hold) and target."""
    steps = sorted({int(s) for r in rows for s in r["curve"]})
    max_steps = int(header.get("max_steps", steps[-1]))
    gaps = [b - a for a, b in zip([0, *steps], steps, strict=False)]
    names = sorted({k for r in rows for k in r["params"]})
    search: dict[str, Any] = {}
    for k in names:
        values = sorted({r["params"][k] for r in rows}, key=str if k == "target_modules" else None)
        search[k] = values if len(values) > 1 else values[0]
    if "alpha" not in search and "alpha_ratio" not in search:
        search["alpha_ratio"] = 2  # fixed where the rows do not say (the study default searches)
    modules = header.get("target_modules", {})
    sets = search["target_modules"] if isinstance(search["target_modules"], list) else [
        search["target_modules"]]  # fmt: skip
    search["target_modules"] = {
        m: modules.get(m, "all-linear" if m == "all-linear" else [m]) for m in sets
    }
    raw = {
        "study_name": "replay",
        "model": "grid",
        "data": {"source": "grid"},
        "search": search,
        "training": {"max_steps": max_steps, "eval_every": min(gaps)},
    }
    cfg = StudyConfig.model_validate(raw)
    by_key = {row_key(cfg, r["params"]): r for r in rows}
    best = min(by_key, key=lambda k: final(by_key[k], max_steps))
    target = final(by_key[best], max_steps) + noise(header, rows)
    return Grid(name, header, by_key, cfg, best, target)


def row_key(cfg: StudyConfig, params: dict[str, Any]) -> str:
    """The configuration key ranksearch gives these parameters (what a trial's suggest gives)."""
    dims = space.dimensions(cfg.search)
    fixed = {
        space.PARAM_NAMES[k]: v for k, v in params.items() if space.is_searched(dims.get(k, v))
    }
    return space.config_key(space.suggest(optuna.trial.FixedTrial(fixed), cfg.search))


def final(row: dict[str, Any], max_steps: int) -> float:
    return float(row["curve"][str(max_steps)])


def noise(header: dict[str, Any], rows: list[dict[str, Any]]) -> float:
    """The seed noise of a full-budget val loss: the header's `seed_std`, else the standard
    deviation over the seeds of the row with the most of them."""
    if header.get("seed_std") is not None:
        return float(header["seed_std"])
    seeded = max(rows, key=lambda r: len(r.get("seeds", {}).get("val_loss", [])))
    losses = seeded.get("seeds", {}).get("val_loss", [])
    if len(losses) < 2:
        raise ValueError(
            "the grid needs `seed_std` in its header, or a row with `seeds.val_loss` of 2 or "
            "more: the target is the best val loss + the seed noise"
        )
    return statistics.stdev(losses)


def score(row: dict[str, Any]) -> float | None:
    """A row's test score: its mean over seeds where it has 2 or more, else seed 0's."""
    seeds = [s for s in row.get("seeds", {}).get("test_score", []) if s is not None]
    return statistics.mean(seeds) if len(seeds) > 1 else row.get("test_score")


# -- the stored grids, converted -----------------------------------------------------------


def from_table(table: dict[str, Any], modules: dict[str, Any]) -> tuple[dict, list[dict]]:
    """A search_cost.py table.json as a grid file's header and rows."""
    header = {"max_steps": table["max_steps"], "seed_std": table["best_seeds"]["std"]}
    header.update(target_modules=modules, score="accuracy")
    rows = []
    for key, c in table["configs"].items():
        config = json.loads(key)
        params = {**c["params"], "alpha_ratio": config["lora_alpha"] / config["rank"]}
        params["dropout"] = config["lora_dropout"]
        row = {"params": params, "curve": c["curve"], "val_loss_se": c.get("val_loss_se")}
        row.update(test_score=c.get("test_accuracy"), trainable_params=c.get("trainable_params"))
        if c.get("val_losses"):
            row["val_losses"] = c["val_losses"]
        seeds = c.get("seeds", {})
        if len(seeds.get("val_loss", [])) > 1:
            row["seeds"] = {"val_loss": seeds["val_loss"], "test_score": seeds["test_accuracy"]}
        rows.append(row)
    return header, rows


# -- wrong-prior variants: a filter of the rows -----------------------------------------------


def _drop(rows: list[dict], keep) -> list[dict]:
    return [r for r in rows if keep(r["params"])]


def variant(name: str, header: dict, rows: list[dict]) -> list[dict]:
    """The rows of a variant of the grid:
    - `all`: the grid as it is;
    - `no-all-linear`: the informed trial's module set removed (a user who leaves the MLP
      unadapted): its guess falls back on the largest module set left;
    - `low-lr`: the highest learning rate removed, so the log-middle of the range left is a
      poor learning rate for 100 steps;
    - `no-r8-r16`: ranks 8 and 16 removed: no guided rank in the space, so no informed trial."""
    if name == "all":
        return rows
    if name == "no-all-linear":
        return _drop(rows, lambda p: p["target_modules"] != "all-linear")
    if name == "low-lr":
        top = max(r["params"]["learning_rate"] for r in rows)
        return _drop(rows, lambda p: p["learning_rate"] != top)
    if name == "no-r8-r16":
        return _drop(rows, lambda p: p["rank"] not in (8, 16))
    raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")


VARIANTS = ("all", "no-all-linear", "low-lr", "no-r8-r16")


def load(path: Path, variant_name: str = "all") -> Grid:
    header, rows = read_lines(path)
    name = path.stem if variant_name == "all" else f"{path.stem} {variant_name}"
    return build(name, header, variant(variant_name, header, rows))
