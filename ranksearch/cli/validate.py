"""Every check of a study before anything runs: `check_study` gathers them into one StudyError.

The file's own rules come from `config.py` (schema, cross-field rules) and `space.py` (the search
space); this module adds what needs the model, the data, the storage, the tracking store and the
machine (memory, GPU slots). The model is built from its config on the `meta` device (no weights
are read), so checking that every target module exists as a Linear layer takes a second even
for large models.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ranksearch.config.load import file_problems, read_study, typed_as_far_as_possible
from ranksearch.config.paths import PathError, out_problems, study_dir
from ranksearch.config.problems import Problem, StudyError
from ranksearch.config.schema import StudyConfig
from ranksearch.config.space import module_sets
from ranksearch.data.empty import empty_rows, row_warnings
from ranksearch.data.prepare import DataError, label_frame, read_frame
from ranksearch.search.packing import (
    SlotError,
    Slots,
    available_memory_gb,
    local_gpus,
    memory_problems,
    packed_memory,
    plan_slots,
    resolve_device,
    usable_cpus,
)
from ranksearch.search.storage import StorageError, check_storage, default_storage_url


def linear_modules(cfg: StudyConfig) -> dict[str, str]:
    """Module name -> class name for every module of the model (built on `meta`)."""
    from ranksearch.data.estimate import build_skeleton

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
                    Problem(
                        key,
                        f"`{name}` is not a module of the model; Linear layers "
                        f"are: {', '.join(linear_leaves)}",
                    )
                )
            elif not any(_is_linear(c) for c in hits):
                problems.append(
                    Problem(
                        key,
                        f"`{name}` is a {hits[0]}, not a Linear layer; use one of "
                        f"{', '.join(linear_leaves)}",
                    )
                )
    return problems


def model_problems(cfg: StudyConfig, check_modules: bool = True) -> list[Problem]:
    """The model loads (its config, on `meta`); with `check_modules`, the target modules
    exist."""
    try:
        modules = linear_modules(cfg)
    except PathError as e:
        return [Problem("model.path", str(e))]
    except Exception as e:  # noqa: BLE001 - from_pretrained raises many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return [
            Problem(
                "model.path",
                f"cannot load the model config from {cfg.model.path!r}: {first}. "
                "Give a local directory, package://pkg/dir, or a hub id (needs network)",
            )
        ]
    problems = module_problems(cfg, modules) if check_modules else []
    if cfg.model.quantization == "4bit":
        import torch

        if not torch.cuda.is_available():
            problems.append(
                Problem(
                    "model.quantization",
                    "4bit (QLoRA) needs a CUDA GPU and none is "
                    "visible here; set `model.quantization: none` on CPU",
                )
            )
    return problems


def data_problems(
    cfg: StudyConfig, model_ok: bool = True, warnings: list[str] | None = None
) -> list[Problem]:
    """Problems with the data files; what is accepted but worth saying (rows dropped as
    empty, a text column of numbers) is added to `warnings`."""
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
            problems.append(Problem(e.key, e.message))
            continue
        problem = empty_rows(cfg, counts, key)[0]
        problems += [problem] if problem else []
        if warnings is not None:
            warnings += row_warnings(cfg, counts, key)
        if model_ok and cfg.task == "causal-lm" and cfg.data.format != "text":
            problems += example_problems(cfg, frame, key)
    return list(dict.fromkeys(problems))


def example_problems(cfg: StudyConfig, frame, where: str, sample: int = 500) -> list[Problem]:
    """Causal-LM formats on a seeded sample of rows: a chat template to render with, an
    assistant turn in every conversation, completions that survive `max_length`."""
    from ranksearch.data.prepare import load_tokenizer
    from ranksearch.data.sft import ExampleError, build_examples, conversation, truncation_problem

    if isinstance(cfg.data.messages, str):  # every row's turns, before any tokenizing
        try:
            for pos, row in enumerate(frame[[cfg.data.messages]].to_dict("records")):
                conversation(cfg.data, row, f"{where} row {pos}")
        except ExampleError as e:
            return [Problem(e.key, str(e))]

    tok = load_tokenizer(cfg)
    if cfg.data.format == "messages" and not tok.chat_template:
        return [
            Problem(
                "data.format",
                f"the tokenizer of {cfg.model.path} has no chat template to render messages "
                "with; use format prompt-completion, or a model that ships a chat template",
            )
        ]
    rows = frame.sample(n=min(sample, len(frame)), random_state=cfg.training.seed)
    try:
        examples = build_examples(cfg.data, rows, tok, where)
    except ExampleError as e:
        return [Problem(e.key, str(e))]
    message = truncation_problem(cfg.data, examples, len(rows))
    return [Problem("data.max_length", message)] if message else []


def at_fault(problems: list[Problem], *keys: str) -> bool:
    """Whether a problem names one of `keys` or a key inside one (`data` covers
    `data.prompt`): a check that reads a key at fault would judge a stand-in, or crash on it."""
    return any(p.key == k or p.key.startswith(k + ".") for p in problems for k in keys)


def resource_problems(
    cfg: StudyConfig,
    storage_url: str | None = None,
    warnings: list[str] | None = None,
    file_problems: list[Problem] = (),
) -> list[Problem]:
    """Every problem with the model, the data and the storage, collected (not the first);
    what is accepted but worth saying (rows dropped as empty) is added to `warnings`. The
    checks of a section `file_problems` already faults wait until it is fixed."""
    problems = model_problems(cfg, not at_fault(file_problems, "search.target_modules"))
    model_ok = not any(k == "model.path" for k, _ in problems)
    if not at_fault(file_problems, "task", "data"):
        problems += data_problems(cfg, model_ok, warnings)
    if storage_url:
        try:
            check_storage(storage_url)
        except StorageError as e:
            problems.append(Problem(e.key, e.message))
    return problems


def tracking_problems(
    cfg: StudyConfig, out: Path, uri_option: str | None, out_ok: bool = True
) -> list[Problem]:
    """The MLflow store this study logs to must be reachable. A default store inside a bad
    `--out` is `--out`'s fault, said once (`out_ok` False)."""
    from ranksearch.tracking.store import (
        TrackingError,
        check_tracking,
        default_tracking_uri,
        tracking_uri,
    )

    uri = tracking_uri(cfg, out, uri_option)
    if not out_ok and uri == default_tracking_uri(out):
        return []
    try:
        check_tracking(uri)
    except TrackingError as e:
        return [Problem(e.key, e.message)]
    return []


@dataclass(frozen=True)
class CheckedStudy:
    """A study that passed every check, with what the checks worked out on the way."""

    cfg: StudyConfig
    path: Path  # the study file
    out: Path  # the study directory, absolute
    storage_url: str
    device: str = "cpu"  # `launch.device` resolved
    gpus: list[str] = field(default_factory=list)  # the GPUs trials may use here
    slots: Slots | None = None  # None when only the schema was checked
    warnings: list[str] = field(default_factory=list)  # accepted, but worth saying


def check_study(
    study: str | Path,
    overrides: list[str] = (),
    *,
    out: Path | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    mlflow: bool = True,
    schema_only: bool = False,
) -> CheckedStudy:
    """Every problem a study has before anything runs, in one `StudyError`: the schema, the
    file's own rules and search space, `--out`, the model, the data, the storage (when given),
    the tracking store, the memory and the trial slots. Writes nothing."""
    data, path = read_study(study, overrides)
    cfg, problems = typed_as_far_as_possible(data)
    if cfg is None:
        raise StudyError(problems, str(path))
    at_fault_in_schema = {p.key for p in problems}  # now their defaults: not the user's values
    problems += [p for p in file_problems(cfg) if p.key not in at_fault_in_schema]
    out = study_dir(cfg.study_name, out)
    checked = CheckedStudy(cfg, path, out, storage or default_storage_url(out))
    if not schema_only:
        checked = _machine_checks(checked, problems, storage, tracking_uri, mlflow)
    if problems:
        raise StudyError(list(dict.fromkeys(problems)), str(path))
    return checked


def _machine_checks(
    checked: CheckedStudy,
    problems: list[Problem],
    storage: str | None,
    uri_option: str | None,
    mlflow: bool,
) -> CheckedStudy:
    """The checks that read the model, the data, the stores and this machine; each problem is
    added to `problems`. The study with its device, GPUs and slots."""
    cfg, out, warnings = checked.cfg, checked.out, []
    in_file = list(problems)  # the schema's and the file's own: what later checks must not read
    problems += out_problems(out, [cfg.data.source, cfg.data.validation])
    problems += resource_problems(cfg, storage, warnings, in_file)
    if mlflow and cfg.tracking.enabled:
        out_ok = not any(p.key == "--out" for p in problems)
        problems += tracking_problems(cfg, out, uri_option, out_ok)
    device = resolve_device(cfg.launch.device)
    # the estimates read the search space, which may hold anything the file rules refuse
    model_ok = not any(p.key == "model.path" for p in problems) and not at_fault(in_file, "search")
    if model_ok:
        problems += memory_problems(cfg, device, available_memory_gb(device))
    gpus = local_gpus(device)
    launch = cfg.launch
    packed = packed_memory(cfg, device) if model_ok else {"trials_per_gpu": launch.trials_per_gpu}
    slots = None
    try:
        slots = plan_slots(
            device=device,
            gpus=gpus,
            gpus_per_trial=launch.gpus_per_trial,
            parallel_trials=launch.parallel_trials,
            num_processes=launch.num_processes,
            cpu_count=usable_cpus(),
            **packed,
        )
    except SlotError as e:
        problems.append(Problem(e.key, e.message))
    return replace(checked, device=device, gpus=gpus, slots=slots, warnings=warnings)
