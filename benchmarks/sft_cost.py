"""Supervised fine-tuning, side by side: ranksearch's worker against TRL's SFTTrainer.

Both train the same model on the same examples (the ids and answer-only labels ranksearch
prepares, which equal TRL's own masks: tests/data/test_sft.py), with the same LoRA configuration,
batch size, steps, learning rate, schedule, clipping and seed, each with and without packing:
ranksearch's `training.packing: true` and TRL's `padding_free=True` both put a batch's examples
in one row with position ids restarting per example, so a step sees the same examples.

For each of the four runs: training tokens per second (real tokens, the padding not counted;
the steps x batch examples at the split's mean length) and the validation loss per answer
token after the steps, measured by one evaluation for all (the worker's).

With `--startup STUDY_DIR` (a finished study, e.g. runs/sft-smollm2) it reports instead, for
each pruned trial, the share of its wall time spent before its first optimizer step: process
start, imports, data and model loading.

    python benchmarks/sft_cost.py --out bench/sft-cost                  # sft-smollm2, ~10 min
    python benchmarks/sft_cost.py --out bench/sft-cost --startup runs/sft-smollm2
    python benchmarks/sft_cost.py --out /tmp/s --study tiny.yaml --quick   # CI smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _run import run_study

from ranksearch.worker import TrialSpec

LORA = {"rank": 8, "alpha": 16, "modules": ["q_proj", "v_proj"], "lr": 5e-4}


def worker_run(out: Path, study: str, steps: int, packing: bool) -> dict:
    """One ranksearch trial of the fixed configuration; timings and loss from its reports."""
    study_dir = out / f"ranksearch-{'packed' if packing else 'padded'}"  # a scratch folder
    shutil.rmtree(study_dir, ignore_errors=True)
    run_study(
        study,
        study_dir,
        {
            "study_name": "sft-cost",
            "search.rank": str(LORA["rank"]),
            "search.alpha": str(LORA["alpha"]),
            "search.alpha_ratio": "null",
            "search.dropout": "0.0",
            "search.target_modules": json.dumps(LORA["modules"]),
            "search.learning_rate": str(LORA["lr"]),
            "training.max_steps": str(steps),
            "training.eval_every": str(steps),
            "training.packing": str(packing).lower(),
            "pruner": "none",
            "budget.n_trials": "1",
            "enqueue": "[]",
            "tracking": "none",
        },
    )
    reports = [json.loads(line) for line in (study_dir / "trials/0/reports.jsonl").open()]
    last = [r for r in reports if "val_loss" in r][-1]
    return {"train_seconds": last["train_seconds"], "val_loss": last["val_loss"]}, study_dir


def trl_run(prepared: Path, model_path: str, spec: TrialSpec, steps: int, packing: bool) -> dict:
    """TRL's SFTTrainer on the same prepared split; evaluated by the worker's evaluation."""
    import torch
    from accelerate import Accelerator
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ranksearch.worker.batches import get_dataloaders
    from ranksearch.worker.train import evaluate

    train = spec.training
    torch.manual_seed(train["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(prepared.parent / "trl-out"),
        max_steps=steps,
        per_device_train_batch_size=train["batch_size"],
        learning_rate=LORA["lr"],
        lr_scheduler_type=train["lr_scheduler"],
        warmup_steps=int(train["warmup_ratio"] * steps),
        weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"],
        seed=train["seed"],
        padding_free=packing,
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_drop_last=True,
        max_length=None,  # the prepared examples are truncated already
    )
    lora = LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
        target_modules=LORA["modules"], task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=load_from_disk(str(prepared / "train")),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=lora,
    )
    result = trainer.train()
    _, eval_dl = get_dataloaders(spec, train["seed"])
    metrics = evaluate(trainer.model, eval_dl, Accelerator(cpu=True), spec)
    return {"train_seconds": result.metrics["train_runtime"], "val_loss": metrics["val_loss"]}


def startup_share(study_dir: Path) -> dict:
    """Per pruned trial: seconds from its start to its first step, and that share of its wall.

    The first report (after `eval_every` steps) carries the training and evaluation seconds
    spent so far; what precedes them is the start-up."""
    import optuna

    name = next(
        s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{study_dir / 'optuna.db'}")
    )
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'optuna.db'}")
    rows = []
    for t in study.get_trials(states=[optuna.trial.TrialState.PRUNED]):
        path = study_dir / "trials" / str(t.number) / "reports.jsonl"
        if not path.is_file():  # answered from a stored twin, never trained
            continue
        first = next(r for r in map(json.loads, path.open()) if "step" in r and "val_loss" in r)
        before = first["time"] - first["train_seconds"] - first["eval_seconds"]
        startup = before - t.datetime_start.timestamp()
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append({"trial": t.number, "startup_seconds": startup, "wall_seconds": wall,
                     "share": startup / wall, "pruned_at_step": t.last_step})  # fmt: skip
    return {"study": name, "pruned_trials": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--study", default="sft-smollm2", help="a causal-lm study (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=20, help="optimizer steps per run (%(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="4 steps, packed only: a smoke test")
    parser.add_argument("--startup", type=Path, help="a finished study dir: start-up share")
    args = parser.parse_args()
    steps = 4 if args.quick else args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sft-cost-"))  # studies and TRL output: not kept
    if args.startup:
        result = startup_share(args.startup)
        (args.out / "startup.json").write_text(json.dumps(result, indent=2))
        for r in result["pruned_trials"]:
            seconds = f"{r['startup_seconds']:.1f} s of {r['wall_seconds']:.1f} s"
            step = r["pruned_at_step"]
            print(f"trial {r['trial']:>3} pruned at {step}: {seconds} ({r['share']:.0%})")
        return

    rows = {}
    for packing in (True,) if args.quick else (False, True):  # the smoke: the packed path
        tic = time.perf_counter()
        ours, study_dir = worker_run(scratch, args.study, steps, packing)
        spec = TrialSpec.read(study_dir / "trials/0/spec.json")  # its paths made absolute
        prepared = Path(spec.data.path)
        theirs = trl_run(prepared, spec.model.path, spec, steps, packing)
        mean_len = _mean_length(prepared / "train")
        tokens = steps * spec.training["batch_size"] * mean_len
        for side, r in (("ranksearch", ours), ("TRL SFTTrainer", theirs)):
            name = f"{side}, {'packed' if packing else 'padded'}"
            rows[name] = {**r, "tokens_per_second": tokens / r["train_seconds"]}
        print(f"packing={packing}: {time.perf_counter() - tic:.0f} s", flush=True)

    shutil.rmtree(scratch, ignore_errors=True)
    result = {"study": args.study, "steps": steps, "lora": LORA, "runs": rows}
    (args.out / "sft_cost.json").write_text(json.dumps(result, indent=2))
    print(f"{'run':<28} {'tokens/s':>9} {'train s':>8} {'val loss':>9}")
    for name, r in rows.items():
        print(
            f"{name:<28} {r['tokens_per_second']:>9.0f} {r['train_seconds']:>8.1f} "
            f"{r['val_loss']:>9.4f}"
        )


def _mean_length(split: Path) -> float:
    from datasets import load_from_disk

    lengths = [len(x) for x in load_from_disk(str(split))["input_ids"]]
    return sum(lengths) / len(lengths)


if __name__ == "__main__":
    main()
