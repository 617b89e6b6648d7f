"""Causal-LM examples as supervised fine-tuning builds them: token ids and the labels the loss
reads, with -100 where the loss must not look.

- `text`: the text column, loss on every token (plain language modelling).
- `prompt-completion`: the prompt and the completion (EOS appended), loss on the completion only.
- `messages`: a conversation rendered with the tokenizer's chat template, loss on the assistant
  turns only (their content and the end-of-turn token the template writes after it).

The masks are the ones TRL's SFTTrainer builds with `completion_only_loss` and
`assistant_only_loss` on the same rows (tests/data/test_sft.py compares them). Assistant spans are
found by rendering the conversation turn by turn, so any chat template works, including those
without `{% generation %}` markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ranksearch.config.templates import render_template, template_fields

if TYPE_CHECKING:
    import pandas as pd

    from ranksearch.config.schema import DataConfig

IGNORE = -100  # label of a token the loss skips (PyTorch's and Hugging Face's convention)
# A study is refused when more than this share of its rows would lose their whole completion.
MAX_TRUNCATED_SHARE = 0.5


class ExampleError(ValueError):
    """A row that cannot become an example; `key` is the study-file key to fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


@dataclass
class Examples:
    input_ids: list[list[int]]
    labels: list[list[int]] | None  # None: every token (the collator masks padding)
    dropped_truncated: int = 0  # rows whose completion max_length cut away entirely


def columns_key(d: DataConfig) -> str:
    """The study-file key that names the columns a causal-LM format reads."""
    return {"text": "data.text_column", "messages": "data.messages"}.get(d.format, "data.prompt")


def columns_used(d: DataConfig) -> list[str]:
    """The frame columns a causal-LM format reads."""
    if d.format == "text":
        return [d.text_column]
    if d.format == "prompt-completion":
        return list(dict.fromkeys(template_fields(d.prompt) + template_fields(d.completion)))
    if isinstance(d.messages, str):
        return [d.messages]
    fields = [template_fields(m.content, column_shorthand=False) for m in d.messages]
    return list(dict.fromkeys(f for group in fields for f in group))


def conversation(d: DataConfig, row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A row's conversation: the messages column as it is, or the study's turn templates."""
    if not isinstance(d.messages, str):
        return [
            {"role": m.role, "content": render_template(m.content, row, column_shorthand=False)}
            for m in d.messages
        ]
    turns = row[d.messages]
    if isinstance(turns, np.ndarray):  # parquet gives arrays of dicts
        turns = turns.tolist()
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
        for t in turns
    ):
        raise ExampleError(
            "data.messages",
            f"{where}: column {d.messages!r} must hold a list of {{role, content}} "
            f"messages, got {str(turns)[:80]!r}",
        )
    if not any(t["role"] == "assistant" for t in turns):
        raise ExampleError(
            "data.messages",
            f"{where}: a conversation has no assistant turn, so there is nothing to learn; "
            "remove such rows or add the assistant's answer",
        )
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prompt_completion_example(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Ids of prompt + completion + EOS; labels on the completion (where the ids of the prompt
    alone and of the whole stop agreeing, as TRL does when tokens merge across the boundary)."""
    if tok.eos_token and not completion.endswith(tok.eos_token):
        completion += tok.eos_token
    prompt_ids = tok(prompt)["input_ids"]
    ids = tok(prompt + completion)["input_ids"]
    start = _common_prefix(prompt_ids, ids)
    return ids, [IGNORE] * start + ids[start:]


def chat_example(tok, turns: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Ids of the rendered conversation; labels on the assistant turns only.

    Each assistant turn's span is what rendering turns[: i + 1] adds to turns[:i] with the
    generation prompt, up to its end-of-turn token (trailing whitespace is not the answer).
    """
    if not tok.is_fast:
        raise ExampleError(
            "model.path",
            "format messages needs a fast tokenizer (a tokenizer.json) to map the assistant "
            "turns to tokens; use format prompt-completion with this model",
        )
    render = tok.apply_chat_template
    text = render(turns, tokenize=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = render(turns[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(turns[: i + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ExampleError(
                "data.format",
                "the chat template renders a conversation differently from its beginning, so "
                "the assistant turns cannot be located; use format prompt-completion instead",
            )
        spans.append((len(before), len(upto.rstrip())))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        token if any(a < e and b > s for s, e in spans) else IGNORE
        for token, (a, b) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def build_examples(d: DataConfig, frame: pd.DataFrame, tok, where: str) -> Examples:
    """Tokenize every row of a causal-LM split; truncate to `max_length` from the right.

    A row whose completion (or every assistant turn) is cut away entirely is dropped and counted:
    it would train nothing and evaluate as a free zero.
    """
    if d.format == "text":
        texts = frame[d.text_column].astype(str).tolist()
        enc = tok(texts, truncation=True, max_length=d.max_length)
        return Examples(enc["input_ids"], None)
    ids_out, labels_out, dropped = [], [], 0
    for pos, row in enumerate(frame.to_dict("records")):
        if d.format == "prompt-completion":
            prompt, completion = render_template(d.prompt, row), render_template(d.completion, row)
            ids, labels = prompt_completion_example(tok, prompt, completion)
        else:
            ids, labels = chat_example(tok, conversation(d, row, f"{where} row {pos}"))
        ids, labels = ids[: d.max_length], labels[: d.max_length]
        if all(x == IGNORE for x in labels[1:]):  # the first token is never predicted
            dropped += 1
            continue
        ids_out.append(ids)
        labels_out.append(labels)
    return Examples(ids_out, labels_out, dropped)


def truncation_problem(d: DataConfig, examples: Examples, rows: int) -> str | None:
    """A message when most rows would lose their whole completion to `max_length`."""
    if rows and examples.dropped_truncated / rows > MAX_TRUNCATED_SHARE:
        longest = max((len(x) for x in examples.input_ids), default=0)
        return (
            f"{examples.dropped_truncated} of {rows} sampled rows lose their whole completion "
            f"at max_length {d.max_length} (longest kept row: {longest} tokens); raise "
            "`data.max_length` or shorten the prompt"
        )
    return None
