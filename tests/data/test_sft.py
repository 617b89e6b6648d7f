"""Causal-LM examples: label masks equal TRL's, truncation counted, packing loses nothing."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from ranksearch.config.schema import DataConfig
from ranksearch.data.sft import IGNORE, build_examples
from ranksearch.worker.batches import pack_rows, packed_collate, pad_collate
from ranksearch.worker.train import batch_loss, training_loss

TWEETS = [
    ("positive", "Just landed in Paris, the food here is amazing!"),
    ("negative", "My flight got cancelled again. Worst airline ever."),
    ("positive", "new phone arrived :) battery lasts two days"),
    ("negative", "rain rain rain... and the bus is late #monday"),
    ("positive", "Congrats to the team on the launch!!"),
    ("negative", "why is customer support always on hold"),
]

# SmolLM2's own chat template with TRL's `{% generation %}` markers around what an assistant
# turn trains on: the content and its end-of-turn token. It renders the same text.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def chats() -> list[list[dict[str, str]]]:
    convs = [
        [
            {"role": "user", "content": f"Sentiment of: {text}"},
            {"role": "assistant", "content": label},
        ]
        for label, text in TWEETS
    ]
    # several assistant turns, and a system turn of its own
    convs.append(
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Sentiment of: great game tonight"},
            {"role": "assistant", "content": "positive"},
            {"role": "user", "content": "And: lost my keys"},
            {"role": "assistant", "content": "negative"},
        ]
    )
    return convs


def trl_dataset(tiny_llama, tmp_path, rows: list[dict], **config):
    """What TRL's SFTTrainer trains on for these rows: its prepared input_ids and labels."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = GENERATION_TEMPLATE
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, **config)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    return trainer.train_dataset["input_ids"], trainer.train_dataset["labels"]


@pytest.mark.pretrained
def test_prompt_completion_labels_equal_trl_completion_only(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    frame = pd.DataFrame(TWEETS, columns=["sentiment", "text"])
    d = DataConfig(
        source="x.csv",
        format="prompt-completion",
        prompt="Tweet: {text}\nSentiment:",
        completion=" {sentiment}",
        max_length=64,
    )
    ours = build_examples(d, frame, tok, "test")
    rows = [{"prompt": f"Tweet: {t}\nSentiment:", "completion": f" {s}"} for s, t in TWEETS]
    ids, labels = trl_dataset(tiny_llama, tmp_path, rows, completion_only_loss=True, max_length=64)
    assert ours.input_ids == ids
    assert ours.labels == labels
    # the loss reads the label word and EOS, nothing of the prompt
    assert tok.decode([t for t in ours.labels[0] if t != IGNORE]) == " positive<|im_end|>"


@pytest.mark.pretrained
def test_messages_labels_equal_trl_assistant_only(tiny_llama, tmp_path):
    """Our spans come from rendering turn by turn with the model's own template (which has no
    generation markers); TRL's from the markers. Same ids, same labels."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert "{% generation %}" not in tok.chat_template
    convs = chats()
    d = DataConfig(source="x.jsonl", format="messages", messages="messages", max_length=128)
    ours = build_examples(d, pd.DataFrame({"messages": convs}), tok, "test")
    ids, labels = trl_dataset(
        tiny_llama, tmp_path, [{"messages": c} for c in convs], assistant_only_loss=True,
        max_length=128,
    )  # fmt: skip
    assert ours.input_ids == ids
    assert ours.labels == labels
    trained = tok.decode([t for t in ours.labels[-1] if t != IGNORE])
    assert trained == "positive<|im_end|>negative<|im_end|>"


@pytest.mark.pretrained
def test_truncation_drops_rows_whose_answer_is_cut_and_counts_them(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    frame = pd.DataFrame(TWEETS, columns=["sentiment", "text"])
    base = {"source": "x.csv", "format": "messages"}
    turns = [
        {"role": "user", "content": "Sentiment of: {text}"},
        {"role": "assistant", "content": "{sentiment}"},
    ]
    full = build_examples(DataConfig(**base, messages=turns, max_length=128), frame, tok, "t")
    # where each answer starts; a limit at the median cuts the answers of the later half away
    starts = [next(i for i, t in enumerate(row) if t != IGNORE) for row in full.labels]
    limit = sorted(starts)[len(starts) // 2]
    cut = build_examples(DataConfig(**base, messages=turns, max_length=limit), frame, tok, "t")
    assert 0 < cut.dropped_truncated == sum(start >= limit for start in starts)
    assert len(cut.input_ids) + cut.dropped_truncated == len(frame)
    assert all(any(t != IGNORE for t in row) for row in cut.labels)


def examples(tiny_llama, n: int = 7):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    d = DataConfig(source="x.jsonl", format="messages", messages="messages", max_length=128)
    ex = build_examples(d, pd.DataFrame({"messages": chats()[:n]}), tok, "test")
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ex.input_ids, ex.labels, strict=True)]
    return rows, tok.pad_token_id


@pytest.mark.pretrained
@pytest.mark.parametrize("capacity", [None, 120, 200])
def test_packed_rows_give_the_unpacked_loss(tiny_llama, capacity):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.config.use_cache = False
    rows, pad = examples(tiny_llama)
    padded = pad_collate(rows, pad, causal=True)
    packed = packed_collate(rows, pad, capacity)
    assert packed["input_ids"].shape[0] < len(rows)  # several examples share a row
    with torch.no_grad():
        reference = model(**padded).loss  # Hugging Face's own loss on the padded batch
        assert training_loss(model, padded, causal=True) == pytest.approx(reference.item(), 1e-5)
        assert training_loss(model, packed, causal=True) == pytest.approx(reference.item(), 1e-5)


def test_pack_rows_fills_first_fit_and_keeps_every_example():
    rows = pack_rows([50, 30, 70, 20, 10], capacity=80)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([50, 30, 70, 20, 10][i] for i in r) <= 80 for r in rows)
    assert len(rows) == 3  # 70+10, 50+30, 20
    assert pack_rows([5, 5], None) == [[0, 1]]


@pytest.mark.pretrained
def test_answer_accuracy_is_every_answer_token_the_argmax(tiny_llama):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    rows, pad = examples(tiny_llama)
    batch = pad_collate(rows, pad, causal=True)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    predicted = out.logits[:, :-1].argmax(-1)
    labels = batch["labels"]
    # the answers of rows 0 and 2 become what the model predicts: those rows are right
    for r in (0, 2):
        scored = labels[r, 1:] != IGNORE
        labels[r, 1:][scored] = predicted[r][scored]
    # row 3: right on all answer tokens but the last
    scored = (labels[3, 1:] != IGNORE).nonzero()[:, 0]
    labels[3, 1:][scored] = predicted[3][scored]
    labels[3, 1 + scored[-1]] = (predicted[3, scored[-1]] + 1) % model.config.vocab_size
    with torch.no_grad():
        loss, count, exact, _ = batch_loss(model, batch, causal=True)
    assert exact[[0, 2]].tolist() == [1, 1]
    assert exact[3].item() == 0
    targets = labels[:, 1:]
    assert count.tolist() == (targets != IGNORE).sum(-1).float().tolist()
    full = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].transpose(1, 2), targets, reduction="none", ignore_index=IGNORE
    ).sum(-1)
    assert loss.tolist() == pytest.approx(full.tolist(), rel=1e-5)
