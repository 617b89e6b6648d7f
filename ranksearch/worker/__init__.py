"""One LoRA fine-tune, as a plain accelerate script: train, evaluate every `eval_every` steps,
report each evaluation.

ranksearch starts it for every trial, and it can be run by hand on a trial's spec:

    accelerate launch --num_processes 1 -m ranksearch.worker runs/cls-task/trials/3/spec.json
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no -m ranksearch.worker spec.json   # 2 CPU ranks

Reports go to the JSON-lines file named in the spec (`reports`), one line per evaluation, written
by the main process only; stdout and stderr are left to the libraries and end in the trial log.
This module imports neither Optuna nor MLflow: the orchestrator owns those. It is the home of
`TrialSpec`, the spec.json contract that the orchestrator writes and export reads too.

`--serve` makes it a warm worker (see `serve`): one process that trains trial after trial on a
base model it loads once, each trial as a cold start would train it.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import resource
import signal
import sys
import time
import traceback
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

SPEC_VERSION = 1  # the spec.json layout: a reader refuses any other (bump it with the layout)
_RERUN = "written by another ranksearch version (or edited by hand); rerun the trial with this one"


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The base model, as the study names it."""

    path: str  # a local directory or a hub id, as `from_pretrained` takes it
    quantization: str  # none or 4bit
    trust_remote_code: bool


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """The prepared data, and what the model needs to know of it."""

    path: str  # the prepared data (data.prepare): train/ and validation/ splits, meta.json
    num_labels: int
    pad_token_id: int
    format: str = "text"  # causal-lm: text, prompt-completion or messages (absent before SFT)


@dataclass(frozen=True, kw_only=True)
class TrialSpec:
    """A trial's spec.json: what the orchestrator writes, the worker trains and export reads.

    Its paths (`reports`, `adapter_dir`, `data.path`) are written relative to the spec's folder
    and `read` makes them absolute, so a copied or moved study directory still runs. `lora` is
    LoraConfig's keyword arguments; `training` the study's `training:` settings with the
    trial's learning rate and seed, a dict so that a new setting needs no change here.
    """

    version: int = SPEC_VERSION
    study: str | None = None
    trial: int | None = None
    task: str  # sequence-classification or causal-lm
    model: ModelSpec
    data: DataSpec
    lora: dict[str, Any]
    training: dict[str, Any]
    reports: str  # the JSON-lines report channel
    orchestrator_pid: int | None = None  # the worker stops when it is gone; None: run by hand
    adapter_dir: str | None = None  # where the trained adapter is saved; None: not saved

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def write(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def read(cls, path: Path) -> TrialSpec:
        """The spec at `path`, checked, with its paths made absolute against its folder. One
        written before specs had a version reads as version 1; any other version, or a key
        missing or unknown, is a ValueError that names the file and the key."""
        raw = json.loads(Path(path).read_text())
        if isinstance(raw, dict) and raw.get("version", 1) != SPEC_VERSION:  # before its keys
            raise ValueError(
                f"{path}: spec key 'version' is {raw['version']!r}, this ranksearch reads "
                f"version {SPEC_VERSION}: {_RERUN}"
            )
        _check_keys(cls, raw, "", path)
        _check_keys(ModelSpec, raw["model"], "model.", path)
        _check_keys(DataSpec, raw["data"], "data.", path)
        base = Path(path).parent.absolute()
        paths = {key: str(base / raw[key]) for key in ("reports", "adapter_dir") if raw.get(key)}
        data = DataSpec(**{**raw["data"], "path": str(base / raw["data"]["path"])})
        return cls(**{**raw, **paths, "model": ModelSpec(**raw["model"]), "data": data})


def _check_keys(cls: type, raw: Any, prefix: str, path: Path) -> None:
    """`raw` has every key of `cls` without a default, and no other."""
    if not isinstance(raw, dict):
        name = f"spec key {prefix[:-1]!r}" if prefix else "the spec"
        raise ValueError(f"{path}: {name} is not a JSON object: {_RERUN}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ValueError(f"{path}: unknown spec key {prefix + key!r}: {_RERUN}")
    for name, f in known.items():
        if name not in raw and f.default is MISSING:
            raise ValueError(f"{path}: spec key {prefix + name!r} is missing: {_RERUN}")


class Reporter:
    """Appends one JSON object per line to the report channel and flushes it at once."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives for the run

    def emit(self, **record: Any) -> None:
        self._file.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullReporter:
    """What ranks other than the main process report to: nothing."""

    def emit(self, **record: Any) -> None:
        pass

    def close(self) -> None:
        pass


def pad_collate(features: list[dict], pad_id: int, causal: bool) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (not to max_length): far less wasted compute.

    Causal LM: per-token labels as prepared (-100 where the loss skips), else every real token.
    """
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    if not causal:
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([f["labels"] for f in features])}  # fmt: skip
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    for i, f in enumerate(features):
        labels[i, : len(f["input_ids"])] = torch.tensor(f.get("labels", f["input_ids"]))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Examples (by index) placed into rows of at most `capacity` tokens, first fit in
    decreasing length; None puts the whole batch in one row."""
    if capacity is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([])
            room.append(capacity)
            fit = len(rows) - 1
        rows[fit].append(i)
        room[fit] -= lengths[i]
    return rows


def packed_collate(features: list[dict], pad_id: int, capacity: int | None) -> dict:
    """A causal-LM batch with several examples per row and no attention mask.

    Position ids restart at 0 for every example, which transformers reads as packed sequences
    and turns into a block-diagonal causal mask, so no token attends across examples. The first
    token of each example is never a target (nothing of its own precedes it), as when unpacked:
    the loss is the same as `pad_collate`'s on the same examples.
    """
    rows = pack_rows([len(f["input_ids"]) for f in features], capacity)
    width = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            f = features[i]
            n = len(f["input_ids"])
            ids[r, at : at + n] = torch.tensor(f["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(f.get("labels", f["input_ids"])[1:])
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding: one more sequence, no targets
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


class TokenizedSplit(torch.utils.data.Dataset):
    """A prepared split held as plain rows: what `datasets.load_from_disk` gives the loader,
    without importing `datasets` (and pandas) in every trial, about 2 s of its start-up."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {name: values[i] for name, values in self.columns.items()}


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """A random order in which each batch holds sequences of similar length.

    Every epoch: a random permutation, cut into mega-batches of `mega` batches; each mega-batch
    is sorted by length, cut into batches, and those batches are shuffled. Padding to the
    longest in a batch then wastes almost nothing, while the data still mixes across the epoch.
    Every rank draws the same order from the same seed; accelerate deals the batches out.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, generator: torch.Generator, mega: int = 50
    ):
        self.lengths = lengths
        self.batch_size = batch_size
        self.generator = generator
        self.mega = mega

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        size = self.batch_size * self.mega
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: -self.lengths[i])
            batches = [
                chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size)
            ]
            full = [b for b in batches if len(b) == self.batch_size]
            # a short batch (the epoch's last) stays last, where the loader's drop_last finds it
            for k in torch.randperm(len(full), generator=self.generator).tolist():
                yield from full[k]
            yield from (i for b in batches if len(b) < self.batch_size for i in b)


def read_split(path: Path) -> TokenizedSplit | Any:
    """A split written by `Dataset.save_to_disk` (data.prepare): its Arrow stream files, read
    with pyarrow. Any other layout goes through `datasets.load_from_disk`."""
    try:
        files = json.loads((path / "state.json").read_text())["_data_files"]
        import pyarrow as pa

        tables = [pa.ipc.open_stream(pa.memory_map(str(path / f["filename"]))).read_all()
                  for f in files]  # fmt: skip
        table = pa.concat_tables(tables)
    except (OSError, KeyError, ValueError):
        from datasets import load_from_disk

        return load_from_disk(str(path))
    return TokenizedSplit({name: table.column(name).to_pylist() for name in table.column_names})


def get_dataloaders(spec: TrialSpec, seed: int) -> tuple[DataLoader, DataLoader]:
    data, train = spec.data, spec.training
    collate = functools.partial(
        pad_collate, pad_id=data.pad_token_id, causal=spec.task == "causal-lm"
    )
    train_collate = collate
    if train.get("packing"):
        train_collate = functools.partial(
            packed_collate, pad_id=data.pad_token_id, capacity=train.get("packing_length")
        )
    train_ds = read_split(Path(data.path) / "train")
    # The validation split is stored sorted by length, so evaluation batches are nearly unpadded.
    eval_ds = read_split(Path(data.path) / "validation")
    generator = torch.Generator().manual_seed(seed)
    order: dict[str, Any] = {"shuffle": True, "generator": generator}
    if train.get("group_by_length"):
        lengths = [len(row["input_ids"]) for row in train_ds]
        order = {"sampler": LengthGroupedSampler(lengths, train["batch_size"], generator)}
    train_dl = DataLoader(
        train_ds,
        batch_size=train["batch_size"],
        collate_fn=train_collate,
        drop_last=len(train_ds) > train["batch_size"],
        **order,
    )
    eval_bs = train.get("eval_batch_size") or 2 * train["batch_size"]
    eval_dl = DataLoader(eval_ds, batch_size=eval_bs, shuffle=False, collate_fn=collate)
    return train_dl, eval_dl


def load_base(spec: TrialSpec, accelerator: Accelerator) -> torch.nn.Module:
    """The base model as the trial needs it (head, quantization, checkpointing), without LoRA."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_spec, train = spec.model, spec.training
    kwargs: dict[str, Any] = {"trust_remote_code": model_spec.trust_remote_code}
    if model_spec.quantization == "4bit":
        from transformers import BitsAndBytesConfig

        # QLoRA: frozen base in 4-bit NF4 with double quantization, LoRA computed in bf16.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": accelerator.local_process_index}
    if spec.task == "sequence-classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            model_spec.path, num_labels=spec.data.num_labels, **kwargs
        )
        model.config.pad_token_id = spec.data.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_spec.path, **kwargs)
        model.config.use_cache = False  # training: no KV cache (packed rows need none)
    if model_spec.quantization == "4bit":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=train["gradient_checkpointing"]
        )
    elif train["gradient_checkpointing"]:
        # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    return model


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "numpy": np.random.get_state()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class KeptBase:
    """The base model a warm worker keeps between trials, and the random state right after it
    was loaded.

    A trial on the same base (same model, head, checkpointing and seed) gets it back as a cold
    start would have it: the same weights (LoRA never changes them, and `strip_lora` puts back
    the very modules PEFT wrapped, a classification head's untrained original included) and
    the same random state, so the LoRA initialization, dropout and data order that follow are
    those of a cold start, bit for bit. Anything else loads the base again.
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self.model: torch.nn.Module | None = None
        self.rng: dict[str, Any] = {}

    def get(self, spec: TrialSpec, accelerator: Accelerator) -> torch.nn.Module:
        data, train = spec.data, spec.training
        key = json.dumps(
            [spec.task, asdict(spec.model), data.num_labels, data.pad_token_id,
             train["gradient_checkpointing"], train["seed"]],
            sort_keys=True,
        )  # fmt: skip
        if key == self.key:
            _set_rng_state(self.rng)
            return self.model
        self.key, self.model = None, None  # free the old base before loading the new one
        gc.unfreeze()
        gc.collect()
        self.model = load_base(spec, accelerator)
        self.key, self.rng = key, _rng_state()
        # What lives now (the imports, the base) lives on: out of the collector's sight, a
        # collection after each trial takes milliseconds instead of about half a second.
        gc.collect()
        gc.freeze()
        return self.model


def strip_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The base model of a PEFT model as it was before `get_peft_model`: every LoRA layer
    replaced by the layer it wraps, every `modules_to_save` copy by its untouched original."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    base = model.get_base_model()
    done: list[str] = []
    for name, module in list(base.named_modules()):
        if any(name.startswith(d + ".") for d in done):
            continue  # inside a wrapper already replaced
        if isinstance(module, BaseTunerLayer):
            original = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            original = module.original_module
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, original)
        done.append(name)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in base.__dict__:
            delattr(base, attr)
    return base


def target_logits(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
    """A causal LM's logits at the positions that predict a target token, those targets, and
    the row each one belongs to.

    Only those positions go through the output layer (`logits_to_keep`): with a 49k-token
    vocabulary that layer is a fifth of a small model's compute, and with the loss on answers
    only, most positions have no target.
    """
    targets = batch["labels"][:, 1:]
    keep = F.pad(targets != -100, (0, 1))  # position t predicts token t + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits
    if logits.dim() == 3:  # a model that computes every position
        logits = logits[keep]
    rows = keep.nonzero()[:, 0]
    return logits.float(), targets[targets != -100], rows


def training_loss(model: torch.nn.Module, batch: dict, causal: bool) -> torch.Tensor:
    """The mean loss of a batch: per example (classification) or per target token (causal LM),
    as `model(**batch).loss` computes it."""
    if not causal:
        return model(**batch).loss
    logits, targets, _ = target_logits(model, batch)
    return F.cross_entropy(logits, targets)


def batch_loss(model: torch.nn.Module, batch: dict, causal: bool) -> tuple[torch.Tensor, ...]:
    """Per-example summed loss, target count, prediction and reference, so ranks can be
    gathered exactly. Causal LM: the prediction is 1 where the teacher-forced argmax of every
    target token equals it (the answer is right), the reference is 1."""
    if not causal:
        labels = batch["labels"]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        return loss, torch.ones_like(loss), logits.argmax(-1), labels
    logits, targets, rows = target_logits(model, batch)
    n = batch["labels"].shape[0]
    token_loss = F.cross_entropy(logits, targets, reduction="none")
    loss = torch.zeros(n, device=logits.device).index_add_(0, rows, token_loss)
    count = torch.zeros(n, device=logits.device).index_add_(0, rows, torch.ones_like(token_loss))
    wrong = torch.zeros(n, device=logits.device).index_add_(
        0, rows, (logits.argmax(-1) != targets).float()
    )
    exact = (wrong == 0).long()
    return loss, count, exact, torch.ones_like(exact)


def evaluate(model, eval_dl, accelerator: Accelerator, spec: TrialSpec) -> dict[str, float]:
    causal = spec.task == "causal-lm"
    model.eval()
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for batch in eval_dl:
            if STOP_REQUESTED[0]:
                raise TrialStopped
            parts.append(accelerator.gather_for_metrics(batch_loss(model, batch, causal)))
    model.train()
    loss_sum, count, preds, labels = (torch.cat(p) for p in zip(*parts, strict=True))
    per_example = loss_sum / count.clamp(min=1)
    metrics = {
        "val_loss": (loss_sum.sum() / count.sum().clamp(min=1)).item(),
        # standard error of the mean loss: how far apart two configurations must be to differ
        "val_loss_se": (per_example.std() / math.sqrt(len(per_example))).item()
        if len(per_example) > 1
        else 0.0,
        "eval_examples": len(loss_sum),  # gathered over ranks: the whole split
        # per example, in the split's order, rounded: what a paired comparison of two trials
        # on the same examples needs (the final one goes in the `end` event)
        "val_losses": [round(x, 4) for x in per_example.tolist()],
    }
    if causal:
        metrics["perplexity"] = math.exp(min(metrics["val_loss"], 50.0))
        if spec.data.format != "text":  # short answers: all tokens right
            metrics["answer_accuracy"] = (preds == labels).float().mean().item()
        return metrics
    metrics["accuracy"] = (preds == labels).float().mean().item()
    f1s = []
    for c in range(spec.data.num_labels):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    metrics["f1"] = sum(f1s) / len(f1s)  # macro F1
    return metrics


def peak_memory_mb(accelerator: Accelerator) -> float:
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class OrphanedError(RuntimeError):
    """The orchestrator that started this trial is gone; nobody reads the reports any more."""


class TrialStopped(Exception):
    """A warm worker was asked to stop its trial (SIGUSR1: pruned or interrupted)."""


STOP_REQUESTED: list[bool] = [False]  # set by a warm worker's SIGUSR1 handler


def check_continue(pid: int | None) -> None:
    """Between steps: stop if asked to, or if the orchestrator that started the trial is gone."""
    if STOP_REQUESTED[0]:
        raise TrialStopped
    if pid is None:  # run by hand
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise OrphanedError(f"orchestrator (pid {pid}) is gone; stopping this trial") from None
    except PermissionError:
        pass


def training_function(spec: TrialSpec, kept: KeptBase | None = None) -> None:
    """Train one configuration and report on it. `kept`: a warm worker's base model, reused
    and given back without LoRA; None loads the base for this trial alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    train = spec.training
    accelerator = Accelerator(gradient_accumulation_steps=train["gradient_accumulation_steps"])
    reporter = Reporter(spec.reports) if accelerator.is_main_process else NullReporter()
    set_seed(train["seed"])  # same seed in every trial: configurations differ, not luck
    started = time.time()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # a warm worker's peak is this trial's

    train_dl, eval_dl = get_dataloaders(spec, train["seed"])
    base = kept.get(spec, accelerator) if kept else load_base(spec, accelerator)
    model = get_peft_model(base, LoraConfig(**spec.lora))
    trainable, total = model.get_nb_trainable_parameters()
    reporter.emit(
        event="start",
        trainable_params=trainable,
        total_params=total,
        num_processes=accelerator.num_processes,
        device=str(accelerator.device),
        mixed_precision=accelerator.mixed_precision,
        setup_seconds=time.time() - started,
    )

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=train["learning_rate"],
        weight_decay=train["weight_decay"],
    )
    max_steps = train["max_steps"]
    # The schedule counts optimizer steps and is stepped by hand once per optimizer step, so it
    # is not passed to accelerate (which would step it once per process).
    scheduler = get_scheduler(
        train["lr_scheduler"],
        optimizer,
        num_warmup_steps=int(train["warmup_ratio"] * max_steps),
        num_training_steps=max_steps,
    )
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    try:
        _train(spec, accelerator, reporter, model, optimizer, scheduler, train_dl, eval_dl, started)
    except TrialStopped:  # raised between steps: the base is intact, the LoRA goes
        if kept:
            strip_lora(accelerator.unwrap_model(model))
        raise
    finally:
        reporter.close()
        accelerator.free_memory()  # the prepared model, optimizer and loaders
    if kept:
        strip_lora(accelerator.unwrap_model(model))


def _train(spec, accelerator, reporter, model, optimizer, scheduler, train_dl, eval_dl, started):
    """The loop: optimizer steps, an evaluation and a report every `eval_every`, the adapter
    saved at the end."""
    train = spec.training
    max_steps = train["max_steps"]

    step, epoch, losses, train_seconds, eval_seconds = 0, 0, [], 0.0, 0.0
    val_losses: list[float] = []
    model.train()
    while step < max_steps:
        tick = time.time()
        for batch in train_dl:
            if STOP_REQUESTED[0]:
                raise TrialStopped
            with accelerator.accumulate(model):
                loss = training_loss(model, batch, spec.task == "causal-lm")
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss.item()} at step {step + 1}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and train["max_grad_norm"]:
                    accelerator.clip_grad_norm_(model.parameters(), train["max_grad_norm"])
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            check_continue(spec.orchestrator_pid)
            if step % train["eval_every"] == 0 or step == max_steps:
                train_seconds += time.time() - tick
                tick = time.time()
                metrics = evaluate(model, eval_dl, accelerator, spec)
                val_losses = metrics.pop("val_losses")
                eval_seconds += time.time() - tick
                train_loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
                losses = []
                reporter.emit(
                    step=step,
                    epoch=epoch,
                    train_loss=train_loss,
                    learning_rate=scheduler.get_last_lr()[0],
                    train_seconds=train_seconds,
                    eval_seconds=eval_seconds,
                    **metrics,
                )
                tick = time.time()
            if step >= max_steps:
                break
        epoch += 1

    if spec.adapter_dir and accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(spec.adapter_dir)
    reporter.emit(
        event="end",
        step=step,
        peak_memory_mb=peak_memory_mb(accelerator),
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        wall_seconds=time.time() - started,
        val_losses=val_losses,  # of the final evaluation
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # without it a gloo rank can abort at exit


def _request_stop(signum, frame) -> None:
    STOP_REQUESTED[0] = True


def _resident_mb() -> float | None:
    """This process's resident memory now (Linux), None where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _release_freed_memory() -> None:
    """Give the memory freed by the last trial back to the system (glibc keeps it otherwise,
    and a warm worker's resident size would creep up trial after trial)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _grown(now: float | None, first: float | None, slack_mb: float = 512) -> bool:
    """Memory past what the first trial left by a quarter plus `slack_mb`: state in doubt."""
    return now is not None and first is not None and now > 1.25 * first + slack_mb


def serve() -> int:
    """A warm worker: imports and loads the base model once, then trains the trials it is
    handed, one at a time, each as a cold start would.

    Each line on stdin is a job, `{"spec": <spec.json>, "log": <the trial's log>}`; stdout and
    stderr go to that log while it runs. SIGUSR1 stops the running trial at its next step (a
    pruned or interrupted trial) and the worker waits for the next job. Every job ends with an
    `exit` event on the trial's report channel: `rc` (0, or 1 with the traceback in its log),
    `stopped`, and `retire`, set when the worker's state is in doubt (a failed trial, memory
    grown past what the first trial left), after which it exits and the orchestrator starts a
    fresh one. End of stdin (the orchestrator is gone or done) ends the worker.
    """
    signal.signal(signal.SIGUSR1, _request_stop)
    kept = KeptBase()
    home = os.dup(1)  # the worker's own log, between trials
    first: dict[str, float | None] = {}
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        log = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        STOP_REQUESTED[0] = False
        rc, stopped, retire = 0, False, False
        spec = TrialSpec.read(Path(job["spec"]))
        try:
            training_function(spec, kept)
        except TrialStopped:
            stopped = True
        except BaseException:  # noqa: BLE001 - the trial fails; the worker is replaced
            traceback.print_exc()
            rc, retire = 1, True
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(home, 1)
        os.dup2(home, 2)
        os.close(log)
        gc.collect()
        _release_freed_memory()
        memory = {"rss_mb": _resident_mb()}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            memory["cuda_mb"] = torch.cuda.memory_allocated() / 2**20
        if not first:
            first = memory
        retire = retire or any(_grown(memory[k], first.get(k)) for k in memory)
        reporter = Reporter(spec.reports)
        reporter.emit(event="exit", rc=rc, stopped=stopped, retire=retire, **memory)
        reporter.close()
        if retire:
            break
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one LoRA configuration from a spec file.")
    parser.add_argument("spec", type=Path, nargs="?", help="the trial's spec.json")
    parser.add_argument(
        "--serve",
        metavar="STUDY_DIR",
        help="a warm worker for the study in STUDY_DIR (named so `ps` tells whose it is): "
        "train the trials named on stdin",
    )
    args = parser.parse_args(argv)
    if (args.spec is None) == (args.serve is None):
        parser.error("give a spec file, or --serve")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.serve is not None:
        return serve()
    training_function(TrialSpec.read(args.spec))
    return 0
