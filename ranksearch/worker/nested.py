"""Nested ranks: one LoRA at the space's largest rank whose leading sub-ranks are each a usable
adapter, so one training draws the rank curve (DyLoRA, Valipour et al., EACL 2023).

Rank b of a rank-r LoRA is its first b components: the first b rows of every `lora_A` and the
first b columns of every `lora_B`, scaled as a plain LoRA of rank b with its own alpha would be
(alpha_b / b, or alpha_b / sqrt(b) with rsLoRA). Zeroing the rest of `lora_A`'s output is that
adapter exactly: B[:, :b] @ A[:b] x. Training draws one rank per optimizer step (as often as its
size, or uniformly over the space's ranks) and trains the truncation at that rank; evaluation
truncates at each rank in turn. `save_rank` writes rank b as an ordinary PEFT adapter (r = b)
that `PeftModel.from_pretrained` loads: the same slices and the same scaling.

`NestedSpec` travels in the trial spec (`TrialSpec.nested`); None is a plain LoRA.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

ADAPTER = "default"  # the one adapter a trial trains


@dataclass(frozen=True, kw_only=True)
class NestedSpec:
    """The ranks a nested trial reports, ascending, each with the lora_alpha a plain LoRA of that
    rank would have; the LoRA trained has the last (largest) one."""

    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    # how a training step draws its rank: `by-rank` (a rank as often as its size: the
    # components past the smallest rank train more often), or `uniform` over the ranks (DyLoRA)
    sampling: str = "by-rank"

    @classmethod
    def of(cls, raw: dict | None) -> NestedSpec | None:
        if raw is None:
            return None
        return cls(
            ranks=tuple(int(r) for r in raw["ranks"]),
            alphas=tuple(raw["alphas"]),
            sampling=raw.get("sampling", "by-rank"),
        )

    def alpha(self, rank: int) -> float:
        return self.alphas[self.ranks.index(rank)]


def scaling(rank: int, alpha: float, rslora: bool) -> float:
    """What PEFT's LoraLayer multiplies B A x by, for a LoRA of this rank and alpha."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every LoRA layer of a PEFT model that carries the trial's adapter."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


class NestedLoRA:
    """Truncates a PEFT model's LoRA layers at a chosen rank (a forward hook on every `lora_A`
    zeroes the components past it, and the layer's scaling is that rank's)."""

    def __init__(self, model: torch.nn.Module, spec: NestedSpec, rslora: bool, seed: int):
        self.spec, self.rslora = spec, rslora
        self.layers = lora_layers(model)
        if not self.layers:
            raise ValueError("nested ranks: the model has no LoRA layers")
        self.full = self.layers[0].r[ADAPTER]
        if self.full != spec.ranks[-1]:
            raise ValueError(f"nested ranks {spec.ranks}: the LoRA has rank {self.full}")
        self.rank = self.full
        self._mask: torch.Tensor | None = None
        # its own generator: the data order, dropout and initialization are a plain trial's
        self._rng = random.Random(seed)
        self._hooks = [
            layer.lora_A[ADAPTER].register_forward_hook(self._truncate) for layer in self.layers
        ]

    def _truncate(self, module, inputs, output):
        if self.rank == self.full:
            return output
        mask = self._mask
        if mask is None or mask.device != output.device or mask.dtype != output.dtype:
            mask = torch.zeros(self.full, device=output.device, dtype=output.dtype)
            mask[: self.rank] = 1
            self._mask = mask
        return output * mask

    def set_rank(self, rank: int) -> None:
        if rank not in self.spec.ranks:
            raise ValueError(f"rank {rank} is not one of the nested ranks {self.spec.ranks}")
        self.rank, self._mask = rank, None
        value = scaling(rank, self.spec.alpha(rank), self.rslora)
        for layer in self.layers:
            layer.scaling[ADAPTER] = value

    def sample_rank(self) -> int:
        """The rank one training step trains, drawn as `NestedSpec.sampling` says."""
        ranks = self.spec.ranks
        if self.spec.sampling == "by-rank":
            rank = self._rng.choices(ranks, weights=ranks)[0]
        elif self.spec.sampling == "uniform":
            rank = self._rng.choice(ranks)
        else:
            raise ValueError(f"nested sampling {self.spec.sampling!r}: uniform or by-rank")
        self.set_rank(rank)
        return rank

    @contextmanager
    def at(self, rank: int) -> Iterator[None]:
        """The model truncated at `rank` inside the block, at its previous rank after it."""
        previous = self.rank
        self.set_rank(rank)
        try:
            yield
        finally:
            self.set_rank(previous)

    def trainable_params(self, total_trainable: int) -> dict[int, int]:
        """Per rank, the trainable parameters a plain LoRA of that rank would have: the full
        count less the LoRA components past it (a head trained in full stays)."""
        per_component = sum(
            layer.lora_A[ADAPTER].in_features + layer.lora_B[ADAPTER].out_features
            for layer in self.layers
        )
        return {r: total_trainable - (self.full - r) * per_component for r in self.spec.ranks}

    def remove(self) -> None:
        """Back to a plain LoRA at its full rank (a warm worker strips it after the trial)."""
        self.set_rank(self.full)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def save_rank(adapter_dir: str | Path, out_dir: str | Path, rank: int, alpha: float) -> Path:
    """Rank `rank` of a saved nested adapter as an ordinary PEFT adapter: the first `rank` rows
    of each lora_A and columns of each lora_B, r = rank and lora_alpha = alpha in its config;
    every other tensor (a classification head) as saved."""
    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    config = json.loads((src / "adapter_config.json").read_text())
    if rank > config["r"]:
        raise ValueError(f"{src}: rank {rank} is above the adapter's rank {config['r']}")
    tensors = load_file(src / "adapter_model.safetensors")
    for name, tensor in tensors.items():
        if ".lora_A." in name:
            tensors[name] = tensor[:rank].contiguous()
        elif ".lora_B." in name:
            tensors[name] = tensor[:, :rank].contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{src}: a nested adapter has no per-module {key}")
    config.update(r=rank, lora_alpha=alpha)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for extra in src.iterdir():  # a README or tokenizer files saved beside it
        if extra.is_file() and not (out / extra.name).exists():
            (out / extra.name).write_bytes(extra.read_bytes())
    return out
