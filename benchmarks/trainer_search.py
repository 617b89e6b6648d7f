"""The way users search today: `Trainer.hyperparameter_search(backend="optuna")` with the LoRA
space driven through `model_init`, on the grid's data and at its full budget. Used by
`search_cost.py trainer`; the pick is scored on the grid table (same configurations, same seed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from _run import target_val_loss  # benchmarks/ is on sys.path: the scripts run from it


def run_trainer_search(out: Path, data: Path, trials: int, quick: bool) -> dict:
    import optuna
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from ranksearch.config import space
    from ranksearch.config.schema import StudyConfig
    from ranksearch.data.prepare import model_location, prepare

    cfg = StudyConfig.model_validate(yaml.safe_load((out / "grid.yaml").read_text()))
    table = json.loads((out / "table.json").read_text())
    # the grid's tokenized splits (made again, identically, beside a stored table)
    prepared = prepare(cfg, out / "grid").path
    meta = json.loads((prepared / "meta.json").read_text())
    path = model_location(cfg.model.path)
    tok = AutoTokenizer.from_pretrained(path)

    def with_mask(ds):
        return ds.map(lambda b: {"attention_mask": [[1] * len(x) for x in b["input_ids"]]},
                      batched=True)  # fmt: skip

    train = with_mask(load_from_disk(str(prepared / "train")))
    val = with_mask(load_from_disk(str(prepared / "validation")))

    def hp_space(trial: optuna.Trial) -> dict:
        config = space.suggest(trial, cfg.search)  # the grid's space, as Optuna parameters
        return {"learning_rate": config.learning_rate}

    def model_init(trial):
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=meta["num_labels"]
        )
        model.config.pad_token_id = meta["pad_token_id"]
        if trial is None:  # Trainer builds one model before the search starts
            return model
        config = space.suggest(trial, cfg.search)
        return get_peft_model(model, LoraConfig(**space.lora_kwargs(config, cfg.task)))

    t = cfg.training
    args = TrainingArguments(
        output_dir=str(out / "trainer-search"),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=2 * t.batch_size,
        warmup_steps=int(t.warmup_ratio * t.max_steps),
        lr_scheduler_type=t.lr_scheduler,
        eval_strategy="steps",
        eval_steps=t.eval_every,  # the same evaluations as a ranksearch trial
        save_strategy="no",
        logging_steps=t.eval_every,
        report_to=[],
        use_cpu=True,
        seed=t.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model_init=model_init, args=args, train_dataset=train, eval_dataset=val,
                      data_collator=DataCollatorWithPadding(tok))  # fmt: skip
    db = out / "trainer-search.db"  # its study, kept to count what it spent
    db.unlink(missing_ok=True)
    started = time.time()
    best = trainer.hyperparameter_search(
        direction="minimize",
        backend="optuna",
        hp_space=hp_space,
        n_trials=trials,
        compute_objective=lambda metrics: metrics["eval_loss"],
        sampler=optuna.samplers.TPESampler(seed=0),
        storage=f"sqlite:///{db}",  # passed on to optuna.create_study, like the sampler
        study_name="trainer-search",
    )
    wall = time.time() - started
    # its pick (best.hyperparameters: every Optuna parameter of its best trial), on the grid
    fixed = optuna.trial.FixedTrial(best.hyperparameters)
    pick = space.config_key(space.suggest(fixed, cfg.search))
    row = table["configs"].get(pick, {})
    study = optuna.load_study(study_name="trainer-search", storage=f"sqlite:///{db}")
    cost, reached = spent(study, cfg, table)
    result = {
        "trials": trials,
        "cost": cost,
        "reached_at": reached,
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "repeated": trials - len({str(sorted(t.params.items())) for t in study.trials}),
        "wall_seconds": round(wall, 1),
        "seconds_per_trial": round(wall / trials, 1),
        "pick": pick,
        "val_loss": row.get("val_loss"),
        "test_accuracy": row.get("test_accuracy"),
        "its_eval_loss": best.objective,
    }
    (out / "trainer.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


def spent(study, cfg, table: dict) -> tuple[float, float | None]:
    """What Trainer's search spent, in full trials: a finished trial costs 1 (a repeated
    configuration is trained again), a pruned one its last reported step / max_steps (the study
    Trainer creates has Optuna's default MedianPruner, fed its evaluations). And the cost at
    which it first finished a configuration within the grid's target (None: never)."""
    import optuna

    from ranksearch.config import space

    target = target_val_loss(table)
    full, cost, reached = cfg.training.max_steps, 0.0, None
    for t in sorted(study.trials, key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.PRUNED:
            cost += max(t.intermediate_values, default=0) / full
            continue
        cost += 1.0
        key = space.config_key(space.suggest(optuna.trial.FixedTrial(t.params), cfg.search))
        row = table["configs"].get(key)
        if reached is None and row and row["val_loss"] <= target:
            reached = cost
    return cost, reached
