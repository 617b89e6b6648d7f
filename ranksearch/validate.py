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


def data_problems(cfg: StudyConfig, model_ok: bool = True) -> list[Problem]:
    problems = []
    sources = [("data.source", cfg.data.source)]
    if cfg.data.validation:
        sources.append(("data.validation", cfg.data.validation))
    for key, source in sources:
        try:
            frame, _, _ = label_frame(cfg.data, read_frame(cfg.data, source, key), cfg.task, key)
        except DataError as e:
            problems.append((e.key, str(e).split(": ", 1)[1]))
            continue
        if model_ok and cfg.task == "causal-lm" and cfg.data.format != "text":
            problems += example_problems(cfg, frame, key)
    return list(dict.fromkeys(problems))


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


def resource_problems(cfg: StudyConfig, storage_url: str | None = None) -> list[Problem]:
    """Every problem with the model, the data and the storage, collected (not the first)."""
    problems = model_problems(cfg)
    problems += data_problems(cfg, model_ok=not any(k == "model.path" for k, _ in problems))
    if storage_url:
        try:
            check_storage(storage_url)
        except StorageError as e:
            problems.append(("--storage", str(e).removeprefix("`--storage` ")))
    return problems
