"""One LoRA fine-tune: optimizer steps, an evaluation and a report every `eval_every` steps,
the adapter saved at the end. `training_function` is the whole trial."""

from __future__ import annotations

import math
import os
import resource
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from ranksearch.worker.batches import get_dataloaders
from ranksearch.worker.model import KeptBase, load_base, strip_lora
from ranksearch.worker.nested import NestedLoRA, NestedSpec
from ranksearch.worker.spec import NullReporter, Reporter, TrialSpec


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


def evaluate(
    model, eval_dl, accelerator: Accelerator, spec: TrialSpec, nested: NestedLoRA | None = None
) -> dict:
    """The validation metrics; a nested trial's at each of its ranks (`ranks`, and their
    per-example losses under `rank_val_losses`), with the top-level ones (the val loss the
    pruner and the sampler see) those of the best rank, named by `best_rank`."""
    if nested is None:
        return _evaluate(model, eval_dl, accelerator, spec)
    per_rank = {}
    for rank in nested.spec.ranks:
        with nested.at(rank):
            per_rank[rank] = _evaluate(model, eval_dl, accelerator, spec)
    best = min(per_rank, key=lambda r: (per_rank[r]["val_loss"], r))
    return {
        **per_rank[best],
        "best_rank": best,
        "ranks": {
            str(r): {k: v for k, v in m.items() if k not in ("val_losses", "eval_examples")}
            for r, m in per_rank.items()
        },
        "rank_val_losses": {str(r): m["val_losses"] for r, m in per_rank.items()},
    }


def _evaluate(model, eval_dl, accelerator: Accelerator, spec: TrialSpec) -> dict[str, float]:
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
    nested = None
    if spec.nested:  # one LoRA at the largest rank, every smaller rank of the space usable
        nested_spec = NestedSpec.of(spec.nested)
        nested = NestedLoRA(model, nested_spec, spec.lora.get("use_rslora", False), train["seed"])
        rank_params = {str(r): n for r, n in nested.trainable_params(trainable).items()}
    reporter.emit(
        event="start",
        trainable_params=trainable,
        total_params=total,
        **({"rank_params": rank_params} if nested else {}),
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
    loaders = (train_dl, eval_dl)
    try:
        _train(spec, accelerator, reporter, model, optimizer, scheduler, loaders, started, nested)
    except TrialStopped:  # raised between steps: the base is intact, the LoRA goes
        if kept:
            strip_lora(accelerator.unwrap_model(model))
        raise
    finally:
        if nested:
            nested.remove()
        reporter.close()
        accelerator.free_memory()  # the prepared model, optimizer and loaders
    if kept:
        strip_lora(accelerator.unwrap_model(model))


def _train(spec, accelerator, reporter, model, optimizer, scheduler, loaders, started, nested):
    """The loop: optimizer steps, an evaluation and a report every `eval_every`, the adapter
    saved at the end. A nested trial trains one sampled rank per optimizer step."""
    train = spec.training
    max_steps = train["max_steps"]
    train_dl, eval_dl = loaders

    step, epoch, losses, train_seconds, eval_seconds = 0, 0, [], 0.0, 0.0
    val_losses: list[float] = []
    rank_val_losses: dict[str, list[float]] = {}
    sampled_for = -1  # the step whose rank is drawn: every micro-batch of a step trains it
    model.train()
    while step < max_steps:
        tick = time.time()
        for batch in train_dl:
            if STOP_REQUESTED[0]:
                raise TrialStopped
            if nested and sampled_for != step:
                nested.sample_rank()
                sampled_for = step
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
                metrics = evaluate(model, eval_dl, accelerator, spec, nested)
                val_losses = metrics.pop("val_losses")
                rank_val_losses = metrics.pop("rank_val_losses", {})
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

    if nested:
        nested.set_rank(nested.full)  # the saved adapter is the full one, at its own scaling
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
        **({"rank_val_losses": rank_val_losses} if nested else {}),
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # without it a gloo rank can abort at exit
