"""Checks against the real model, data and storage, before anything runs."""

import socket

import pytest

from ranksearch.cli.validate import check_study, model_problems, resource_problems
from ranksearch.config.load import load_study
from ranksearch.config.problems import StudyError
from ranksearch.search.packing import available_memory_gb, memory_problems

from ..conftest import CHAT_TURNS, make_rows, run_cli, write_study


def _study(tmp_path, model_dir, data_file, **overrides):
    return load_study(write_study(tmp_path / "s.yaml", model_dir, data_file, **overrides))[0]


def test_a_valid_study_has_no_problems(tmp_path, tiny_bert, sentiment_csv):
    assert resource_problems(_study(tmp_path, tiny_bert, sentiment_csv)) == []


def test_target_modules_must_exist_as_linear_layers(tmp_path, tiny_bert, sentiment_csv):
    search = {
        "rank": [4],
        "target_modules": {"ok": ["query"], "typo": ["querry"], "not-linear": ["attention"]},
    }
    problems = dict(model_problems(_study(tmp_path, tiny_bert, sentiment_csv, search=search)))
    assert "`querry` is not a module of the model" in problems["search.target_modules.typo"]
    assert "query" in problems["search.target_modules.typo"]  # lists what exists
    assert "not a Linear layer" in problems["search.target_modules.not-linear"]
    assert "search.target_modules.ok" not in problems


def test_gpt2_conv1d_counts_as_linear(tmp_path, tiny_gpt2, sentiment_csv):
    data = {"source": str(sentiment_csv), "text_column": "review"}
    cfg = _study(
        tmp_path,
        tiny_gpt2,
        sentiment_csv,
        task="causal-lm",
        data=data,
        search={"rank": [4], "target_modules": {"attn": ["c_attn"]}},
    )
    assert model_problems(cfg) == []


def test_unloadable_model_and_4bit_on_cpu(tmp_path, tiny_bert, sentiment_csv):
    cfg = _study(tmp_path, tmp_path / "nowhere", sentiment_csv)
    ((key, msg),) = model_problems(cfg)
    assert key == "model.path" and "cannot load" in msg
    model = {"path": str(tiny_bert), "quantization": "4bit"}
    cfg = _study(tmp_path, tiny_bert, sentiment_csv, model=model, launch={"device": "auto"})
    problems = dict(model_problems(cfg))
    assert "CUDA" in problems["model.quantization"]


def test_missing_columns_are_named(tmp_path, tiny_bert, sentiment_csv):
    data = {
        "source": str(sentiment_csv),
        "text_column": "body",
        "label_column": "sentiment",
        "labels": {"neg": 0, "pos": 1},
    }
    problems = dict(resource_problems(_study(tmp_path, tiny_bert, sentiment_csv, data=data)))
    assert "no column 'body'" in problems["data.text_column"]


def csv_with_empty_texts(folder, every: int, keep: bool) -> object:
    """300 rows whose text is empty in every `every`-th row (keep=False: all rows but those)."""
    import csv

    path = folder / f"empty-{every}-{keep}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentiment", "review"])
        for i, (label, text) in enumerate(make_rows(300)):
            w.writerow([label, "" if (i % every == 0) == keep else text])
    return path


def test_empty_texts_are_said_and_mostly_empty_is_refused(tmp_path, tiny_bert):
    warnings: list[str] = []
    cfg = _study(tmp_path, tiny_bert, csv_with_empty_texts(tmp_path, 3, keep=True))
    assert resource_problems(cfg, warnings=warnings) == []
    assert warnings == ["100 of 300 rows of `data.source` dropped: 'review' is empty in them"]
    cfg = _study(tmp_path, tiny_bert, csv_with_empty_texts(tmp_path, 3, keep=False))
    problems = dict(resource_problems(cfg))
    assert "200 of 300 rows of `data.source` dropped" in problems["data.text_column"]
    assert (
        "point `data.text_column` at the column that holds the texts"
        in (problems["data.text_column"])
    )


def test_an_all_empty_or_rowless_file_blames_the_text_column_not_the_labels(tmp_path, tiny_bert):
    cfg = _study(tmp_path, tiny_bert, csv_with_empty_texts(tmp_path, 1, keep=True))
    problems = dict(resource_problems(cfg))
    assert list(problems) == ["data.text_column"]
    assert (
        "'review' is empty in all 300 rows of `data.source`: nothing to train on"
        in problems["data.text_column"]
    )
    header_only = tmp_path / "header.csv"
    header_only.write_text("sentiment,review\n")
    problems = dict(resource_problems(_study(tmp_path, tiny_bert, header_only)))
    assert list(problems) == ["data.source"] and "has no rows" in problems["data.source"]


def test_a_text_column_of_numbers_is_said(tmp_path, tiny_bert):
    import csv

    path = tmp_path / "scored.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentiment", "review", "score"])
        w.writerows(
            [label, text, f"{i * 0.37:.2f}"] for i, (label, text) in enumerate(make_rows(80))
        )
    data = {"source": str(path), "text_column": "score", "label_column": "sentiment",
            "labels": {"neg": 0, "pos": 1}}  # fmt: skip
    warnings: list[str] = []
    assert resource_problems(_study(tmp_path, tiny_bert, path, data=data), warnings=warnings) == []
    assert warnings == [
        "every text of `data.source` in 'score' is a number: is it the column that holds the "
        "texts? If not, point `data.text_column` at that column"
    ]
    warnings.clear()
    resource_problems(_study(tmp_path, tiny_bert, path), warnings=warnings)  # 'review': words
    assert warnings == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_storage_is_reported_with_the_password_hidden(
    tmp_path, tiny_bert, sentiment_csv
):
    url = f"postgresql://user:hunter2@127.0.0.1:{_closed_port()}/test"
    problems = dict(resource_problems(_study(tmp_path, tiny_bert, sentiment_csv), url))
    assert "cannot connect" in problems["--storage"]
    assert "hunter2" not in problems["--storage"] and "user:***@" in problems["--storage"]


@pytest.mark.parametrize("url", ["not a url", "sqlite:///{tmp}/a-file/optuna.db"])
def test_bad_storage_urls(tmp_path, tiny_bert, sentiment_csv, url):
    (tmp_path / "a-file").write_text("not a directory")
    url = url.format(tmp=tmp_path)
    problems = dict(resource_problems(_study(tmp_path, tiny_bert, sentiment_csv), url))
    assert "--storage" in problems


def _sft(tmp_path, model_dir, data_file, **data):
    base = {
        "source": str(data_file),
        "format": "messages",
        "messages": CHAT_TURNS,
        "max_length": 96,
    }
    search = {"target_modules": {"qv": ["q_proj", "v_proj"]}}
    return _study(tmp_path, model_dir, data_file, task="causal-lm", data={**base, **data},
                  search=search)  # fmt: skip


@pytest.mark.pretrained
def test_a_chat_study_is_valid(tmp_path, tiny_llama, sentiment_csv):
    assert resource_problems(_sft(tmp_path, tiny_llama, sentiment_csv)) == []


def test_messages_need_a_chat_template(tmp_path, tiny_gpt2, sentiment_csv):
    cfg = _sft(tmp_path, tiny_gpt2, sentiment_csv)
    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"target_modules": {}})})
    problems = dict(resource_problems(cfg))
    assert "has no chat template" in problems["data.format"]
    assert "prompt-completion" in problems["data.format"]  # the fix


@pytest.mark.pretrained
def test_a_conversation_without_an_assistant_turn_is_refused(tmp_path, tiny_llama):
    import json

    path = tmp_path / "chats.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 5))
    problems = dict(resource_problems(_sft(tmp_path, tiny_llama, path, messages="messages")))
    assert "row 1: a conversation has no assistant turn" in problems["data.messages"]
    path.write_text("".join(json.dumps({"messages": "not a list"}) + "\n" for _ in range(3)))
    problems = dict(resource_problems(_sft(tmp_path, tiny_llama, path, messages="messages")))
    assert "must hold a list of {role, content} messages" in problems["data.messages"]


def test_conversations_whose_answers_are_all_blank_are_refused(tmp_path, tiny_llama):
    import json

    path = tmp_path / "chats.jsonl"

    def chats(answers: list[str]) -> None:
        rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                              {"role": "assistant", "content": a}]}
                for i, a in enumerate(answers)]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    chats([""] * 12)
    problems = dict(resource_problems(_sft(tmp_path, tiny_llama, path, messages="messages")))
    assert (
        "every assistant answer in 'messages' is empty in all 12 rows" in problems["data.messages"]
    )
    chats(["yes", " ", "no", "fine"] * 3)  # a quarter blank: dropped, said, accepted
    warnings: list[str] = []
    cfg = _sft(tmp_path, tiny_llama, path, messages="messages")
    assert resource_problems(cfg, warnings=warnings) == []
    assert warnings == [
        "3 of 12 rows of `data.source` dropped: every assistant answer in 'messages' is empty "
        "in them"
    ]


@pytest.mark.pretrained
def test_most_answers_cut_by_max_length_is_refused(tmp_path, tiny_llama, sentiment_csv):
    problems = dict(resource_problems(_sft(tmp_path, tiny_llama, sentiment_csv, max_length=12)))
    assert "lose their whole completion at max_length 12" in problems["data.max_length"]
    assert "raise `data.max_length`" in problems["data.max_length"]


@pytest.mark.pretrained
def test_templates_must_name_existing_columns(tmp_path, tiny_llama, sentiment_csv):
    data = {"format": "prompt-completion", "prompt": "Review: {body}", "completion": "{mood}"}
    cfg = _sft(tmp_path, tiny_llama, sentiment_csv, messages=None, **data)
    problems = dict(resource_problems(cfg))
    assert "no column 'body', 'mood'" in problems["data.prompt"]


def test_a_rank_beyond_this_machines_memory_is_refused(tmp_path, tiny_bert, sentiment_csv):
    here = available_memory_gb("cpu")
    assert here is not None and here > 0
    huge = {"rank": [4, 100_000_000], "target_modules": {"qv": ["query", "value"]}}
    cfg = _study(tmp_path, tiny_bert, sentiment_csv, search=huge)
    ((key, message),) = memory_problems(cfg, "cpu", here)
    assert key == "search.rank" and "rank 100000000 on qv needs about" in message
    assert f"more than the {here:.1f} GB available on this machine now" in message
    assert "set `launch.max_memory_gb`" in message  # the way out when it runs elsewhere
    assert memory_problems(_study(tmp_path, tiny_bert, sentiment_csv), "cpu", here) == []
    launch = {"device": "cpu", "max_memory_gb": 10_000.0}  # a limit set in the file wins
    assert memory_problems(_study(tmp_path, tiny_bert, sentiment_csv, search=huge, launch=launch),
                           "cpu", here) == []  # fmt: skip
    study_file = write_study(tmp_path / "huge.yaml", tiny_bert, sentiment_csv, search=huge)
    r = run_cli("validate", "--study", str(study_file), cwd=tmp_path)
    assert r.returncode == 2 and "`search.rank`: rank 100000000 on qv" in r.stderr


def test_check_study_lists_the_problems_of_every_layer_in_one_error(
    tmp_path, tiny_bert, sentiment_csv
):
    data = {"source": str(sentiment_csv), "text_column": "body", "label_column": "sentiment"}
    study_file = write_study(
        tmp_path / "s.yaml",
        tiny_bert,
        sentiment_csv,
        data=data,  # a column the file does not have: the data layer
        search={"rank": [0, 4], "target_modules": {"x": ["qeury"]}},  # space and model layers
        training={"max_steps": 12, "eval_every": 2, "batch_size": 0},  # the schema
        launch={"device": "cuda", "gpus_per_trial": 64},  # what plan_slots refuses
    )
    out = tmp_path / "out"
    with pytest.raises(StudyError) as err:
        check_study(study_file, out=out, mlflow=False)
    problems = dict(err.value.problems)  # each problem's key is data, not text to split
    assert "greater than 0" in problems["training.batch_size"]
    assert "ranks are integers" in problems["search.rank"]
    assert "`qeury` is not a module" in problems["search.target_modules.x"]
    assert "no column 'body'" in problems["data.text_column"]
    assert "64 GPUs per trial but" in problems["launch.gpus_per_trial"]
    assert str(err.value).count("problem(s) in") == 1 and not out.exists()
    checked = check_study(write_study(tmp_path / "ok.yaml", tiny_bert, sentiment_csv), out=out)
    assert checked.slots is not None and checked.device == "cpu" and not out.exists()


def test_a_required_key_at_fault_stops_after_the_schema(tmp_path):
    study_file = tmp_path / "s.yaml"
    study_file.write_text("data: {source: x}\ntraining: {batch_size: 0}\n")
    with pytest.raises(StudyError) as err:
        check_study(study_file)
    assert [p.key for p in err.value.problems] == ["model", "training.batch_size"]


def test_a_rule_across_sections_is_a_problem_like_any_other(tmp_path, tiny_bert, sentiment_csv):
    """A file rule (min_steps below eval_every) with the machine checks after it: one error
    naming the key, not a crash in the checks that read the problems so far."""
    pruner = {"type": "hyperband", "min_steps": 2, "reduction_factor": 3}
    training = {"max_steps": 20, "eval_every": 10, "batch_size": 8, "seed": 0}
    study_file = write_study(
        tmp_path / "s.yaml", tiny_bert, sentiment_csv, pruner=pruner, training=training
    )
    with pytest.raises(StudyError) as err:
        check_study(study_file, out=tmp_path / "out", mlflow=False)
    assert "multiple of eval_every" in dict(err.value.problems)["pruner.min_steps"]


def validate_in_process(capsys, *args: str) -> tuple[int, str]:
    """`ranksearch validate ARGS` in this process: its exit code and what it printed."""
    from ranksearch.cli.commands import main

    code = main(["validate", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["data.labels={neg: 0}"], "data.labels"),  # one class: a file rule, then the data
        (["data.labels={neg: 0, pos: x}"], "data.labels.pos"),
        (["training=5", "pruner.min_steps=1"], "training"),  # a section at fault + a rule
        (["search.rank=zzz"], "search.rank"),  # a string the memory estimate read as a rank
        (["search.rank=[4, 8.5]"], "search.rank"),
        (["search.use_dora=maybe"], "search.use_dora"),
    ],
)
def test_values_later_checks_would_misread_exit_2_naming_the_key(
    tmp_path, tiny_bert, sentiment_csv, capsys, sets, key
):
    study = write_study(tmp_path / "s.yaml", tiny_bert, sentiment_csv)
    args = [f"--set={s}" for s in sets]
    code, said = validate_in_process(capsys, "--study", str(study), "--out", str(tmp_path / "o"),
                                     *args)  # fmt: skip
    assert code == 2 and f"`{key}`" in said
    assert not (tmp_path / "o").exists()


def test_a_schema_problem_is_said_once_not_again_by_the_rules_on_its_default(
    tmp_path, tiny_gpt2, sentiment_csv, capsys
):
    data = {"source": str(sentiment_csv), "format": "prompt-completion", "completion": "x"}
    study = write_study(tmp_path / "s.yaml", tiny_gpt2, sentiment_csv, task="causal-lm",
                        data=data, search={"target_modules": {"attn": ["c_attn"]}})  # fmt: skip
    for value in ("[1, 2]", "Review: {review}"):  # a list; unquoted, YAML reads a mapping
        code, said = validate_in_process(capsys, "--study", str(study), "--set",
                                         f"data.prompt={value}")  # fmt: skip
        assert code == 2 and "1 problem(s)" in said and "`data.prompt`" in said
    assert "quote it" in said and """--set 'data.prompt="Review: {text}"'""" in said


def test_a_malformed_storage_url_exits_2_without_its_password(
    tmp_path, tiny_bert, sentiment_csv, capsys
):
    study = write_study(tmp_path / "s.yaml", tiny_bert, sentiment_csv)
    url = "postgresql://alice:secret@[::1/optuna"  # the IPv6 host is not closed
    code, said = validate_in_process(capsys, "--study", str(study), "--storage", url)
    assert code == 2 and "`--storage`" in said and "not a database URL" in said
    assert "secret" not in said
