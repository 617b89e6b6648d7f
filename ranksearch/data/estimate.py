"""Exact LoRA parameter counts and a training-memory estimate for each configuration.

Counts come from the model's actual modules, built on the `meta` device (no weights are read):
r * (in_features + out_features) for every adapted Linear/Conv1D, plus the magnitude vector
for DoRA, plus the task head PEFT trains for sequence classification. Tests hold this equal to
PEFT's own `get_nb_trainable_parameters()`.
"""

from __future__ import annotations

import itertools
import os
import resource
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ranksearch.config.problems import Problem, StudyError
from ranksearch.config.schema import StudyConfig
from ranksearch.config.space import TrialConfig, dimensions, is_searched, lora_kwargs, module_sets
from ranksearch.data.prepare import model_location

SEQ_CLS_HEADS = ("classifier", "score")  # what PEFT keeps trainable for SEQ_CLS
BYTES_PER_TRAINABLE = 4 + 4 + 8  # fp32 weight, gradient, AdamW's two moments


@dataclass(frozen=True)
class Estimate:
    rank: int
    target_modules: str
    use_dora: bool
    adapted_modules: int
    lora_params: int
    head_params: int
    trainable_params: int
    total_params: int  # base model + adapter
    trainable_fraction: float
    adapter_mb: float  # safetensors on disk, fp32
    optimizer_state_mb: float
    memory_estimate_mb: float  # weights + trainable state + activations at batch x max_length
    compression: float  # full fine-tuning parameters / trainable parameters

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_skeleton(cfg: StudyConfig) -> torch.nn.Module:
    """The study's model with the right head, on `meta`: shapes without weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    trust = cfg.model.trust_remote_code
    config = AutoConfig.from_pretrained(model_location(cfg.model.path), trust_remote_code=trust)
    if cfg.task == "causal-lm":
        auto = AutoModelForCausalLM
    else:
        auto = AutoModelForSequenceClassification
        config.num_labels = max(2, len(set((cfg.data.labels or {}).values())))
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust)


def _shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a Linear or transformers' Conv1D (whose weight is stored transposed)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        rows, cols = module.weight.shape
        return rows, cols
    return None


def _excluded_heads(model: torch.nn.Module, task: str) -> set[str]:
    """What `all-linear` leaves out: the output embedding (LM head) or the classifier head."""
    names = {m: n for n, m in model.named_modules()}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        return {names[out]}
    if task == "sequence-classification":
        for head in SEQ_CLS_HEADS:
            if getattr(model, head, None) is not None:
                return {names[getattr(model, head)]}
    return set()


def adapted(model: torch.nn.Module, targets: str | list[str], task: str) -> list[tuple[int, int]]:
    """(in, out) of every module LoRA adapts for these targets (PEFT's suffix matching)."""
    excluded = _excluded_heads(model, task)
    if task == "sequence-classification":
        excluded |= {
            n for n, _ in model.named_modules() if n.split(".")[0] in SEQ_CLS_HEADS
        }  # modules_to_save are never adapted
    shapes = []
    for name, module in model.named_modules():
        shape = _shape(module)
        if shape is None or name in excluded:
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets):
            shapes.append(shape)
    return shapes


def head_params(model: torch.nn.Module, task: str) -> int:
    if task != "sequence-classification":
        return 0
    for head in SEQ_CLS_HEADS:
        module = getattr(model, head, None)
        if module is not None:
            return sum(p.numel() for p in module.parameters())
    return 0


def activation_bytes(model_config, batch: int, seq: int, bytes_per_value: int) -> float:
    """Stored activations of a transformer layer stack (Korthikanti et al. 2022, eq. 1)."""
    h = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", 0)
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", 0)
    heads = getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head", 1)
    per_layer = seq * batch * h * (34 + 5 * heads * seq / max(h, 1))  # in bytes at 16 bit
    return layers * per_layer * bytes_per_value / 2


def estimate(
    model: torch.nn.Module, cfg: StudyConfig, rank: int, set_name: str, use_dora: bool = False
) -> Estimate:
    targets = module_sets(cfg.search)[set_name]
    shapes = adapted(model, targets, cfg.task)
    lora = sum(rank * (i + o) for i, o in shapes) + (sum(o for _, o in shapes) if use_dora else 0)
    head = head_params(model, cfg.task)
    base = sum(p.numel() for p in model.parameters())
    trainable = lora + head
    weight_bytes = 0.5 if cfg.model.quantization == "4bit" else 4
    act = activation_bytes(
        model.config,
        cfg.training.batch_size,
        cfg.data.max_length,
        2 if cfg.training.mixed_precision in ("fp16", "bf16") else 4,
    )
    memory = (base - head) * weight_bytes + trainable * BYTES_PER_TRAINABLE + act
    return Estimate(
        rank=rank,
        target_modules=set_name,
        use_dora=use_dora,
        adapted_modules=len(shapes),
        lora_params=lora,
        head_params=head,
        trainable_params=trainable,
        total_params=base + lora + head,
        trainable_fraction=trainable / (base + lora + head),
        adapter_mb=trainable * 4 / 2**20,
        optimizer_state_mb=trainable * 8 / 2**20,
        memory_estimate_mb=memory / 2**20,
        compression=base / max(trainable, 1),
    )


def _choices(dim: Any) -> list[Any]:
    if isinstance(dim, list):
        return dim
    if is_searched(dim):  # an integer rank range: its ends
        return sorted({int(dim.low), int(dim.high)})
    return [dim.low if hasattr(dim, "low") else dim]


def estimate_space(
    cfg: StudyConfig, ranks: list[int] | None = None, targets: list[str] | None = None
) -> list[Estimate]:
    """Every (rank, module set, DoRA) of the study's space, or of the ranks/sets given.

    Raises `StudyError` naming `--rank` or `--targets` for a rank below 1 or a set the study
    does not name."""
    problems = option_problems(cfg, ranks or [], targets or [])
    if problems:
        raise StudyError(problems, "estimate options")
    dims = dimensions(cfg.search)
    ranks = ranks or [int(r) for r in _choices(dims["rank"])]
    sets = targets or list(module_sets(cfg.search))
    doras = [bool(d) for d in _choices(dims["use_dora"])]
    model = build_skeleton(cfg)
    return [estimate(model, cfg, r, s, d) for r, s, d in itertools.product(ranks, sets, doras)]


def option_problems(cfg: StudyConfig, ranks: list[int], targets: list[str]) -> list[Problem]:
    """`estimate --rank/--targets` values the study cannot train."""
    problems = []
    if any(r < 1 for r in ranks):
        problems.append(Problem("--rank", f"ranks are integers >= 1, got {ranks}"))
    sets = list(module_sets(cfg.search))
    unknown = [t for t in targets if t not in sets]
    if unknown:
        problems.append(
            Problem("--targets", f"{unknown} are not module sets of the study; use {sets}")
        )
    return problems


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(cfg: StudyConfig, worst: Estimate) -> dict[str, Any]:
    """One real optimizer step of `worst` at the study's batch x max_length; its peak memory.

    CUDA: the allocator's peak. CPU: peak RSS minus the RSS before the model was loaded (so
    the Python runtime and libraries, which a trial also carries, are not counted).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cuda = torch.cuda.is_available() and cfg.launch.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    before = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    location = model_location(cfg.model.path)
    if cfg.task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(location)
    else:
        labels = max(2, len(set((cfg.data.labels or {}).values())))
        model = AutoModelForSequenceClassification.from_pretrained(location, num_labels=labels)
    config = TrialConfig(
        rank=worst.rank,
        lora_alpha=worst.rank,
        lora_dropout=0.0,
        target_modules=worst.target_modules,
        modules=module_sets(cfg.search)[worst.target_modules],
        learning_rate=1e-4,  # the step below; the memory does not depend on it
        use_rslora=False,
        use_dora=worst.use_dora,
        init_lora_weights=True,
    )
    model = get_peft_model(model, LoraConfig(**lora_kwargs(config, cfg.task))).to(device)
    batch, seq = cfg.training.batch_size, cfg.data.max_length
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    labels = ids if cfg.task == "causal-lm" else torch.zeros(batch, dtype=torch.long, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {
        "rank": worst.rank,
        "target_modules": worst.target_modules,
        "device": device.type,
        "estimate_mb": worst.memory_estimate_mb,
        "measured_mb": peak,
        "method": "cuda peak" if cuda else "RSS delta",
    }
