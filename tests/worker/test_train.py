"""The worker in-process (single CPU process): deterministic, checkpointing, NaN, orphaned."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from ranksearch.config.load import load_study
from ranksearch.data.prepare import prepare
from ranksearch.worker import SPEC_VERSION, DataSpec, ModelSpec, TrialSpec
from ranksearch.worker.batches import LengthGroupedSampler
from ranksearch.worker.spec import EVALUATION_KEYS, EVENT_KEYS
from ranksearch.worker.train import OrphanedError, training_function

from ..conftest import trial_spec, write_study


@pytest.fixture
def make_spec(tmp_path, tiny_bert, sentiment_csv):
    """`make_spec(name, **training)`: a spec reporting to `<name>.jsonl`, saving to `<name>/`."""
    cfg = load_study(write_study(tmp_path / "s.yaml", tiny_bert, sentiment_csv))[0]
    data = prepare(cfg, tmp_path / "run")

    def spec(name: str, **training) -> TrialSpec:
        reports, adapter = str(tmp_path / f"{name}.jsonl"), str(tmp_path / name)
        return trial_spec(cfg, data, reports, adapter, **training)

    return spec


def _reports(spec: TrialSpec) -> list[dict]:
    return [json.loads(x) for x in open(spec.reports).read().splitlines()]


def _curve(spec: TrialSpec) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in _reports(spec) if "val_loss" in r]


def test_same_seed_same_curve_and_the_adapter_is_saved(make_spec):
    a, b, c = make_spec("a"), make_spec("b"), make_spec("c", seed=1)
    for spec in (a, b, c):
        training_function(spec)
    assert _curve(a) == _curve(b) and len(_curve(a)) == 3
    assert _curve(a) != _curve(c)
    assert os.path.isfile(os.path.join(a.adapter_dir, "adapter_config.json"))
    start = _reports(a)[0]
    assert start["event"] == "start" and start["trainable_params"] == 2 * 2 * 4 * 64 + 32 * 2 + 2
    # the final evaluation's per-example losses, in the split's order, for paired comparisons
    *_, final, end = _reports(a)
    assert end["event"] == "end" and len(end["val_losses"]) == final["eval_examples"]
    assert sum(end["val_losses"]) / final["eval_examples"] == pytest.approx(
        final["val_loss"], abs=1e-4
    )
    assert "val_losses" not in final  # evaluations report the mean only
    assert end["val_losses"] != _reports(c)[-1]["val_losses"]
    # every key a worker writes is in the vocabulary the orchestrator reads (worker.spec)
    for line in _reports(a):
        allowed = EVENT_KEYS[line["event"]] if "event" in line else EVALUATION_KEYS
        assert set(line) - {"time", "event"} <= set(allowed), line.keys()


def test_gradient_checkpointing_trains_the_same_model(make_spec):
    plain, ckpt = make_spec("plain"), make_spec("ckpt", gradient_checkpointing=True)
    training_function(plain)
    training_function(ckpt)
    for (s1, l1), (s2, l2) in zip(_curve(plain), _curve(ckpt), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-4)


def test_a_diverging_run_raises_instead_of_reporting_garbage(make_spec):
    spec = make_spec("nan", learning_rate=1e30, max_grad_norm=None)
    with pytest.raises(FloatingPointError, match="training loss is"):
        training_function(spec)


def test_a_worker_whose_orchestrator_died_stops(make_spec):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    spec = replace(make_spec("orphan"), orchestrator_pid=dead.pid)
    with pytest.raises(OrphanedError, match="is gone"):
        training_function(spec)


def _padded_tokens(order: list[int], lengths: list[int], batch: int) -> int:
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_cover_the_data_with_little_padding():
    import random

    import torch

    rng = random.Random(0)
    lengths = [rng.randint(4, 64) for _ in range(2000)]
    sampler = LengthGroupedSampler(lengths, 16, torch.Generator().manual_seed(0))
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(2000)) and sorted(second) == list(range(2000))
    assert first != second  # a new order every epoch
    again = list(LengthGroupedSampler(lengths, 16, torch.Generator().manual_seed(0)))
    assert again == first  # seeded: every rank and every rerun draws the same order
    shuffled = list(range(2000))
    rng.shuffle(shuffled)
    real = sum(lengths)
    assert _padded_tokens(first, lengths, 16) < 1.05 * real
    assert _padded_tokens(shuffled, lengths, 16) > 1.3 * real
    # batches are not served longest-first: the order of lengths across the epoch is mixed
    maxima = [max(lengths[i] for i in first[s : s + 16]) for s in range(0, 800, 16)]
    assert maxima != sorted(maxima, reverse=True)


def test_grouped_and_plain_batching_both_train(make_spec):
    grouped, plain = make_spec("grouped", group_by_length=True), make_spec("plain")
    training_function(grouped)
    training_function(plain)
    assert plain.training["group_by_length"] is False  # the default: random batches
    assert _curve(grouped) != _curve(plain)  # other batches, other curve
    for curve in (_curve(grouped), _curve(plain)):
        assert len(curve) == 3 and all(loss == loss for _, loss in curve)


def test_the_worker_imports_nothing_of_ranksearch():
    """The worker is a plain accelerate script: it runs from a spec alone. Its spec module,
    which the orchestrator reads too, does not even import torch."""
    code = (
        "import sys, ranksearch.worker.__main__; "
        "print(sorted(m for m in sys.modules if m.startswith('ranksearch.')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(r.stdout.strip())
    assert "ranksearch.worker.train" in loaded
    assert all(m.startswith("ranksearch.worker") for m in loaded), loaded
    code = "import sys, ranksearch.worker.spec; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def _written_spec(folder) -> TrialSpec:
    """A spec as the orchestrator writes it: its paths relative to its folder."""
    spec = TrialSpec(
        study="s",
        trial=3,
        task="sequence-classification",
        model=ModelSpec(path="prajjwal1/bert-tiny", quantization="none", trust_remote_code=False),
        data=DataSpec(path="../data", num_labels=2, pad_token_id=0),
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        training={"max_steps": 6, "learning_rate": 5e-3},
        reports="reports.jsonl",
        orchestrator_pid=123,
        adapter_dir="adapter",
    )
    folder.mkdir(parents=True)
    spec.write(folder / "spec.json")
    return spec


def test_a_spec_reads_back_with_its_paths_resolved_where_its_folder_is_now(tmp_path):
    spec = _written_spec(tmp_path / "study" / "trials" / "3")
    raw = json.loads((tmp_path / "study/trials/3/spec.json").read_text())
    assert list(raw) == ["version", "study", "trial", "task", "model", "data", "lora",
                         "training", "reports", "orchestrator_pid", "adapter_dir"]  # fmt: skip
    assert raw["version"] == SPEC_VERSION and raw["data"]["path"] == "../data"
    shutil.move(tmp_path / "study", tmp_path / "moved")
    trial = (tmp_path / "moved" / "trials" / "3").absolute()
    got = TrialSpec.read(tmp_path / "moved" / "trials" / "3" / "spec.json")
    assert got == replace(
        spec,
        reports=str(trial / "reports.jsonl"),
        adapter_dir=str(trial / "adapter"),
        data=replace(spec.data, path=str(trial / "../data")),
    )
    assert os.path.normpath(got.data.path) == str(trial.parent / "data")


def _edit(path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda raw: raw.update(version=SPEC_VERSION + 1), "'version' is 2"),
        (lambda raw: raw["data"].pop("num_labels"), "'data.num_labels' is missing"),
        (lambda raw: raw.pop("reports"), "'reports' is missing"),
        (lambda raw: raw.update(epochs=3), "unknown spec key 'epochs'"),
        (lambda raw: raw["model"].update(revision="main"), "unknown spec key 'model.revision'"),
    ],
    ids=["version", "nested-missing", "missing", "unknown", "nested-unknown"],
)
def test_a_spec_of_another_layout_is_refused_by_name(tmp_path, edit, key):
    _written_spec(tmp_path / "t")
    path = tmp_path / "t" / "spec.json"
    _edit(path, edit)
    with pytest.raises(ValueError, match=key) as refused:
        TrialSpec.read(path)
    assert str(path) in str(refused.value) and "rerun the trial" in str(refused.value)


def test_a_spec_written_before_specs_had_a_version_is_read_as_version_1(tmp_path):
    """No version; and, written before SFT data, no data format. Existing studies still
    export and resume."""
    _written_spec(tmp_path / "t")
    path = tmp_path / "t" / "spec.json"
    _edit(path, lambda raw: (raw.pop("version"), raw["data"].pop("format")))
    got = TrialSpec.read(path)
    assert got.version == 1 and got.data.format == "text" and got.orchestrator_pid == 123
    assert got.reports == str((tmp_path / "t" / "reports.jsonl").absolute())
