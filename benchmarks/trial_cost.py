"""What one trial costs: overhead beyond training, training and evaluation throughput.

1. Overhead: a ranksearch trial's wall time minus its training and evaluation time, split into
   launch + imports, data + model setup, and the rest, against the floor of a bare
   `python -c "import torch, transformers, peft"`.
2. Training throughput (samples/s) of the ranksearch worker vs a plain `transformers.Trainer`
   run: same model, LoRA configuration, tokenized data, batch size, steps and learning rate.
   Both ways of batching are measured on both sides: random batches (the default of both), and
   batches of similar lengths (`training.group_by_length: true`; Trainer's
   `train_sampling_strategy="group_by_length"`).
3. Evaluation throughput of the worker's evaluation (split sorted by length, batches padded to
   their longest) vs a naive one (the same split in random order, padded to max_length).

    python benchmarks/trial_cost.py --out bench/trial-cost              # about 2 minutes
    python benchmarks/trial_cost.py --out /tmp/t --study tiny.yaml --quick   # CI smoke (tiny model)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _run import run_study

LORA = {"rank": 8, "alpha": 16, "modules": ["query", "value"], "lr": 1e-3}


def import_floor(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, transformers, peft"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ranksearch_trial(out: Path, study: str, steps: int, grouped: bool = False) -> dict:
    """One trial of the study's model and data; its timings from the trial record."""
    import optuna

    study_dir = out / ("trial-group-by-length" if grouped else "trial")
    shutil.rmtree(study_dir, ignore_errors=True)
    sets = {
        "study_name": "trial-cost",
        "search.rank": str(LORA["rank"]),
        "search.alpha": str(LORA["alpha"]),
        "search.alpha_ratio": "null",
        "search.dropout": "0.0",
        "search.target_modules": "[query, value]",
        "search.learning_rate": str(LORA["lr"]),
        "training.max_steps": str(steps),
        "training.eval_every": str(steps // 2),
        "training.batch_size": "16",
        "pruner": "none",
        "sampler": "grid",
        "budget.n_trials": "1",
        "launch.device": "cpu",
        "tracking": "none",
        "enqueue": "[]",
        "training.group_by_length": str(grouped).lower(),
    }
    run_study(study, study_dir, sets)
    storage = f"sqlite:///{study_dir / 'optuna.db'}"
    (t,) = optuna.load_study(study_name="trial-cost", storage=storage).trials
    a = t.user_attrs
    records = [json.loads(x) for x in (study_dir / a["trial_dir"] / "reports.jsonl").open()]
    start = next(r for r in records if r.get("event") == "start")
    end = next(r for r in records if r.get("event") == "end")
    began = t.datetime_start.timestamp()
    launch = start["time"] - start["setup_seconds"] - began
    return {
        "wall_s": a["wall_seconds"],
        "train_s": end["train_seconds"],
        "eval_s": end["eval_seconds"],
        "launch_and_imports_s": launch,
        "data_and_model_setup_s": start["setup_seconds"],
        "after_training_s": a["wall_seconds"] - (end["time"] - began),
        "overhead_s": a["wall_seconds"] - end["train_seconds"] - end["eval_seconds"],
        "data_path": str(next((study_dir / "data").iterdir())),
        "steps": steps,
        "batch_size": 16,
    }


def _lora_model(model_path: str, num_labels: int, pad_id: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    model.config.pad_token_id = pad_id
    lora = LoraConfig(task_type="SEQ_CLS", r=LORA["rank"], lora_alpha=LORA["alpha"],
                      lora_dropout=0.0, target_modules=LORA["modules"])  # fmt: skip
    return get_peft_model(model, lora)


def trainer_throughput(
    model_path: str, data_path: Path, steps: int, out: Path, grouped: bool = False
) -> float:
    """Samples/s of a plain Trainer run on the same tokenized data and LoRA configuration."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    meta = json.loads((data_path / "meta.json").read_text())
    torch.manual_seed(0)
    model = _lora_model(model_path, meta["num_labels"], meta["pad_token_id"])
    train = load_from_disk(str(data_path / "train"))
    train = train.map(lambda b: {"attention_mask": [[1] * len(x) for x in b["input_ids"]]},
                      batched=True)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model_path)
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=LORA["lr"],
        warmup_steps=int(0.06 * steps),  # the worker: warmup_ratio 0.06 of max_steps
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=steps,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if grouped else "random",  # transformers 5
    )
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tok))  # fmt: skip
    metrics = trainer.train().metrics
    return metrics["train_samples_per_second"]


def eval_throughput(
    model_path: str, data_path: Path, max_length: int, batch_size: int = 32
) -> dict:
    """Examples/s: the worker's evaluation vs random order padded to max_length."""
    import torch
    from datasets import load_from_disk

    from ranksearch.worker.batches import pad_collate

    meta = json.loads((data_path / "meta.json").read_text())
    torch.manual_seed(0)
    model = _lora_model(model_path, meta["num_labels"], meta["pad_token_id"]).eval()
    val = load_from_disk(str(data_path / "validation"))  # stored sorted by length
    rows = [dict(r) for r in val]

    def timed(batches) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return len(rows) / (time.perf_counter() - t0)

    def naive_batches():
        import random

        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        for s in range(0, len(order), batch_size):
            part = [rows[i] for i in order[s : s + batch_size]]
            padded = [{**r, "input_ids": r["input_ids"] + [meta["pad_token_id"]]
                       * (max_length - len(r["input_ids"]))} for r in part]  # fmt: skip
            b = pad_collate(padded, meta["pad_token_id"], causal=False)
            b["attention_mask"] = torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (max_length - len(r["input_ids"])) for r in part]
            )
            yield b

    def sorted_batches():
        for s in range(0, len(rows), batch_size):
            yield pad_collate(rows[s : s + batch_size], meta["pad_token_id"], causal=False)

    timed(sorted_batches())  # warm-up
    ours = statistics.median(timed(sorted_batches()) for _ in range(3))
    naive = statistics.median(timed(naive_batches()) for _ in range(3))
    return {"examples": len(rows), "sorted_per_s": ours, "padded_per_s": naive,
            "speedup": ours / naive}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/trial-cost"))
    p.add_argument("--study", default="cls-task", help="a study name or file (default: cls-task)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from ranksearch.config.load import load_study
    from ranksearch.data.prepare import model_location

    cfg = load_study(a.study)[0]
    model = model_location(cfg.model.path)
    steps = 4 if a.quick else 60
    floor = import_floor(1 if a.quick else 3)
    trial = ranksearch_trial(a.out, a.study, steps)  # as shipped: random batches
    grouped = ranksearch_trial(a.out, a.study, steps, grouped=True)
    data = Path(trial["data_path"])
    ours = steps * trial["batch_size"] / trial["train_s"]
    ours_grouped = steps * grouped["batch_size"] / grouped["train_s"]
    theirs = trainer_throughput(model, data, steps, a.out)
    theirs_grouped = trainer_throughput(model, data, steps, a.out, grouped=True)
    evals = eval_throughput(model, data, max_length=cfg.data.max_length)
    result = {
        "import_floor_s": floor,
        "trial": trial,
        "overhead_beyond_floor_s": trial["overhead_s"] - floor,
        "train_samples_per_s": {
            "ranksearch": ours,  # the default: random batches
            "trainer": theirs,  # a plain Trainer: random batches
            "ratio": ours / theirs,
            "ranksearch_group_by_length": ours_grouped,
            "trainer_group_by_length": theirs_grouped,
            "ratio_group_by_length": ours_grouped / theirs_grouped,
            "ratio_grouped_vs_plain_trainer": ours_grouped / theirs,
        },
        "eval": evals,
    }
    (a.out / "trial_cost.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
