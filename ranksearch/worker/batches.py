"""Batches of a prepared split: padding to the longest in the batch, packed causal-LM rows,
length-grouped order, and the two data loaders of a trial."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ranksearch.worker.spec import TrialSpec


def pad_collate(features: list[dict], pad_id: int, causal: bool) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (not to max_length): far less wasted compute.

    Causal LM: per-token labels as prepared (-100 where the loss skips), else every real token.
    """
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    if not causal:
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([f["labels"] for f in features])}  # fmt: skip
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    for i, f in enumerate(features):
        labels[i, : len(f["input_ids"])] = torch.tensor(f.get("labels", f["input_ids"]))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Examples (by index) placed into rows of at most `capacity` tokens, first fit in
    decreasing length; None puts the whole batch in one row."""
    if capacity is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([])
            room.append(capacity)
            fit = len(rows) - 1
        rows[fit].append(i)
        room[fit] -= lengths[i]
    return rows


def packed_collate(features: list[dict], pad_id: int, capacity: int | None) -> dict:
    """A causal-LM batch with several examples per row and no attention mask.

    Position ids restart at 0 for every example, which transformers reads as packed sequences
    and turns into a block-diagonal causal mask, so no token attends across examples. The first
    token of each example is never a target (nothing of its own precedes it), as when unpacked:
    the loss is the same as `pad_collate`'s on the same examples.
    """
    rows = pack_rows([len(f["input_ids"]) for f in features], capacity)
    width = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            f = features[i]
            n = len(f["input_ids"])
            ids[r, at : at + n] = torch.tensor(f["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(f.get("labels", f["input_ids"])[1:])
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding: one more sequence, no targets
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


class TokenizedSplit(torch.utils.data.Dataset):
    """A prepared split held as plain rows: what `datasets.load_from_disk` gives the loader,
    without importing `datasets` (and pandas) in every trial, about 2 s of its start-up."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {name: values[i] for name, values in self.columns.items()}


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """A random order in which each batch holds sequences of similar length.

    Every epoch: a random permutation, cut into mega-batches of `mega` batches; each mega-batch
    is sorted by length, cut into batches, and those batches are shuffled. Padding to the
    longest in a batch then wastes almost nothing, while the data still mixes across the epoch.
    Every rank draws the same order from the same seed; accelerate deals the batches out.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, generator: torch.Generator, mega: int = 50
    ):
        self.lengths = lengths
        self.batch_size = batch_size
        self.generator = generator
        self.mega = mega

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        size = self.batch_size * self.mega
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: -self.lengths[i])
            batches = [
                chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size)
            ]
            full = [b for b in batches if len(b) == self.batch_size]
            # a short batch (the epoch's last) stays last, where the loader's drop_last finds it
            for k in torch.randperm(len(full), generator=self.generator).tolist():
                yield from full[k]
            yield from (i for b in batches if len(b) < self.batch_size for i in b)


def read_split(path: Path) -> TokenizedSplit | Any:
    """A split written by `Dataset.save_to_disk` (data.prepare): its Arrow stream files, read
    with pyarrow. Any other layout goes through `datasets.load_from_disk`."""
    try:
        files = json.loads((path / "state.json").read_text())["_data_files"]
        import pyarrow as pa

        tables = [pa.ipc.open_stream(pa.memory_map(str(path / f["filename"]))).read_all()
                  for f in files]  # fmt: skip
        table = pa.concat_tables(tables)
    except (OSError, KeyError, ValueError):
        from datasets import load_from_disk

        return load_from_disk(str(path))
    return TokenizedSplit({name: table.column(name).to_pylist() for name in table.column_names})


def get_dataloaders(spec: TrialSpec, seed: int) -> tuple[DataLoader, DataLoader]:
    data, train = spec.data, spec.training
    collate = functools.partial(
        pad_collate, pad_id=data.pad_token_id, causal=spec.task == "causal-lm"
    )
    train_collate = collate
    if train.get("packing"):
        train_collate = functools.partial(
            packed_collate, pad_id=data.pad_token_id, capacity=train.get("packing_length")
        )
    train_ds = read_split(Path(data.path) / "train")
    # The validation split is stored sorted by length, so evaluation batches are nearly unpadded.
    eval_ds = read_split(Path(data.path) / "validation")
    generator = torch.Generator().manual_seed(seed)
    order: dict[str, Any] = {"shuffle": True, "generator": generator}
    if train.get("group_by_length"):
        lengths = [len(row["input_ids"]) for row in train_ds]
        order = {"sampler": LengthGroupedSampler(lengths, train["batch_size"], generator)}
    train_dl = DataLoader(
        train_ds,
        batch_size=train["batch_size"],
        collate_fn=train_collate,
        drop_last=len(train_ds) > train["batch_size"],
        **order,
    )
    eval_bs = train.get("eval_batch_size") or 2 * train["batch_size"]
    eval_dl = DataLoader(eval_ds, batch_size=eval_bs, shuffle=False, collate_fn=collate)
    return train_dl, eval_dl
