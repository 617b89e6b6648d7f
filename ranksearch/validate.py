"""Checks that need the model, the data or the storage; run before anything is launched.

The model is built from its config on the `meta` device (no weights are read), so checking that
every target module exists as a Linear layer takes a second even for large models.
"""

from __future__ import annotations

from ranksearch.config import StudyConfig
from ranksearch.data import DataError, label_frame, read_frame
from ranksearch.paths import PathError
from ranksearch.space import module_sets
from ranksearch.storage import StorageError, check_storage

Problem = tuple[str, str]


def linear_modules(cfg: StudyConfig) -> dict[str, str]:
    """Module name -> class name for every module of the model (built on `meta`)."""
    from ranksearch.estimate import build_skeleton

    return {name: type(m).__name__ for name, m in build_skeleton(cfg).named_modules() if name}


def _is_linear(class_name: str) -> bool:
    return class_name in ("Linear", "Conv1D") or class_name.endswith("Linear")


def module_problems(cfg: StudyConfig, modules: dict[str, str]) -> list[Problem]:
    linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, c in modules.items() if _is_linear(c)})
    problems = []
    for set_name, names in module_sets(cfg.search).items():
        if names == "all-linear":
            continue
        for name in names:
            hits = [c for n, c in modules.items() if n == name or n.endswith("." + name)]
            key = f"search.target_modules.{set_name}"
            if not hits:
                problems.append(
                    (
                        key,
                        f"`{name}` is not a module of the model; Linear layers "
                        f"are: {', '.join(linear_leaves)}",
                    )
                )
            elif not any(_is_linear(c) for c in hits):
                problems.append(
                    (
                        key,
                        f"`{name}` is a {hits[0]}, not a Linear layer; use one of "
                        f"{', '.join(linear_leaves)}",
                    )
                )
    return problems


def model_problems(cfg: StudyConfig) -> list[Problem]:
    try:
        modules = linear_modules(cfg)
    except PathError as e:
        return [("model.path", str(e))]
    except Exception as e:  # noqa: BLE001 - from_pretrained raises many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return [
            (
                "model.path",
                f"cannot load the model config from {cfg.model.path!r}: {first}. "
                "Give a local directory, package://pkg/dir, or a hub id (needs network)",
            )
        ]
    problems = module_problems(cfg, modules)
    if cfg.model.quantization == "4bit":
        import torch

        if not torch.cuda.is_available():
            problems.append(
                (
                    "model.quantization",
                    "4bit (QLoRA) needs a CUDA GPU and none is "
                    "visible here; set `model.quantization: none` on CPU",
                )
            )
    return problems


def data_problems(
    cfg: StudyConfig, model_ok: bool = True, warnings: list[str] | None = None
) -> list[Problem]:
    """Problems with the data files; rows dropped as empty are added to `warnings`."""
    problems = []
    sources = [("data.source", cfg.data.source)]
    if cfg.data.validation:
        sources.append(("data.validation", cfg.data.validation))
    for key, source in sources:
        try:
            frame, counts, _ = label_frame(
                cfg.data, read_frame(cfg.data, source, key), cfg.task, key
            )
        except DataError as e:
            problems.append((e.key, str(e).split(": ", 1)[1]))
            continue
        problem, warning = empty_rows(cfg, counts, key)
        problems += [problem] if problem else []
        if warning and warnings is not None:
            warnings.append(warning)
        if model_ok and cfg.task == "causal-lm" and cfg.data.format != "text":
            problems += example_problems(cfg, frame, key)
    return list(dict.fromkeys(problems))


MAX_EMPTY_SHARE = 0.5  # past this share of empty rows, the column is more likely wrong than sparse


def _text_key(cfg: StudyConfig) -> tuple[str, str]:
    """The key whose column(s) an empty row is empty in, and those columns in words."""
    if cfg.task == "causal-lm" and cfg.data.format != "text":
        from ranksearch.sft import columns_key

        return columns_key(cfg.data), "a column its templates name"
    return "data.text_column", repr(cfg.data.text_column)


def empty_rows(
    cfg: StudyConfig, counts: dict[str, int], where: str
) -> tuple[Problem | None, str | None]:
    """A warning when rows of `where` were dropped as empty; a problem when most of them were."""
    empty, rows = counts.get("dropped_empty", 0), counts.get("rows", 0)
    if not empty:
        return None, None
    key, column = _text_key(cfg)
    said = f"{empty:,} of {rows:,} rows of `{where}` dropped: {column} is empty in them"
    if empty <= MAX_EMPTY_SHARE * rows:
        return None, said
    fix = (
        f"more than {MAX_EMPTY_SHARE:.0%} of the rows: point `{key}` at the column that holds "
        "the texts, or remove the empty rows from the file"
    )
    return (key, f"{said}; {fix}"), said


def empty_warnings(cfg: StudyConfig, counts: dict[str, int]) -> list[str]:
    """The warnings of `empty_rows` for prepared data (validation counts are prefixed)."""
    said = []
    for where, prefix in (("data.source", ""), ("data.validation", "validation_")):
        part = {k: counts.get(prefix + k, 0) for k in ("rows", "dropped_empty")}
        said.append(empty_rows(cfg, part, where)[1])
    return [w for w in said if w]


def example_problems(cfg: StudyConfig, frame, where: str, sample: int = 500) -> list[Problem]:
    """Causal-LM formats on a seeded sample of rows: a chat template to render with, an
    assistant turn in every conversation, completions that survive `max_length`."""
    from ranksearch.data import load_tokenizer
    from ranksearch.sft import ExampleError, build_examples, conversation, truncation_problem

    if isinstance(cfg.data.messages, str):  # every row's turns, before any tokenizing
        try:
            for pos, row in enumerate(frame[[cfg.data.messages]].to_dict("records")):
                conversation(cfg.data, row, f"{where} row {pos}")
        except ExampleError as e:
            return [(e.key, str(e))]

    tok = load_tokenizer(cfg)
    if cfg.data.format == "messages" and not tok.chat_template:
        return [
            (
                "data.format",
                f"the tokenizer of {cfg.model.path} has no chat template to render messages "
                "with; use format prompt-completion, or a model that ships a chat template",
            )
        ]
    rows = frame.sample(n=min(sample, len(frame)), random_state=cfg.training.seed)
    try:
        examples = build_examples(cfg.data, rows, tok, where)
    except ExampleError as e:
        return [(e.key, str(e))]
    message = truncation_problem(cfg.data, examples, len(rows))
    return [("data.max_length", message)] if message else []


def resource_problems(
    cfg: StudyConfig, storage_url: str | None = None, warnings: list[str] | None = None
) -> list[Problem]:
    """Every problem with the model, the data and the storage, collected (not the first);
    what is accepted but worth saying (rows dropped as empty) is added to `warnings`."""
    problems = model_problems(cfg)
    model_ok = not any(k == "model.path" for k, _ in problems)
    problems += data_problems(cfg, model_ok, warnings)
    if storage_url:
        try:
            check_storage(storage_url)
        except StorageError as e:
            problems.append(("--storage", str(e).removeprefix("`--storage` ")))
    return problems


def resolve_device(device: str) -> str:
    """`launch.device` as trials get it: `auto` is cuda when a GPU is visible, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def available_memory_gb(device: str) -> float | None:
    """The memory a trial can have here: one GPU's (the first visible), or on CPU what the
    kernel reports available now (MemAvailable); None where it cannot be read."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def packed_memory(cfg: StudyConfig, device: str) -> dict[str, float]:
    """What `plan_slots` checks `launch.trials_per_gpu` against: one GPU's memory and the
    largest configuration's estimate (nothing to check unless trials share a GPU)."""
    if device != "cuda" or cfg.launch.trials_per_gpu == 1:
        return {"trials_per_gpu": cfg.launch.trials_per_gpu}
    from ranksearch.estimate import estimate_space

    worst = max(e.memory_estimate_mb for e in estimate_space(cfg))
    return {
        "trials_per_gpu": cfg.launch.trials_per_gpu,
        "gpu_memory_gb": available_memory_gb(device),
        "trial_memory_gb": worst / 1024,
    }


def memory_problems(cfg: StudyConfig, device: str, available_gb: float | None) -> list[Problem]:
    """Refuse a study whose largest configuration would not fit: `launch.max_memory_gb` when
    set, else `available_gb` (CPU trials run side by side share it)."""
    from ranksearch.estimate import estimate_space

    limit = cfg.launch.max_memory_gb or available_gb
    if limit is None:
        return []
    worst = max(estimate_space(cfg), key=lambda e: e.memory_estimate_mb)
    parallel = (cfg.launch.parallel_trials or 1) if device == "cpu" and available_gb else 1
    need = worst.memory_estimate_mb / 1024 * (1 if cfg.launch.max_memory_gb else parallel)
    if need <= limit:
        return []
    what = (
        f"rank {worst.rank} on {worst.target_modules} needs about "
        f"{worst.memory_estimate_mb / 1024:.1f} GB to train at batch "
        f"{cfg.training.batch_size} x {cfg.data.max_length} tokens (ranksearch estimate)"
    )
    smaller = "lower the largest rank, the batch size or max_length"
    if cfg.launch.max_memory_gb:
        return [("launch.max_memory_gb", f"{what}; {smaller}, or raise the limit")]
    times = f" x {parallel} parallel trials" if parallel > 1 else ""
    where = "on the GPU" if device == "cuda" else "available on this machine now"
    return [
        (
            "search.rank",
            f"{what}{times}, more than the {limit:.1f} GB {where}; {smaller}, or set "
            "`launch.max_memory_gb` to check against the machine that will run it",
        )
    ]
