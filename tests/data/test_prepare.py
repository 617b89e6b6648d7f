"""Data: label mapping, stratified split, one tokenization per study, clear errors."""

import json

import numpy as np
import pytest
from datasets import load_from_disk

from ranksearch.config.load import load_study
from ranksearch.data.prepare import DataError, prepare, stratified_split

from ..conftest import write_study


@pytest.fixture
def study(tmp_path, tiny_bert, sentiment_csv):
    path = write_study(tmp_path / "s.yaml", tiny_bert, sentiment_csv)
    return load_study(path)[0]


def test_prepare_maps_labels_drops_unmapped_and_splits(study, tmp_path):
    data = prepare(study, tmp_path / "run")
    assert data.label_names == ["neg", "pos"] and data.num_labels == 2
    c = data.counts
    assert c["rows"] == 400 and c["dropped_unmapped"] == 100  # the neutral rows
    assert c["train"] + c["validation"] == 300 and c["validation"] == 60
    val = load_from_disk(str(data.path / "validation"))
    lengths = [len(x) for x in val["input_ids"]]
    assert lengths == sorted(lengths)  # sorted for cheap evaluation batches
    # stratified: 2:1 pos:neg in the data, also in the validation split
    assert sum(val["labels"]) == 40


def test_the_worker_reads_prepared_splits_as_datasets_does(study, tmp_path):
    """Trials read the splits with pyarrow alone (no `datasets` import): the same rows, in order."""
    from ranksearch.worker.batches import TokenizedSplit, read_split

    data = prepare(study, tmp_path / "run")
    for split in ("train", "validation"):
        lean, full = read_split(data.path / split), load_from_disk(str(data.path / split))
        assert isinstance(lean, TokenizedSplit) and len(lean) == len(full) > 0
        assert [lean[i] for i in range(len(lean))] == list(full)


def test_prepare_runs_once_per_study(study, tmp_path):
    first = prepare(study, tmp_path / "run")
    stamp = (first.path / "train").stat().st_mtime_ns
    second = prepare(study, tmp_path / "run")
    assert second.path == first.path and (second.path / "train").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "run" / "data").iterdir())) == 1


def test_limits_subsample(study, tmp_path):
    study = study.model_copy(
        update={
            "data": study.data.model_copy(update={"max_train_samples": 50, "max_eval_samples": 10})
        }
    )
    data = prepare(study, tmp_path / "run")
    assert (data.counts["train"], data.counts["validation"]) == (50, 10)
    meta = json.loads((data.path / "meta.json").read_text())
    assert meta["pad_token_id"] == 0


def test_stratified_split_is_seeded_and_keeps_shares():
    labels = np.array([0] * 90 + [1] * 10)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert len(val) == 20 and labels[val].sum() == 2
    assert set(train).isdisjoint(val)
    assert (stratified_split(labels, 0.2, seed=3)[1] == val).all()


def test_wrong_encoding_names_the_key(study, tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("sentiment,review\npos,caf\xe9 good\nneg,bad\n".encode("latin-1"))
    data = study.data.model_copy(update={"source": str(path)})
    with pytest.raises(DataError, match="`data.encoding`.*latin-1"):
        prepare(study.model_copy(update={"data": data}), tmp_path / "run")


def test_missing_column_and_single_label(study, tmp_path):
    bad = study.model_copy(update={"data": study.data.model_copy(update={"text_column": "txt"})})
    with pytest.raises(DataError, match="`data.text_column`.*columns are"):
        prepare(bad, tmp_path / "a")
    one = study.model_copy(
        update={"data": study.data.model_copy(update={"labels": {"pos": 0, "x": 1}})}
    )
    with pytest.raises(DataError, match="at least two"):
        prepare(one, tmp_path / "b")
    assert not (tmp_path / "a").exists()


def test_a_directory_given_as_a_data_file_is_called_a_directory(study, tmp_path):
    folder = tmp_path / "corpus.csv"  # a folder, even with a data file's name
    folder.mkdir()
    data = study.data.model_copy(update={"source": str(folder)})
    with pytest.raises(DataError, match="`data.source`.*is a directory; give one data file"):
        prepare(study.model_copy(update={"data": data}), tmp_path / "run")


def test_prepared_counts_say_a_text_column_of_numbers(study, tmp_path):
    from ranksearch.data.empty import data_warnings

    path = tmp_path / "ids.csv"
    path.write_text("sentiment,review\n" + "".join(f"{('pos', 'neg')[i % 2]},{i}\n"
                                                   for i in range(40)))  # fmt: skip
    cfg = study.model_copy(update={"data": study.data.model_copy(update={"source": str(path)})})
    data = prepare(cfg, tmp_path / "run")
    assert data.counts["numeric_texts"] == data.counts["rows"] == 40
    assert data_warnings(cfg, data.counts) == [
        "every text of `data.source` in 'review' is a number: is it the column that holds the "
        "texts? If not, point `data.text_column` at that column"
    ]
