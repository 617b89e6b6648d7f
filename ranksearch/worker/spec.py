"""The worker's contract, without torch: the trial spec.json the orchestrator writes and the
worker trains, and the report channel the worker writes and the orchestrator reads.

`TrialSpec` is versioned (`SPEC_VERSION`); a reader refuses any other version. The report
vocabulary (which keys a report line carries, which of them the orchestrator keeps and logs)
is defined here once.
"""

from __future__ import annotations

import json
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

SPEC_VERSION = 1  # the spec.json layout: a reader refuses any other (bump it with the layout)
_RERUN = "written by another ranksearch version (or edited by hand); rerun the trial with this one"


# The report channel's vocabulary, in one place: what each JSON line may carry. An evaluation
# line has `step` and EVALUATION_KEYS; the `start` and `end` events, and a warm worker's `exit`
# after every job, carry `event` and their own keys. The orchestrator keeps and logs the named
# subsets below, so a new key is added here and nowhere else.
EVALUATION_KEYS = (
    "step", "epoch", "train_loss", "learning_rate", "train_seconds", "eval_seconds",
    "val_loss", "val_loss_se", "eval_examples", "val_losses",
    "accuracy", "f1",  # sequence classification
    "perplexity", "answer_accuracy",  # causal LM (answer accuracy: prompt-completion, messages)
    # a nested trial (worker/nested.py): the metrics above are its best rank's, `ranks` holds
    # each rank's (str(rank) -> val_loss, val_loss_se, accuracy, ...)
    "best_rank", "ranks",
)  # fmt: skip
EVENT_KEYS = {
    "start": ("trainable_params", "total_params", "num_processes", "device", "mixed_precision",
              "setup_seconds", "rank_params"),
    "end": ("step", "peak_memory_mb", "train_seconds", "eval_seconds", "wall_seconds",
            "val_losses", "rank_val_losses"),
    "exit": ("rc", "stopped", "retire", "rss_mb", "cuda_mb"),
}  # fmt: skip
# what the trial keeps of each evaluation (Optuna user attributes; the last one wins)
KEPT_PER_EVALUATION = (
    "val_loss", "val_loss_se", "accuracy", "answer_accuracy", "f1", "perplexity", "train_loss",
    "train_seconds", "best_rank", "ranks",
)  # fmt: skip
# what the trial keeps of the start and end events as user attributes; the end event's
# `val_losses` (the final evaluation's per-example losses, rounded, for paired comparisons) is
# kept in the storage too, because on several nodes the trial folders are not shared, but
# compactly and apart (answer/losses.py): hundreds of numbers would flood Optuna's own tools
KEPT_FROM_EVENTS = (
    "trainable_params", "total_params", "peak_memory_mb", "train_seconds", "eval_seconds",
    "rank_params",
)  # fmt: skip
# what the trial's MLflow run logs at every evaluation step
LOGGED_PER_STEP = (
    "val_loss", "accuracy", "answer_accuracy", "f1", "perplexity", "train_loss", "learning_rate",
)  # fmt: skip


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
    # a nested-rank trial (worker/nested.py): {"ranks": [...], "alphas": [...]}; None: plain
    nested: dict[str, Any] | None = None

    def to_json(self) -> str:
        raw = asdict(self)
        if raw["nested"] is None:  # a plain trial's spec reads as before nested trials existed
            del raw["nested"]
        return json.dumps(raw, indent=2)

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
