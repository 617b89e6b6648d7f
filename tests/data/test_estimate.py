"""Exact counts: equal to PEFT's own, for BERT, GPT-2 (Conv1D) and Llama (GQA), several sets."""

import pytest
import torch

from ranksearch.config.schema import StudyConfig
from ranksearch.config.space import lora_kwargs, resolve
from ranksearch.data.estimate import estimate, estimate_space


def _bert(task):
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            num_labels=2,
        )
    )


def _gpt2(task):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32, pad_token_id=0
    )
    return GPT2LMHeadModel(config) if task == "causal-lm" else GPT2ForSequenceClassification(config)


def _llama(task):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    return (
        LlamaForCausalLM(config) if task == "causal-lm" else LlamaForSequenceClassification(config)
    )


CASES = [
    (_bert, "sequence-classification", ["query", "value"]),
    (_bert, "sequence-classification", "all-linear"),
    (_gpt2, "causal-lm", ["c_attn"]),
    (_gpt2, "causal-lm", "all-linear"),
    (_gpt2, "sequence-classification", ["c_attn", "c_proj"]),
    (_llama, "causal-lm", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (_llama, "causal-lm", "all-linear"),
    (_llama, "sequence-classification", "all-linear"),
]


@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(
    ("build", "task", "targets"), CASES, ids=lambda x: getattr(x, "__name__", str(x))
)
def test_counts_equal_peft(build, task, targets, rank, use_dora):
    from peft import LoraConfig, get_peft_model

    cfg = StudyConfig.model_validate(
        {
            "study_name": "t",
            "task": task,
            "model": "unused",
            "data": {"source": "unused"},
            "search": {
                "rank": rank,
                "alpha_ratio": 2,
                "target_modules": {"set": targets},
                "use_dora": use_dora,
            },
        }
    )
    torch.manual_seed(0)
    ours = estimate(build(task), cfg, rank, "set", use_dora)
    values = {
        "rank": rank,
        "alpha_ratio": 2,
        "dropout": 0.0,
        "target_modules": "set",
        "learning_rate": 1e-3,
        "use_rslora": False,
        "use_dora": use_dora,
        "init_lora_weights": True,
    }
    peft_model = get_peft_model(
        build(task), LoraConfig(**lora_kwargs(resolve(cfg.search, values), task))
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert ours.trainable_params == trainable
    assert ours.total_params == total
    assert ours.compression > 1 and 0 < ours.trainable_fraction < 1


def test_estimate_space_covers_every_rank_and_set(tmp_path, tiny_bert, sentiment_csv):
    from ranksearch.config.load import load_study

    from ..conftest import write_study

    cfg = load_study(write_study(tmp_path / "s.yaml", tiny_bert, sentiment_csv))[0]
    rows = estimate_space(cfg)
    assert [(r.rank, r.target_modules) for r in rows] == [
        (r, s) for r in (2, 4, 8) for s in ("qv", "all-linear")
    ]
    qv = [r for r in rows if r.target_modules == "qv"]
    # linear in the rank: doubling r doubles the LoRA parameters
    assert qv[1].lora_params == 2 * qv[0].lora_params and qv[2].lora_params == 4 * qv[0].lora_params
    assert all(r.memory_estimate_mb > r.adapter_mb > 0 for r in rows)


def test_estimate_options_and_a_refused_space_exit_2_naming_the_key(
    tmp_path, tiny_bert, sentiment_csv, capsys
):
    from ranksearch.cli.commands import main

    from ..conftest import write_study

    study = str(write_study(tmp_path / "s.yaml", tiny_bert, sentiment_csv))
    for args, key in (
        (["--set", "search.rank=zzz"], "`search.rank`: expected numbers"),
        (["--targets", "nope"], "`--targets`: ['nope'] are not module sets of the study"),
        (["--rank", "0", "4"], "`--rank`: ranks are integers >= 1"),
    ):
        assert main(["estimate", "--study", study, *args]) == 2
        assert key in capsys.readouterr().err


@pytest.mark.e2e
def test_estimate_command_measures_one_real_step(tmp_path, tiny_bert, sentiment_csv):
    import json

    from ..conftest import run_cli, write_study

    study_file = write_study(tmp_path / "s.yaml", tiny_bert, sentiment_csv)
    r = run_cli(
        "estimate", "--study", str(study_file), "--measure", "--format", "json", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["configurations"]) == 6
    m = doc["measured"]
    assert (m["rank"], m["target_modules"], m["device"]) == (8, "all-linear", "cpu")
    assert m["measured_mb"] > 0 and m["estimate_mb"] > 0
    r = run_cli(
        "estimate", "--study", str(study_file), "--rank", "4", "--targets", "qv", cwd=tmp_path
    )
    assert r.returncode == 0 and "│    4 │ qv" in r.stdout


def test_a_study_that_would_not_fit_is_refused_before_it_starts(tmp_path, tiny_bert, sentiment_csv):
    from ..conftest import run_cli, write_study

    study_file = write_study(
        tmp_path / "s.yaml",
        tiny_bert,
        sentiment_csv,
        launch={"device": "cpu", "max_memory_gb": 0.001},
    )
    out = tmp_path / "out"
    r = run_cli("run", "--study", str(study_file), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2
    assert "`launch.max_memory_gb`: rank 8 on all-linear needs about" in r.stderr
    assert not out.exists()
