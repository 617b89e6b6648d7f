"""The worker in-process (single CPU process): deterministic, checkpointing, NaN, orphaned."""

import json
import os
import subprocess
import sys

import pytest

from ranksearch.config import load_study
from ranksearch.data import prepare
from ranksearch.space import lora_kwargs, resolve
from ranksearch.worker import LengthGroupedSampler, OrphanedError, training_function

from .conftest import write_study


@pytest.fixture
def make_spec(tmp_path, tiny_bert, sentiment_csv):
    cfg = load_study(write_study(tmp_path / "s.yaml", tiny_bert, sentiment_csv))[0]
    data = prepare(cfg, tmp_path / "run")
    values = {
        "rank": 4,
        "alpha_ratio": 2,
        "dropout": 0.0,
        "target_modules": "qv",
        "learning_rate": 5e-3,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }

    def spec(name: str, **training) -> dict:
        return {
            "task": cfg.task,
            "model": {"path": str(tiny_bert), "quantization": "none", "trust_remote_code": False},
            "data": {"path": str(data.path), "num_labels": 2, "pad_token_id": 0},
            "lora": lora_kwargs(resolve(cfg.search, values), cfg.task),
            "training": {
                **cfg.training.model_dump(),
                "max_steps": 6,
                "learning_rate": 5e-3,
                **training,
            },
            "reports": str(tmp_path / f"{name}.jsonl"),
            "adapter_dir": str(tmp_path / name),
        }

    return spec


def _reports(spec: dict) -> list[dict]:
    return [json.loads(x) for x in open(spec["reports"]).read().splitlines()]


def _curve(spec: dict) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in _reports(spec) if "val_loss" in r]


def test_same_seed_same_curve_and_the_adapter_is_saved(make_spec):
    a, b, c = make_spec("a"), make_spec("b"), make_spec("c", seed=1)
    for spec in (a, b, c):
        training_function(spec)
    assert _curve(a) == _curve(b) and len(_curve(a)) == 3
    assert _curve(a) != _curve(c)
    assert os.path.isfile(os.path.join(a["adapter_dir"], "adapter_config.json"))
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
    spec = {**make_spec("orphan"), "orchestrator_pid": dead.pid}
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
    assert plain["training"]["group_by_length"] is False  # the default: random batches
    assert _curve(grouped) != _curve(plain)  # other batches, other curve
    for curve in (_curve(grouped), _curve(plain)):
        assert len(curve) == 3 and all(loss == loss for _, loss in curve)


def test_the_worker_imports_nothing_of_ranksearch():
    """The worker is a plain accelerate script: it runs from a spec alone."""
    code = (
        "import sys, ranksearch.worker; "
        "print(sorted(m for m in sys.modules if m.startswith('ranksearch.')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "['ranksearch.worker']"
