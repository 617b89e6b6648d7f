"""Load a study file once: read the YAML, apply `--set` overrides, type it, check it.

Every problem in a study file is collected into one `StudyError` that names each key path and
how to fix it, so a user fixes the file in one pass. Nothing is launched or written before this
passes. `cli.validate.check_study` adds what needs the model, the data and the machine.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ranksearch.config.paths import resolve_study_file
from ranksearch.config.problems import Problem, StudyError
from ranksearch.config.schema import StudyConfig
from ranksearch.config.space import space_problems
from ranksearch.config.templates import format_problems


def file_problems(cfg: StudyConfig) -> list[Problem]:
    """What the file alone shows: rules that span sections, the causal-LM formats and the
    search space (`space.space_problems`)."""
    problems: list[Problem] = []
    t, p = cfg.training, cfg.pruner
    if t.eval_every > t.max_steps:
        problems.append(
            Problem("training.eval_every", f"{t.eval_every} > max_steps {t.max_steps}; lower it")
        )
    if p.type != "none" and p.min_steps is not None and p.min_steps > t.max_steps:
        problems.append(
            Problem(
                "pruner.min_steps", f"{p.min_steps} > training.max_steps {t.max_steps}; lower it"
            )
        )
    if p.type != "none" and p.min_steps is not None and p.min_steps < t.eval_every:
        problems.append(
            Problem(
                "pruner.min_steps",
                f"{p.min_steps} < training.eval_every {t.eval_every}: no report arrives before "
                "the first rung; set it to a multiple of eval_every",
            )
        )
    problems += format_problems(cfg)
    if cfg.data.labels is not None and len(set(cfg.data.labels.values())) < 2:
        problems.append(Problem("data.labels", "map at least two classes, e.g. {neg: 0, pos: 1}"))
    if cfg.data.labels and sorted(set(cfg.data.labels.values())) != list(
        range(len(set(cfg.data.labels.values())))
    ):
        problems.append(Problem("data.labels", "class ids must be 0..K-1 without gaps"))
    if cfg.launch.stale_after_seconds <= 2 * cfg.launch.heartbeat_seconds:
        problems.append(
            Problem(
                "launch.stale_after_seconds",
                f"{cfg.launch.stale_after_seconds:g} must exceed twice heartbeat_seconds "
                f"({cfg.launch.heartbeat_seconds:g}), or live trials would be failed as lost",
            )
        )
    if cfg.tracking.registered_model and cfg.tracking.log_adapters == "none":
        problems.append(
            Problem(
                "tracking.register",
                "registers the logged model, but `tracking.log_adapters: none` logs none; "
                "set log_adapters to answer, or drop register",
            )
        )
    if cfg.launch.device == "cpu" and cfg.model.quantization == "4bit":
        problems.append(Problem("model.quantization", "4bit needs CUDA; use `none` on CPU"))
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
        key, msg = ".".join(loc), e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling or remove it (see search_spaces/cls-task.yaml)"
        elif e["type"] == "missing":
            msg = "required key is missing; add it"
        elif e["type"] == "string_type" and isinstance(e.get("input"), dict):
            msg += (
                "; YAML read a mapping here (a `: ` inside the value): quote it, e.g. "
                f"'Review: {{text}}', or on the command line --set '{key}=\"Review: {{text}}\"'"
            )
        problems.append(Problem(key, msg))
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
