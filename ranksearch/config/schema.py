"""A study file's schema as typed pydantic models: every key, its type, default and hint.

`load.py` reads a file into these models; `space.py` turns the `search:` section into Optuna
distributions. The study-file reference (docs/study-file.md) is generated from these fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


class Range(BaseModel):
    """A numeric range for Optuna: `{low: 1.0e-4, high: 3.0e-3, log: true}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high}); swap them")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}; raise low or drop `log`")
        if self.log and self.step is not None:
            raise ValueError("`step` and `log: true` cannot be combined; choose one")
        return self


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Scalar = bool | int | float | str
# A dimension is fixed (one value), a list of choices, or a range.
Choice = Annotated[list[Scalar], Field(min_length=1)]
Dimension = Range | Choice | Scalar
ModuleSet = Literal["all-linear"] | Annotated[list[str], Field(min_length=1)]


class ModelConfig(_Strict):
    path: str = Field(description="hub id, local directory, or package://pkg/sub/dir")
    quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit = QLoRA (NF4, double quant); CUDA only"
    )
    trust_remote_code: bool = Field(
        False, description="never run code shipped with a model unless asked"
    )


class MessageTemplate(_Strict):
    """One turn of a conversation built from a row: `{role: user, content: "Tweet: {text}"}`."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(
        description="a template over the row's columns: `{column}`; `{{` for a literal brace"
    )


class DataConfig(_Strict):
    source: str = Field(
        description="hub dataset id, a local csv/tsv/json/jsonl/parquet file, or package://..."
    )
    validation: str | None = Field(
        None, description="a validation file, or a split name for hub datasets"
    )
    config_name: str | None = Field(None, description="hub dataset configuration")
    split: str = Field("train", description="hub split used for training")
    encoding: str = Field("utf-8", description="text encoding of csv/tsv files (e.g. latin-1)")
    quoting: Literal["minimal", "none"] = Field(
        "minimal", description="csv quoting; `none` for raw TSV like SST-2"
    )
    format: Literal["text", "prompt-completion", "messages"] = Field(
        "text",
        description=(
            "causal-lm only. `text`: loss on every token of `text_column`. `prompt-completion`: "
            "loss on the completion (EOS appended). `messages`: rendered with the tokenizer's "
            "chat template, loss on the assistant turns."
        ),
    )
    prompt: str | None = Field(
        None, description="a column, or a template over columns: 'Tweet: {text}\nSentiment:'"
    )
    completion: str | None = Field(None, description="a column, or a template: ' {sentiment}'")
    messages: str | Annotated[list[MessageTemplate], Field(min_length=1)] | None = Field(
        None,
        description=(
            "a column holding [{role, content}, ...] (chat JSONL), or the turns as templates over"
            " columns"
        ),
    )
    text_column: str = Field(
        "text", description="the input text column (classification, causal-lm `text`)"
    )
    label_column: str = Field(
        "label",
        description=(
            "Classification: the class column. Causal-lm: with `labels`, only these values are "
            "kept and the validation split is stratified by them."
        ),
    )
    labels: dict[str, int] | None = Field(
        None, description="raw label -> class id; unmapped rows are dropped"
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="held out when no validation source"
    )
    max_length: int = Field(128, gt=0, description="tokens; longer texts are truncated")
    max_train_samples: int | None = Field(
        None, gt=0, description="train on at most this many rows (a seeded sample)"
    )
    max_eval_samples: int | None = Field(
        None, gt=0, description="score at most this many validation rows (a fixed, seeded subset)"
    )

    @model_validator(mode="before")
    @classmethod
    def _label_keys_as_str(cls, data: Any) -> Any:
        # YAML reads `{0: 0, 1: 1}` with int keys; labels are matched as strings.
        if isinstance(data, dict) and isinstance(data.get("labels"), dict):
            data = {**data, "labels": {str(k): v for k, v in data["labels"].items()}}
        return data


class SearchConfig(_Strict):
    rank: Dimension = Field(default_factory=lambda: [4, 8, 16, 32], description="LoRA rank r")
    alpha: Dimension | None = Field(None, description="absolute lora_alpha values")
    alpha_ratio: Dimension | None = Field(
        None, description="lora_alpha = ratio * rank (default [1, 2])"
    )
    dropout: Dimension = Field(0.05, description="lora_dropout")
    target_modules: dict[str, ModuleSet] | ModuleSet = Field(
        default_factory=lambda: {"qv": ["query", "value"]},
        description="named module sets (`{qv: [query, value], all: all-linear}`), or one set",
    )
    learning_rate: Dimension = Field(
        default_factory=lambda: Range(low=1e-4, high=3e-3, log=True),
        description="the optimizer's peak learning rate",
    )
    use_rslora: Dimension = Field(False, description="rank-stabilized scaling, alpha / sqrt(r)")
    use_dora: Dimension = Field(False, description="weight-decomposed LoRA (DoRA)")
    init_lora_weights: Dimension = Field(
        True, description="PEFT's init_lora_weights: true, gaussian, pissa, ..."
    )
    rank_mode: Literal["plain", "nested"] = Field(
        "plain",
        description="plain: rank is searched like the other dimensions, a trial per rank; "
        "nested: one trial per configuration of the others trains a LoRA at the largest rank "
        "whose leading ranks are each usable and reports every rank of `rank` (the rank curve "
        "for about one fine-tune), and the recommended rank is then trained once as a plain "
        "LoRA (docs/search.md#nested-ranks)",
    )
    nested_sampling: Literal["by-rank", "uniform"] = Field(
        "by-rank",
        description="nested trials: how each training step draws the rank it trains, as often "
        "as its size (by-rank: the components past the smallest rank train often enough for "
        "the large ranks to be judged) or uniformly over the ranks (DyLoRA); BENCHMARKS.md "
        "section 9 measured both",
    )

    @model_validator(mode="after")
    def _alpha(self) -> SearchConfig:
        if self.alpha is not None and self.alpha_ratio is not None:
            raise ValueError(
                "can't provide both `search.alpha` and `search.alpha_ratio`; choose one"
            )
        return self


class TrainingConfig(_Strict):
    max_steps: int = Field(300, gt=0, description="optimizer steps of a full-budget trial")
    eval_every: int = Field(25, gt=0, description="optimizer steps between evaluations (= reports)")
    batch_size: int = Field(16, gt=0, description="per process")
    eval_batch_size: int | None = Field(None, gt=0, description="default: 2 * batch_size")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="micro-batches per optimizer step"
    )
    warmup_ratio: float = Field(
        0.06, ge=0, lt=1, description="share of max_steps spent warming the learning rate up"
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="the learning-rate schedule after warm-up"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="gradient clipping; null turns it off"
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,
        description="every trial's seed (numpy's range): configurations differ, not luck",
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16/fp16 on GPU"
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, slower steps"
    )
    group_by_length: bool = Field(
        False,
        description=(
            "Training batches of similar lengths: each run of 50 batches of the shuffle sorted by"
            " length, its batches served in random order. About 1.5x faster on tweets, but it "
            "changes which configurations win (BENCHMARKS.md, section 3): off unless speed "
            "matters more."
        ),
    )
    packing: bool = Field(
        False,
        description=(
            "causal-lm: each training batch's examples share rows (position ids restart per "
            "example, so attention stays inside each one) instead of being padded; the same "
            "examples per step and the same loss. Rows hold at most `packing_length` tokens "
            "(default: the whole batch in one)."
        ),
    )
    packing_length: int | None = Field(
        None, gt=0, description="with `packing`: tokens per packed row"
    )


class PrunerConfig(_Strict):
    type: Literal["hyperband", "successive-halving", "median", "none"] = Field(
        "hyperband", description="`none` trains every trial to max_steps"
    )
    min_steps: int | None = Field(
        None,
        gt=0,
        description=(
            "first rung (hyperband/SH) or warmup (median), in optimizer steps; default: derived, "
            "max_steps / reduction_factor at the nearest evaluation step (sampling.first_rung)"
        ),
    )
    reduction_factor: int = Field(
        3, ge=2, description="Hyperband / successive halving: keep 1 in this many at each rung"
    )


class SamplerConfig(_Strict):
    type: Literal["tpe", "random", "grid", "bruteforce"] = Field(
        "tpe", description="tpe models the results; random, grid and bruteforce do not"
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,
        description="the sampler's seed (numpy's range): the draws of trial n depend on (seed, n)",
    )
    n_startup_trials: int = Field(5, ge=0, description="TPE: random trials before modelling")
    informed_start: bool = Field(
        True,
        description=(
            "tpe: a new study first runs the configuration published LoRA guidance favours "
            "(all-linear, alpha = 2 x rank, rank 16 or 8, the log-middle learning rate), snapped "
            "to the space and skipped when outside it; then the `enqueue:` baselines, then the "
            "sampler."
        ),
    )


class BudgetConfig(_Strict):
    n_trials: int = Field(
        20, gt=0, description="finished (complete + pruned) trials in the whole study"
    )
    full_trials: float | None = Field(
        None,
        gt=0,
        description=(
            "compute: no trial starts once the search trials trained this many full trials of "
            "optimizer steps (a trial pruned at 40 of 100 steps: 0.4); trials running then finish"
        ),
    )
    stop_when_converged: bool = Field(
        False,
        description=(
            "no trial starts once the last 2 full trials of compute found no better answer beyond"
            " the noise (paired standard error of per-example losses; search/budget.py)"
        ),
    )
    max_consecutive_failures: int = Field(
        3, gt=0, description="the study stops after this many failed trials in a row"
    )
    retry_failed: int = Field(
        1,
        ge=0,
        description=(
            "A trial whose worker was lost (orchestrator killed, machine gone: found by its "
            "heartbeat or its dead pid) is failed and its configuration queued again, at most "
            "this many times."
        ),
    )


class LaunchConfig(_Strict):
    num_processes: int = Field(1, gt=0, description="accelerate ranks per trial")
    gpus_per_trial: int = Field(1, gt=0, description="on GPU, each trial runs one rank per GPU")
    parallel_trials: int | None = Field(
        None, gt=0, description="default: visible GPUs // gpus_per_trial"
    )
    trials_per_gpu: int = Field(
        1,
        gt=0,
        description=(
            "Several one-GPU trials share each GPU, each its own process (small models leave a "
            "large GPU mostly idle); checked against the estimated memory of the largest "
            "configuration."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when there is one"
    )
    stop_grace_seconds: float = Field(
        5.0, ge=0, description="after SIGTERM (warm: SIGUSR1), before SIGKILL"
    )
    reuse_workers: bool = Field(
        True,
        description=(
            "One process per slot imports and loads the base model once and trains trial after "
            "trial (one-process, unquantized trials; others always start cold)."
        ),
    )
    trial_timeout_minutes: float | None = Field(
        None, gt=0, description="a trial running longer is stopped and failed; null: no limit"
    )
    stall_minutes: float | None = Field(
        None,
        gt=0,
        description="a trial whose worker sends no report for this long is hung: it is failed, "
        "its worker killed and its configuration queued again; null: 10 x the slowest interval "
        "between reports seen, at least 10 minutes",
    )
    max_memory_gb: float | None = Field(
        None, gt=0, description="refuse configurations estimated above it"
    )
    heartbeat_seconds: float = Field(
        10.0, gt=0, description="a running trial's heartbeat in the storage"
    )
    stale_after_seconds: float = Field(
        60.0, gt=0, description="no heartbeat this long: its worker is lost"
    )


class TrackingConfig(_Strict):
    enabled: bool = Field(True, description="`tracking: none` turns MLflow off")
    uri: str | None = Field(
        None, description="default: MLFLOW_TRACKING_URI, else sqlite:///<study dir>/mlflow.db"
    )
    experiment: str | None = Field(None, description="default: the study name")
    log_adapters: Literal["answer", "best", "all", "none"] = Field(
        "answer",
        description=(
            "trained adapters kept in MLflow: `answer` = the best and the recommended trial's"
        ),
    )
    registered_model: str | None = Field(
        None,
        alias="register",
        description=(
            "the recommended trial's adapter is also logged as an MLflow model under the parent "
            "run (unless log_adapters is none); a NAME here registers it in the Model Registry "
            "`register: NAME`"
        ),
    )
    system_metrics_seconds: float | None = Field(
        2.0,
        gt=0,
        description=(
            "MLflow system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on every "
            "trial run, sampled this often; null turns them off"
        ),
    )

    @field_validator("registered_model")
    @classmethod
    def _model_name(cls, name: str | None) -> str | None:
        if name is not None and (not name.strip() or "/" in name or ":" in name):
            raise ValueError(
                f"{name!r} is not a registered model name: give a non-empty name without "
                "'/' or ':', e.g. register: cls-task-lora"
            )
        return name


class ReportConfig(_Strict):
    tolerance: Literal["1se", "1se-mean"] | Annotated[float, Field(ge=0)] = Field(
        "1se",
        description=(
            "'As good as the best': within `tolerance` of the best val loss. `1se` (the default) "
            "is one standard error of the difference (candidate - best), paired over the same "
            "validation examples, plus seed noise once a confirmation round measured it; "
            "`1se-mean` is one standard error of the best trial's mean val loss (the earlier "
            "rule); a number is an absolute val-loss margin."
        ),
    )


class ConfirmConfig(_Strict):
    top: int = Field(
        3,
        gt=0,
        description=(
            "After the search, `run` trains the top configurations (and the recommendation) again"
            " with more seeds at the full budget; `ranksearch confirm` does the same on demand. "
            "best distinct configurations to confirm"
        ),
    )
    seeds: int = Field(3, ge=2, description="samples per configuration, the search trial included")


class StudyConfig(_Strict):
    """A whole study file."""

    study_name: str = Field(
        description="the Optuna study and MLflow experiment name; default: the file's name"
    )
    task: Literal["sequence-classification", "causal-lm"] = Field(
        "sequence-classification",
        description="what the base model is trained for: a classification head, or next-token SFT",
    )
    model: ModelConfig = Field(
        description="the base model; a string is shorthand for `{path: ...}`"
    )
    data: DataConfig = Field(
        description="the dataset, its columns and how it is split and tokenized"
    )
    search: SearchConfig = Field(
        default_factory=SearchConfig,
        description=(
            "the search space: a list is choices, `{low, high, log}` a range, a value is fixed"
        ),
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="how every trial trains (the learning rate comes from the search)",
    )
    pruner: PrunerConfig = Field(
        default_factory=PrunerConfig,
        description="how weak trials are stopped early, in optimizer steps",
    )
    sampler: SamplerConfig = Field(
        default_factory=SamplerConfig,
        description="how the next configuration is chosen; a string is shorthand for `{type: ...}`",
    )
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="when the search stops")
    launch: LaunchConfig = Field(
        default_factory=LaunchConfig,
        description=(
            "how trials are started: processes, GPUs, parallel trials, warm workers, liveness"
        ),
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="MLflow; `tracking: none` turns it off, a string is the tracking URI",
    )
    report: ReportConfig = Field(
        default_factory=ReportConfig, description="how the answer is chosen"
    )
    confirm: ConfirmConfig | None = Field(
        None, description="set it to confirm automatically after the search"
    )
    enqueue: list[dict[str, Scalar]] = Field(
        default_factory=list,
        description=(
            "configurations evaluated first (after the informed trial), e.g. the usual defaults "
            "for comparison: `[{rank: 8, alpha: 8, target_modules: qv}]`"
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        # `model: <path>` and `sampler: grid` are shorthands for the full mappings.
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("model"), str):
                data["model"] = {"path": data["model"]}
            if isinstance(data.get("sampler"), str):
                data["sampler"] = {"type": data["sampler"]}
            if isinstance(data.get("pruner"), str):
                data["pruner"] = {"type": data["pruner"]}
            if data.get("tracking") in ("none", False):
                data["tracking"] = {"enabled": False}
            elif isinstance(data.get("tracking"), str):
                data["tracking"] = {"uri": data["tracking"]}
        return data
