"""Prompt and completion templates of a causal-LM study, and the keys each data format needs.

A template names columns in braces (`"Review: {review}"`); a bare column name is shorthand for
`{column}`. The checks here read the study file alone; `data.sft` renders the templates.
"""

from __future__ import annotations

from typing import Any

from ranksearch.config.problems import Problem
from ranksearch.config.schema import DataConfig, StudyConfig


def format_problems(cfg: StudyConfig) -> list[Problem]:
    """`data.format` and the keys each format needs (causal-lm only)."""
    d, problems = cfg.data, []
    if cfg.task != "causal-lm":
        if d.format != "text":
            problems.append(
                Problem("data.format", "prompt-completion and messages need task: causal-lm")
            )
        if cfg.training.packing:
            problems.append(
                Problem("training.packing", "packing is for task: causal-lm; remove it")
            )
        return problems
    if d.labels and d.format == "text":
        problems.append(
            Problem("data.labels", "causal-lm `text` trains on text only; remove `labels`")
        )
    needs = {"prompt-completion": ("prompt", "completion"), "messages": ("messages",)}
    for key in needs.get(d.format, ()):
        if getattr(d, key) is None:
            problems.append(
                Problem(f"data.{key}", f"format {d.format} needs `{key}`: a column or a template")
            )
    for key in ("prompt", "completion", "messages"):
        if getattr(d, key) is not None and key not in needs.get(d.format, ()):
            problems.append(
                Problem(
                    f"data.{key}", f"not used with data.format {d.format}; remove it or the format"
                )
            )
    if isinstance(d.messages, list) and not any(m.role == "assistant" for m in d.messages):
        problems.append(
            Problem("data.messages", "no assistant turn: add {role: assistant, content: ..}")
        )
    for key in ("prompt", "completion"):
        template = getattr(d, key)
        if template is not None:
            problems += [Problem(f"data.{key}", e) for e in template_errors(template)]
    if isinstance(d.messages, list):
        for i, m in enumerate(d.messages):
            errors = template_errors(m.content, column_shorthand=False)
            problems += [Problem(f"data.messages.{i}.content", e) for e in errors]
    return problems + answer_problems(d)


def answer_problems(d: DataConfig) -> list[Problem]:
    """The answers a causal-LM study trains on come from the rows: a completion, or every
    assistant turn, naming no column is the same in each row (or blank), so it teaches
    nothing about the rows."""
    if d.format == "prompt-completion" and _constant(d.completion):
        return [
            Problem(
                "data.completion",
                f"{d.completion!r} names no column, so every row has the same answer; "
                "name the column of the answers, e.g. ' {label}'",
            )
        ]
    turns = d.messages if isinstance(d.messages, list) else []  # else a column of turns
    answers = [m.content for m in turns if m.role == "assistant"]
    if d.format == "messages" and answers and all(_constant(a, False) for a in answers):
        return [
            Problem(
                "data.messages",
                "no assistant turn names a column, so every row has the same answer; "
                "template the answer from a column, e.g. {role: assistant, content: '{label}'}",
            )
        ]
    return []


def _constant(template: str | None, column_shorthand: bool = True) -> bool:
    """A valid template that names no column (a malformed one is said by `template_errors`)."""
    if template is None or template_errors(template, column_shorthand):
        return False
    return not template_fields(template, column_shorthand)


def template_fields(template: str, column_shorthand: bool = True) -> list[str]:
    """The columns a template names: "Tweet: {text}" -> ["text"]. With `column_shorthand`, a
    bare name (`prompt`) is the column itself. Raises ValueError for a malformed template."""
    import string

    if column_shorthand and template.isidentifier():
        return [template]
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def render_template(template: str, row: dict[str, Any], column_shorthand: bool = True) -> str:
    """A template filled from one row (every value as text); a bare name is that column."""
    if column_shorthand and template.isidentifier():
        return str(row[template])
    return template.format_map({k: str(v) for k, v in row.items()})


def template_errors(template: str, column_shorthand: bool = True) -> list[str]:
    try:
        fields = template_fields(template, column_shorthand)
    except ValueError as e:
        return [f"not a valid template ({e}); write `{{column}}`, and `{{{{` for a brace"]
    if any(not f.isidentifier() for f in fields):
        return ["fields must be column names: `{text}`, not positions or expressions"]
    return []
