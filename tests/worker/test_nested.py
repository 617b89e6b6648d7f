"""Nested-rank trials in the worker: every leading sub-rank of one trained LoRA is exactly the
plain PEFT LoRA of that rank (same slices, same scaling), saved as one, and reported at every
evaluation."""

import json
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from ranksearch.config.load import load_study
from ranksearch.data.prepare import prepare
from ranksearch.worker.batches import get_dataloaders
from ranksearch.worker.model import load_base
from ranksearch.worker.nested import NestedLoRA, NestedSpec, save_rank
from ranksearch.worker.spec import EVALUATION_KEYS, EVENT_KEYS, TrialSpec
from ranksearch.worker.train import _evaluate, training_function

from ..conftest import trial_spec, write_study

RANKS = (2, 4, 8)


@pytest.fixture
def make_spec(tmp_path, tiny_bert, sentiment_csv):
    """`make_spec(name, rank, nested=..., **training)`: a trial spec of the tiny BERT study."""
    cfg = load_study(write_study(tmp_path / "s.yaml", tiny_bert, sentiment_csv))[0]
    data = prepare(cfg, tmp_path / "run")

    def spec(name: str, rank: int, nested: dict | None = None, search=None, **training):
        reports, adapter = str(tmp_path / f"{name}.jsonl"), str(tmp_path / name)
        s = trial_spec(cfg, data, reports, adapter, {"rank": rank, **(search or {})}, **training)
        return replace(s, nested=nested)

    return spec


def _reports(spec: TrialSpec) -> list[dict]:
    return [json.loads(x) for x in open(spec.reports).read().splitlines()]


def nested_of(alphas) -> dict:
    return {"ranks": list(RANKS), "alphas": list(alphas)}


@pytest.mark.parametrize(
    "alphas, rslora",
    [((4, 8, 16), False), ((16, 16, 16), False), ((4, 8, 16), True)],
    ids=["alpha-2r", "fixed-alpha", "rslora"],
)
def test_each_rank_is_exactly_the_plain_lora_of_that_rank(make_spec, tmp_path, alphas, rslora):
    spec = make_spec("nested", 8, nested_of(alphas), {"use_rslora": rslora}, max_steps=4)
    spec = replace(spec, lora={**spec.lora, "lora_alpha": alphas[-1]})
    training_function(spec)  # B is trained away from zero: the truncation matters
    accelerator = Accelerator()
    batch = next(iter(get_dataloaders(spec, 0)[1]))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    model = PeftModel.from_pretrained(load_base(spec, accelerator), spec.adapter_dir).eval()
    nested = NestedLoRA(model, NestedSpec.of(spec.nested), rslora, seed=0)
    saved = load_file(f"{spec.adapter_dir}/adapter_model.safetensors")
    for rank, alpha in zip(RANKS, alphas, strict=True):
        with torch.no_grad(), nested.at(rank):
            truncated = model(**inputs).logits
        out = save_rank(spec.adapter_dir, tmp_path / f"r{rank}", rank, alpha)
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (rank, alpha, rslora)
        tensors = load_file(out / "adapter_model.safetensors")
        assert set(tensors) == set(saved)
        for name, tensor in tensors.items():  # the leading slices, nothing else changed
            if ".lora_A." in name:
                assert torch.equal(tensor, saved[name][:rank])
            elif ".lora_B." in name:
                assert torch.equal(tensor, saved[name][:, :rank])
            else:
                assert torch.equal(tensor, saved[name])
        plain = PeftModel.from_pretrained(load_base(spec, accelerator), out).eval()
        assert plain.peft_config["default"].r == rank
        with torch.no_grad():
            expected = plain(**inputs).logits
        torch.testing.assert_close(truncated, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the full rank is the adapter as saved
        assert nested.rank == 8
        torch.testing.assert_close(
            model(**inputs).logits,
            PeftModel.from_pretrained(load_base(spec, accelerator), spec.adapter_dir)
            .eval()(**inputs)
            .logits,
        )


def test_a_nested_trial_reports_every_rank_at_every_evaluation(make_spec, tmp_path):
    spec = make_spec("nested", 8, nested_of((4, 8, 16)))
    training_function(spec)
    start, *evaluations, end = _reports(spec)
    assert [e["step"] for e in evaluations] == [2, 4, 6]
    for e in evaluations:
        assert set(e["ranks"]) == {"2", "4", "8"}
        best = min(e["ranks"], key=lambda r: e["ranks"][r]["val_loss"])
        assert e["best_rank"] == int(best)
        assert e["val_loss"] == e["ranks"][best]["val_loss"]  # what the pruner sees
        assert e["accuracy"] == e["ranks"][best]["accuracy"]
        for metrics in e["ranks"].values():
            assert {"val_loss", "val_loss_se", "accuracy", "f1"} <= set(metrics)
    # the ranks differ: truncation is real, not one model reported three times
    assert len({m["val_loss"] for m in evaluations[-1]["ranks"].values()}) == 3
    # per rank, the final per-example losses (the paired rule compares ranks on them)
    assert set(end["rank_val_losses"]) == {"2", "4", "8"}
    for rank, per_example in end["rank_val_losses"].items():
        mean = sum(per_example) / len(per_example)
        assert mean == pytest.approx(evaluations[-1]["ranks"][rank]["val_loss"], abs=1e-4)
    for line in (start, *evaluations, end):
        allowed = EVENT_KEYS[line["event"]] if "event" in line else EVALUATION_KEYS
        assert set(line) - {"time", "event"} <= set(allowed), line.keys()

    # each rank's trainable parameters are a plain LoRA's of that rank, as its worker counts
    for rank in RANKS:
        plain = make_spec(f"plain{rank}", rank, max_steps=2)
        training_function(plain)
        assert start["rank_params"][str(rank)] == _reports(plain)[0]["trainable_params"]
    assert start["trainable_params"] == start["rank_params"]["8"]

    # the reported loss at a rank is the loss of that rank saved as a plain adapter
    accelerator = Accelerator()
    eval_dl = get_dataloaders(spec, 0)[1]
    out = save_rank(spec.adapter_dir, tmp_path / "r4", 4, 8)
    plain = PeftModel.from_pretrained(load_base(spec, accelerator), out)
    assert _evaluate(plain, eval_dl, accelerator, spec)["val_loss"] == pytest.approx(
        evaluations[-1]["ranks"]["4"]["val_loss"], abs=1e-6
    )


def test_a_plain_trial_is_untouched_by_the_nested_machinery(make_spec):
    """No nested key in its reports, and the same curve a nested spec of one rank draws."""
    plain, single = make_spec("plain", 4), make_spec("one", 4, {"ranks": [4], "alphas": [8]})
    training_function(plain)
    training_function(single)
    assert not any("ranks" in r or "rank_params" in r for r in _reports(plain))
    curve = [(r["step"], r["val_loss"]) for r in _reports(plain) if "val_loss" in r]
    assert curve == [(r["step"], r["val_loss"]) for r in _reports(single) if "val_loss" in r]


def test_training_samples_every_rank(tiny_bert):
    """The drawn ranks cover the space (uniformly) from the trial's seed, and the hooks go."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    uniform = {**nested_of((4, 8, 16)), "sampling": "uniform"}
    nested = NestedLoRA(model, NestedSpec.of(uniform), False, seed=3)
    draws = [nested.sample_rank() for _ in range(600)]
    assert {r: draws.count(r) for r in RANKS} == pytest.approx({r: 200 for r in RANKS}, abs=40)
    again = NestedLoRA(model, NestedSpec.of(uniform), False, seed=3)
    assert [again.sample_rank() for _ in range(600)] == draws
    by_rank = NestedLoRA(model, NestedSpec(ranks=RANKS, alphas=(4, 8, 16), sampling="by-rank"),
                         False, seed=3)  # fmt: skip
    draws = [by_rank.sample_rank() for _ in range(700)]
    assert {r: draws.count(r) for r in RANKS} == pytest.approx({2: 100, 4: 200, 8: 400}, abs=45)
    by_rank.remove()
    with pytest.raises(ValueError, match="not one of the nested ranks"):
        nested.set_rank(3)
    nested.remove()
    again.remove()
    assert all(not layer.lora_A["default"]._forward_hooks for layer in nested.layers)
    assert all(layer.scaling["default"] == 2.0 for layer in nested.layers)
