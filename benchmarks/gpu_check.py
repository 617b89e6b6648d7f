"""The LLM path on a GPU: what `sft-smollm2` costs there, packed 1 and 4 trials per GPU, the
memory estimate against the CUDA peak, and a QLoRA 4-bit trial when bitsandbytes is there.

Run by `benchmarks/gpu_check.sh run` on a lent GPU machine (no network there). SmolLM2's GGUF
file (98 MB) is larger than what may travel, so the model is SmolLM2-135M's architecture (its
config and tokenizer, carried) with random weights: the same shapes, so the same compute and
memory; the losses mean nothing. Everything it saw goes to one JSON file.

    python benchmarks/gpu_check.py --out $OUT --config .gpu/smollm2     # on the GPU, minutes
    python benchmarks/gpu_check.py --out /tmp/g --model DIR --quick     # CPU smoke (tiny model)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna


def build_model(config_dir: Path, out: Path) -> Path:
    """SmolLM2's architecture with random weights, saved where trials load it from."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ranksearch.cli", *args], capture_output=True, text=True
    )


def study_run(out: Path, model: Path, sets: dict[str, str]) -> dict:
    """One `ranksearch run` of sft-smollm2 on `model`; wall time and what its trials saw."""
    sets = {"model": str(model), "tracking": "none", **sets}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    tic = time.perf_counter()
    r = cli("run", "--study", "sft-smollm2", "--out", str(out), "--quiet", *args)
    wall = time.perf_counter() - tic
    if r.returncode != 0:
        return {"error": (r.stdout + r.stderr)[-2000:], "wall_seconds": wall}
    study = optuna.load_study(study_name="sft-smollm2", storage=f"sqlite:///{out / 'optuna.db'}")
    trials = [t for t in study.trials if "train_seconds" in t.user_attrs]
    batch = int(sets.get("training.batch_size", 0)) or None
    samples = sum(t.user_attrs.get("last_step", 0) for t in trials) * (batch or 1)
    busy = sum(t.user_attrs["train_seconds"] for t in trials)
    return {
        "wall_seconds": wall,
        "trials": len(study.trials),
        "states": dict(Counter(t.state.name for t in study.trials)),
        "samples_per_second_per_trial": samples / busy if busy and batch else None,
        "study_samples_per_second": samples / wall if batch else None,
        "peak_memory_mb": max((t.user_attrs.get("peak_memory_mb", 0) for t in trials), default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="SmolLM2's config and tokenizer (carried)")
    parser.add_argument("--model", type=Path, help="a model folder to use as it is")
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = parser.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    seen: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
    }
    model = args.model or build_model(args.config, args.out / "smollm2-random")
    steps, trials, batch = ("4", "2", "4") if args.quick else ("60", "8", "16")
    common = {
        "training.max_steps": steps, "training.eval_every": str(int(steps) // 2),
        "pruner.min_steps": str(int(steps) // 2), "training.batch_size": batch,
        "budget.n_trials": trials, "data.max_eval_samples": "256" if cuda else "16",
        "training.mixed_precision": "bf16" if cuda else "auto",
    }  # fmt: skip
    if not cuda:
        common["data.max_train_samples"] = "256"
    sets = [x for k, v in {**common, "model": str(model)}.items() for x in ("--set", f"{k}={v}")]
    r = cli("estimate", "--study", "sft-smollm2", "--measure", "--format", "json", *sets)
    seen["estimate"] = json.loads(r.stdout)["measured"] if r.returncode == 0 else r.stderr[-2000:]
    for per_gpu in (1,) if args.quick else (1, 4):  # the smoke runs on a CPU: no GPU to share
        sets = {**common, "launch.trials_per_gpu": str(per_gpu)}
        seen[f"trials_per_gpu_{per_gpu}"] = study_run(args.out / f"per-gpu-{per_gpu}", model, sets)
        print(per_gpu, seen[f"trials_per_gpu_{per_gpu}"], flush=True)
    try:
        import bitsandbytes  # noqa: F401

        qlora = {
            **common,
            "model": f"{{path: {model}, quantization: 4bit}}",
            "budget.n_trials": "1",
        }
        seen["qlora_4bit"] = study_run(args.out / "qlora", model, qlora)
    except ImportError:
        seen["qlora_4bit"] = "bitsandbytes is not installed here"
    (args.out / "gpu_check.json").write_text(json.dumps(seen, indent=2, default=str))
    print(json.dumps(seen, indent=2, default=str))


if __name__ == "__main__":
    main()
