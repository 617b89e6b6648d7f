"""A study file as typed pydantic models: load, apply `--set` overrides, validate once.

Every problem in a study file is collected into one `StudyError` that names each key path and
how to fix it, so a user fixes the file in one pass. Nothing is launched or written before this
passes. `validate.check_study` adds what needs the model, the data and the machine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ranksearch.config.paths import resolve_study_file
from ranksearch.config.problems import Problem, StudyError
from ranksearch.config.space import Range, space_problems
from ranksearch.data.sft import format_problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Scalar = bool | int | float | str
# A dimension is fixed (one value), a list of choices, or a range.
Choice = Annotated[list[Scalar], Field(min_length=1)]
Dimension = Range | Choice | Scalar
ModuleSet = Literal["all-linear"] | Annotated[list[str], Field(min_length=1)]


class ModelConfig(_Strict):
    path: str = Field(description="hub id, local directory, or package://pkg/sub/dir")
    quantization: Literal["none", "4bit"] = "none"  # 4bit = QLoRA (NF4, double quant); CUDA only
    trust_remote_code: bool = False  # never run code shipped with a model unless asked


class MessageTemplate(_Strict):
    """One turn of a conversation built from a row: `{role: user, content: "Tweet: {text}"}`."""

    role: Literal["system", "user", "assistant"]
    content: str  # a template over the row's columns: `{column}`; `{{` for a literal brace


class DataConfig(_Strict):
    source: str  # hub dataset id, a local csv/tsv/json/jsonl/parquet file, or package://...
    validation: str | None = None  # a validation file, or a split name for hub datasets
    config_name: str | None = None  # hub dataset configuration
    split: str = "train"  # hub split used for training
    encoding: str = "utf-8"  # text encoding of csv/tsv files (e.g. latin-1)
    quoting: Literal["minimal", "none"] = "minimal"  # csv quoting; `none` for raw TSV like SST-2
    # causal-lm only. `text`: loss on every token of `text_column`. `prompt-completion`: loss on
    # the completion (EOS appended). `messages`: rendered with the tokenizer's chat template, loss
    # on the assistant turns.
    format: Literal["text", "prompt-completion", "messages"] = "text"
    prompt: str | None = None  # a column, or a template over columns: "Tweet: {text}\nSentiment:"
    completion: str | None = None  # a column, or a template: " {sentiment}"
    # a column holding [{role, content}, ...] (chat JSONL), or the turns as templates over columns
    messages: str | Annotated[list[MessageTemplate], Field(min_length=1)] | None = None
    text_column: str = "text"
    # Classification: the class column. Causal-lm: with `labels`, only these values are kept and
    # the validation split is stratified by them.
    label_column: str = "label"
    labels: dict[str, int] | None = None  # raw label -> class id; unmapped rows are dropped
    validation_fraction: float = Field(0.1, gt=0, lt=1)  # held out when no validation source
    max_length: int = Field(128, gt=0)  # tokens; longer texts are truncated
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _label_keys_as_str(cls, data: Any) -> Any:
        # YAML reads `{0: 0, 1: 1}` with int keys; labels are matched as strings.
        if isinstance(data, dict) and isinstance(data.get("labels"), dict):
            data = {**data, "labels": {str(k): v for k, v in data["labels"].items()}}
        return data


class SearchConfig(_Strict):
    rank: Dimension = Field(default_factory=lambda: [4, 8, 16, 32])
    alpha: Dimension | None = None  # absolute lora_alpha values
    alpha_ratio: Dimension | None = None  # lora_alpha = ratio * rank (default [1, 2])
    dropout: Dimension = 0.05
    target_modules: dict[str, ModuleSet] | ModuleSet = Field(
        default_factory=lambda: {"qv": ["query", "value"]}
    )
    learning_rate: Dimension = Field(default_factory=lambda: Range(low=1e-4, high=3e-3, log=True))
    use_rslora: Dimension = False
    use_dora: Dimension = False
    init_lora_weights: Dimension = True

    @model_validator(mode="after")
    def _alpha(self) -> SearchConfig:
        if self.alpha is not None and self.alpha_ratio is not None:
            raise ValueError(
                "can't provide both `search.alpha` and `search.alpha_ratio`; choose one"
            )
        return self


class TrainingConfig(_Strict):
    max_steps: int = Field(300, gt=0)  # optimizer steps of a full-budget trial
    eval_every: int = Field(25, gt=0)  # optimizer steps between evaluations (= reports)
    batch_size: int = Field(16, gt=0)  # per process
    eval_batch_size: int | None = Field(None, gt=0)  # default: 2 * batch_size
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16/fp16 on GPU

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    gradient_checkpointing: bool = False
    # Training batches of similar lengths: each run of 50 batches of the shuffle sorted by length,
    # its batches served in random order. About 1.5x faster on tweets, but it changes which
    # configurations win (BENCHMARKS.md, section 3): off unless speed matters more.
    group_by_length: bool = False
    # causal-lm: each training batch's examples share rows (position ids restart per example, so
    # attention stays inside each one) instead of being padded; the same examples per step and
    # the same loss. Rows hold at most `packing_length` tokens (default: the whole batch in one).
    packing: bool = False
    packing_length: int | None = Field(None, gt=0)


class PrunerConfig(_Strict):
    type: Literal["hyperband", "successive-halving", "median", "none"] = "hyperband"
    # first rung (hyperband/SH) or warmup (median), in optimizer steps; default: derived,
    # max_steps / reduction_factor at the nearest evaluation step (sampling.first_rung)
    min_steps: int | None = Field(None, gt=0)
    reduction_factor: int = Field(3, ge=2)


class SamplerConfig(_Strict):
    type: Literal["tpe", "random", "grid", "bruteforce"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(5, ge=0)  # TPE: random trials before modelling
    # tpe: a new study first runs the configuration published LoRA guidance favours
    # (all-linear, alpha = 2 x rank, rank 16 or 8, the log-middle learning rate), snapped to
    # the space and skipped when outside it; then the `enqueue:` baselines, then the sampler.
    informed_start: bool = True


class BudgetConfig(_Strict):
    n_trials: int = Field(20, gt=0)  # finished (complete + pruned) trials in the whole study
    max_consecutive_failures: int = Field(3, gt=0)
    # A trial whose worker was lost (orchestrator killed, machine gone: found by its heartbeat
    # or its dead pid) is failed and its configuration queued again, at most this many times.
    retry_failed: int = Field(1, ge=0)


class LaunchConfig(_Strict):
    num_processes: int = Field(1, gt=0)  # accelerate ranks per trial
    gpus_per_trial: int = Field(1, gt=0)  # on GPU, each trial runs one rank per GPU
    parallel_trials: int | None = Field(None, gt=0)  # default: visible GPUs // gpus_per_trial
    # Several one-GPU trials share each GPU, each its own process (small models leave a large
    # GPU mostly idle); checked against the estimated memory of the largest configuration.
    trials_per_gpu: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stop_grace_seconds: float = Field(5.0, ge=0)  # after SIGTERM (warm: SIGUSR1), before SIGKILL
    # One process per slot imports and loads the base model once and trains trial after trial
    # (one-process, unquantized trials; others always start cold).
    reuse_workers: bool = True
    trial_timeout_minutes: float | None = Field(None, gt=0)
    max_memory_gb: float | None = Field(None, gt=0)  # refuse configurations estimated above it
    heartbeat_seconds: float = Field(10.0, gt=0)  # a running trial's heartbeat in the storage
    stale_after_seconds: float = Field(60.0, gt=0)  # no heartbeat this long: its worker is lost


class TrackingConfig(_Strict):
    enabled: bool = True  # `tracking: none` turns MLflow off
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<study dir>/mlflow.db
    experiment: str | None = None  # default: the study name
    # trained adapters kept in MLflow: `answer` = the best and the recommended trial's
    log_adapters: Literal["answer", "best", "all", "none"] = "answer"
    # the recommended trial's adapter is also logged as an MLflow model under the parent run
    # (unless log_adapters is none); a NAME here registers it in the Model Registry
    registered_model: str | None = Field(None, alias="register")  # `register: NAME`
    # MLflow system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on every trial
    # run, sampled this often; null turns them off
    system_metrics_seconds: float | None = Field(2.0, gt=0)

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
    # "As good as the best": within `tolerance` of the best val loss. `1se` (the default) is
    # one standard error of the difference (candidate - best), paired over the same validation
    # examples, plus seed noise once a confirmation round measured it; `1se-mean` is one
    # standard error of the best trial's mean val loss (the earlier rule); a number is an
    # absolute val-loss margin.
    tolerance: Literal["1se", "1se-mean"] | Annotated[float, Field(ge=0)] = "1se"


class ConfirmConfig(_Strict):
    # After the search, `run` trains the top configurations (and the recommendation) again with
    # more seeds at the full budget; `ranksearch confirm` does the same on demand.
    top: int = Field(3, gt=0)  # best distinct configurations to confirm
    seeds: int = Field(3, ge=2)  # samples per configuration, the search trial included


class StudyConfig(_Strict):
    """A whole study file."""

    study_name: str
    task: Literal["sequence-classification", "causal-lm"] = "sequence-classification"
    model: ModelConfig
    data: DataConfig
    search: SearchConfig = Field(default_factory=SearchConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    confirm: ConfirmConfig | None = None  # set it to confirm automatically after the search
    enqueue: list[dict[str, Scalar]] = Field(default_factory=list)

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


def file_problems(cfg: StudyConfig) -> list[Problem]:
    """What the file alone shows: rules that span sections, the causal-LM formats and the
    search space (`space.space_problems`)."""
    problems: list[Problem] = []
    t, p = cfg.training, cfg.pruner
    if t.eval_every > t.max_steps:
        problems.append(
            ("training.eval_every", f"{t.eval_every} > max_steps {t.max_steps}; lower it")
        )
    if p.type != "none" and p.min_steps is not None and p.min_steps > t.max_steps:
        problems.append(
            ("pruner.min_steps", f"{p.min_steps} > training.max_steps {t.max_steps}; lower it")
        )
    if p.type != "none" and p.min_steps is not None and p.min_steps < t.eval_every:
        problems.append(
            (
                "pruner.min_steps",
                f"{p.min_steps} < training.eval_every {t.eval_every}: no report arrives before "
                "the first rung; set it to a multiple of eval_every",
            )
        )
    problems += format_problems(cfg)
    if cfg.data.labels is not None and len(set(cfg.data.labels.values())) < 2:
        problems.append(("data.labels", "map at least two classes, e.g. {neg: 0, pos: 1}"))
    if cfg.data.labels and sorted(set(cfg.data.labels.values())) != list(
        range(len(set(cfg.data.labels.values())))
    ):
        problems.append(("data.labels", "class ids must be 0..K-1 without gaps"))
    if cfg.launch.stale_after_seconds <= 2 * cfg.launch.heartbeat_seconds:
        problems.append(
            (
                "launch.stale_after_seconds",
                f"{cfg.launch.stale_after_seconds:g} must exceed twice heartbeat_seconds "
                f"({cfg.launch.heartbeat_seconds:g}), or live trials would be failed as lost",
            )
        )
    if cfg.tracking.registered_model and cfg.tracking.log_adapters == "none":
        problems.append(
            (
                "tracking.register",
                "registers the logged model, but `tracking.log_adapters: none` logs none; "
                "set log_adapters to answer, or drop register",
            )
        )
    if cfg.launch.device == "cpu" and cfg.model.quantization == "4bit":
        problems.append(("model.quantization", "4bit needs CUDA; use `none` on CPU"))
    problems += space_problems(cfg)
    return problems


def _format_pydantic(err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        # Drop the union-branch names pydantic inserts ("list[...]", "Range") from the path.
        loc = [
            str(x)
            for x in e["loc"]
            if not re.search(r"[\[\]]|^(Range|str|int|float|bool)$", str(x))
        ]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling or remove it (see search_spaces/cls-task.yaml)"
        elif e["type"] == "missing":
            msg = "required key is missing; add it"
        problems.append(Problem(".".join(loc), msg))
    # A union reports one error per branch; keep each distinct (path, message) once.
    return list(dict.fromkeys(problems))


def set_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `--set key.sub=value`; the value is parsed as YAML (`8`, `true`, `[4, 8]`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise StudyError([("--set", f"expected key.sub=value, got {assignment!r}")], "--set")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else {"type": child} if isinstance(child, str) else None
            if child is None:
                raise StudyError([(key, f"`{part}` is not a mapping; cannot set {key}")], "--set")
            node[part] = child
        node = child
    node[parts[-1]] = _yaml_value(key, raw)


def _yaml_value(key: str, raw: str) -> Any:
    """A `--set` value parsed as YAML; a malformed one is a StudyError naming the option."""
    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise StudyError(
            [
                (
                    f"--set {key}",
                    f"{raw!r} is not valid YAML ({why}); close brackets and quotes, and quote "
                    "the whole assignment for the shell: --set 'search.rank=[4, 8]'",
                )
            ],
            "--set",
        ) from None


def read_study(
    study: str | Path, overrides: list[str] = (), search_dirs: list[Path] | None = None
) -> tuple[dict[str, Any], Path]:
    """Resolve and read a study file with its `--set` overrides: the raw mapping and its path.

    Raises `StudyError` when the file is not a YAML mapping or an override is malformed.
    """
    path = resolve_study_file(str(study), search_dirs)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise StudyError([("", f"not valid YAML: {e}")], str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StudyError([("", "a study file must be a YAML mapping of keys")], str(path))
    data.setdefault("study_name", path.stem)
    for assignment in overrides:
        set_override(data, assignment)
    return data, path


def typed_as_far_as_possible(data: dict[str, Any]) -> tuple[StudyConfig | None, list[Problem]]:
    """The study typed, and its schema problems. Keys at fault fall back to their defaults, so
    that the checks after the schema still run and every problem is said at once; None when a
    required key is at fault (nothing sensible to check then)."""
    problems: list[Problem] = []
    for _ in range(4):  # each pass removes the keys at fault; a default never fails twice
        try:
            return StudyConfig.model_validate(data), problems
        except ValidationError as e:
            problems += [p for p in _format_pydantic(e) if p not in problems]
            data = _without(data, [err["loc"] for err in e.errors()])
            if data is None:
                return None, problems
    return None, problems


def _without(data: dict[str, Any], locs: list[tuple]) -> dict[str, Any] | None:
    """`data` without the deepest mapping key of each error location; None when a location
    names no key that is there (a required key is missing)."""
    import copy

    data = copy.deepcopy(data)
    for loc in locs:
        node, key = data, None
        for part in loc:
            if not isinstance(node, dict) or str(part) not in node:
                break
            parent, key, node = node, str(part), node[str(part)]
        if key is None or key in REQUIRED:
            return None
        parent.pop(key, None)
    return data


REQUIRED = {"model", "data", "study_name"}  # without them no later check means anything


def parse_study(
    study: str | Path, overrides: list[str] = (), search_dirs: list[Path] | None = None
) -> tuple[StudyConfig, Path, list[Problem]]:
    """Resolve, read and type-check a study file; return it with the problems the file alone
    shows (`file_problems`).

    Raises `StudyError` when the file cannot be typed at all (YAML, unknown keys, wrong types).
    """
    data, path = read_study(study, overrides, search_dirs)
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as e:
        raise StudyError(_format_pydantic(e), str(path)) from None
    return cfg, path, file_problems(cfg)


def load_study(
    study: str | Path, overrides: list[str] = (), search_dirs: list[Path] | None = None
) -> tuple[StudyConfig, Path]:
    """Resolve, read and validate a study file; raise `StudyError` listing every problem the
    file alone shows (`validate.check_study` adds the model, the data and the machine)."""
    cfg, path, problems = parse_study(study, overrides, search_dirs)
    if problems:
        raise StudyError(problems, str(path))
    return cfg, path
