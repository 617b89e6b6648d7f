"""Load, label-map, split and tokenize a study's data once; cache it as Arrow in the study dir.

Every trial of a study reads the same prepared splits (`datasets.load_from_disk`), so no trial
re-tokenizes. The cache key covers everything that changes the result (data settings, tokenizer,
task, seed); a changed study file prepares a new cache beside the old one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ranksearch.config.paths import PathError, local_path
from ranksearch.data.empty import blank_rows, nothing_left, numeric_texts
from ranksearch.data.gguf import converted_dir
from ranksearch.data.sft import ExampleError, build_examples, columns_key, columns_used

if TYPE_CHECKING:
    import pandas as pd

    from ranksearch.config.schema import DataConfig, StudyConfig

LOCAL_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}


class DataError(Exception):
    """Data that cannot be used as the study file describes; names the key and the fix."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"`{key}`: {message}")


@dataclass
class PreparedData:
    path: Path  # holds train/ and validation/ (load_from_disk) and meta.json
    num_labels: int
    label_names: list[str]
    pad_token_id: int
    counts: dict[str, int] = field(default_factory=dict)
    format: str = "text"  # causal-lm: text, prompt-completion or messages


def model_location(path: str) -> str:
    """A model source as `from_pretrained` takes it: a local directory or a hub id.

    A `.gguf` file becomes the Hugging Face folder it is converted into (once, cached).
    """
    local = local_path(path)
    if local is not None and local.suffix == ".gguf":
        if not local.is_file():
            raise PathError(f"{path}: no such GGUF file")
        return str(converted_dir(local))
    return str(local) if local is not None else path


def read_frame(cfg: DataConfig, source: str, key: str = "data.source") -> pd.DataFrame:
    """One table from a local file, a file inside a package, or a hub dataset split."""
    import pandas as pd

    try:
        path = local_path(source)
    except PathError as e:
        raise DataError(key, str(e)) from None
    if path is None:
        return _read_hub(cfg, source, key)
    if path.is_dir():
        raise DataError(
            key, f"{path} is a directory; give one data file in it ({', '.join(LOCAL_FORMATS)})"
        )
    if not path.is_file():
        raise DataError(key, f"no such file: {path}")
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            key, f"unknown file type {path.suffix!r}; use one of {sorted(LOCAL_FORMATS)}"
        )
    try:
        if fmt in ("csv", "tsv"):
            quoting = csv.QUOTE_NONE if cfg.quoting == "none" else csv.QUOTE_MINIMAL
            return pd.read_csv(
                path,
                sep="\t" if fmt == "tsv" else ",",
                encoding=cfg.encoding,
                quoting=quoting,
                keep_default_na=False,
            )
        if fmt == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=fmt == "jsonl")
    except UnicodeDecodeError as e:
        raise DataError(
            "data.encoding",
            f"{path.name} is not {cfg.encoding} ({e.reason} at byte {e.start}); set "
            "`data.encoding` to the file's encoding, e.g. latin-1",
        ) from None
    except LookupError:
        raise DataError("data.encoding", f"unknown encoding {cfg.encoding!r}; e.g. utf-8") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(key, f"cannot read {path}: {e}") from None


def _read_hub(cfg: DataConfig, source: str, key: str) -> pd.DataFrame:
    import datasets

    split = cfg.split if key == "data.source" else source
    name = cfg.source if key != "data.source" else source
    try:
        ds = datasets.load_dataset(name, cfg.config_name, split=split)
    except Exception as e:  # noqa: BLE001 - the hub client raises many types
        raise DataError(
            key,
            f"cannot load hub dataset {name!r} (split {split!r}): {type(e).__name__}: "
            f"{str(e)[:200]}. Offline? Give a local file instead.",
        ) from None
    return ds.to_pandas()


def label_frame(
    cfg: DataConfig, frame: pd.DataFrame, task: str, where: str
) -> tuple[pd.DataFrame, dict[str, int], dict[str, int]]:
    """Check columns, drop empty texts and unmapped labels, add integer `labels`.

    Returns the frame, row counts, and the label mapping used (raw label -> class id). A
    causal-lm frame with `data.labels` gets a `stratum` column instead (its split is stratified).
    """
    if task == "causal-lm" and cfg.format != "text":
        return _causal_frame(cfg, frame, where)
    columns = list(frame.columns)
    if cfg.text_column not in columns:
        raise DataError(
            "data.text_column", f"{where} has no column {cfg.text_column!r}; columns are {columns}"
        )
    frame, counts = _without_blank_rows(cfg, frame, task, where)
    counts["numeric_texts"] = numeric_texts(cfg, frame, task)
    if task == "causal-lm":
        return frame.reset_index(drop=True), counts, {}
    frame, mapping = _map_labels(cfg, frame, where, counts)
    frame["labels"] = frame.pop("_label").astype(int)
    present = sorted(frame["labels"].unique())
    if len(present) < 2:
        raise DataError(
            "data.labels",
            f"{where} has {len(present)} label(s) after mapping "
            f"{mapping}; a classifier needs at least two: check `data.labels` "
            f"against the values in {cfg.label_column!r}",
        )
    return frame.reset_index(drop=True), counts, mapping


def _map_labels(
    cfg: DataConfig, frame: pd.DataFrame, where: str, counts: dict[str, int]
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows whose label `data.labels` maps, with the class id in `_label`."""
    if cfg.label_column not in frame.columns:
        raise DataError(
            "data.label_column",
            f"{where} has no column {cfg.label_column!r}; columns are {list(frame.columns)}",
        )
    raw = frame[cfg.label_column].astype(str)
    mapping = cfg.labels or {v: i for i, v in enumerate(sorted(raw.unique()))}
    ids = raw.map(mapping)
    counts["dropped_unmapped"] = int(ids.isna().sum())
    return frame.assign(_label=ids).dropna(subset=["_label"]), mapping


def _causal_frame(
    cfg: DataConfig, frame: pd.DataFrame, where: str
) -> tuple[pd.DataFrame, dict[str, int], dict[str, int]]:
    """prompt-completion / messages: the columns the templates name exist; empty rows dropped."""

    key = columns_key(cfg)
    missing = [c for c in columns_used(cfg) if c not in frame.columns]
    if missing:
        raise DataError(
            key,
            f"{where} has no column {', '.join(map(repr, missing))}; columns are "
            f"{list(frame.columns)}",
        )
    frame, counts = _without_blank_rows(cfg, frame, "causal-lm", where)
    mapping: dict[str, int] = {}
    if cfg.labels:
        frame, mapping = _map_labels(cfg, frame, where, counts)
        frame["stratum"] = frame.pop("_label").astype(int)
    return frame.reset_index(drop=True), counts, mapping


def _without_blank_rows(
    cfg: DataConfig, frame: pd.DataFrame, task: str, where: str
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows that teach something (`empty.blank_rows`), and the counts of those dropped;
    a DataError when none is left."""
    counts = {"rows": len(frame)}
    frame = frame[~blank_rows(cfg, frame, task)]
    counts["dropped_empty"] = counts["rows"] - len(frame)
    if not len(frame):
        raise DataError(*nothing_left(cfg, task, counts["rows"], where))
    return frame, counts


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split that keeps each class's share in both parts. Returns (train, val) indices."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = max(1, round(len(idx) * fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def split_frame(
    frame: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation) rows of a labelled frame: `stratified_split` by its class column
    (`labels`, or a causal-lm frame's `stratum`), or a plain seeded split without one."""
    column = "labels" if "labels" in frame else "stratum" if "stratum" in frame else None
    strata = frame[column].to_numpy() if column else np.zeros(len(frame), int)
    train_idx, val_idx = stratified_split(strata, fraction, seed)
    return frame.iloc[train_idx], frame.iloc[val_idx]


def scored_positions(n: int, d: DataConfig, seed: int) -> np.ndarray:
    """Positions of the validation rows every evaluation scores: a fixed, seeded
    `max_eval_samples` of the `n` (all of them without a limit)."""
    return _subsample(n, d.max_eval_samples, seed + 1)


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def cache_key(cfg: StudyConfig) -> str:
    blob = json.dumps(
        {
            "data": cfg.data.model_dump(),
            "model": cfg.model.path,
            "task": cfg.task,
            "seed": cfg.training.seed,
            "version": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_tokenizer(cfg: StudyConfig):
    return tokenizer_at(model_location(cfg.model.path), cfg.model.trust_remote_code)


def tokenizer_at(location: str, trust_remote_code: bool = False):
    """The tokenizer of a model location, padding as the study trained with."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # GPT-2 style tokenizers: pad with EOS, masked out of the loss
        tok.pad_token = tok.eos_token
    return tok


def prepare(cfg: StudyConfig, study_dir: Path) -> PreparedData:
    """Prepare (or reuse) the tokenized train/validation splits for this study."""
    out = study_dir / "data" / cache_key(cfg)
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return PreparedData(
            out,
            meta["num_labels"],
            meta["label_names"],
            meta["pad_token_id"],
            meta["counts"],
            meta.get("format", "text"),
        )

    from datasets import Dataset

    d, seed = cfg.data, cfg.training.seed
    frame, counts, mapping = label_frame(d, read_frame(d, d.source), cfg.task, "data.source")
    if d.validation:
        val_frame, val_counts, _ = label_frame(
            d, read_frame(d, d.validation, "data.validation"), cfg.task, "data.validation"
        )
        counts.update({f"validation_{k}": v for k, v in val_counts.items()})
    else:
        frame, val_frame = split_frame(frame, d.validation_fraction, seed)
    frame = frame.iloc[_subsample(len(frame), d.max_train_samples, seed)]
    val_frame = val_frame.iloc[scored_positions(len(val_frame), d, seed)]
    counts.update(train=len(frame), validation=len(val_frame))

    tok = load_tokenizer(cfg)
    # Built beside its final place and renamed into it: orchestrators sharing a study directory
    # (one machine, or a shared volume) never read a half-written split.
    final, out = out, out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, part in (("train", frame), ("validation", val_frame)):
        columns = tokenize_split(cfg, part, tok, name, counts)
        ds = Dataset.from_dict(columns)
        if name == "validation":  # sorted by length: evaluation batches carry little padding
            ds = ds.select(np.argsort([len(x) for x in columns["input_ids"]], kind="stable"))
        ds.save_to_disk(str(out / name))

    # class id -> a readable name (the first raw label mapped to it)
    names: dict[int, str] = {}
    for raw, idx in mapping.items():
        names.setdefault(idx, raw)
    label_names = [names[i] for i in sorted(names)]
    meta = {
        "num_labels": len(label_names),
        "label_names": label_names,
        "counts": counts,
        "pad_token_id": tok.pad_token_id,
        "source": d.source,
        "format": d.format if cfg.task == "causal-lm" else "text",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        out.rename(final)
    except OSError:  # another orchestrator prepared the same data first: use theirs
        shutil.rmtree(out, ignore_errors=True)
        if not meta_path.is_file():
            raise
    return PreparedData(
        final, meta["num_labels"], label_names, tok.pad_token_id, counts, meta["format"]
    )


def tokenize_split(
    cfg: StudyConfig, part: pd.DataFrame, tok, name: str, counts: dict[str, int]
) -> dict[str, list]:
    """The columns of one prepared split: `input_ids`, and `labels` (class ids, or per-token
    labels for prompt-completion and messages). Rows truncated to nothing are counted."""
    d = cfg.data
    if cfg.task != "causal-lm":
        enc = tok(
            part[d.text_column].astype(str).tolist(), truncation=True, max_length=d.max_length
        )
        return {"input_ids": enc["input_ids"], "labels": part["labels"].tolist()}

    try:
        examples = build_examples(d, part, tok, f"data ({name} split)")
    except ExampleError as e:
        raise DataError(e.key, str(e)) from None
    counts[f"{name}_dropped_truncated"] = examples.dropped_truncated
    counts[name] = len(examples.input_ids)
    if examples.labels is None:
        return {"input_ids": examples.input_ids}
    return {"input_ids": examples.input_ids, "labels": examples.labels}
