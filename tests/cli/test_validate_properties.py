"""No input a user can type makes `validate` fail with a traceback: property-based.

Study files and `--set` overrides are generated from the schema (every key path, plus keys that
are not there), with values of every shape a YAML value can take (wrong types, mappings where
scalars belong, lists, empty strings, unicode, huge numbers), and storage and tracking URLs with
a password in them. `validate` runs in this process on the real tiny model and data; it must
exit 0 or 2 (naming what is wrong), write nothing, and never print the password. The example
count is the Hypothesis profile's (tests/conftest.py: `fast`, or `ci` when CI=true).
"""

from __future__ import annotations

import contextlib
import io
import typing
from collections.abc import Iterator
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import yaml
from hypothesis import event, example, given
from hypothesis import strategies as st
from pydantic import BaseModel

from ranksearch.cli.commands import main
from ranksearch.config.schema import StudyConfig
from ranksearch.search.storage import StorageError, check_storage
from ranksearch.tracking.store import TrackingError, check_tracking

from ..conftest import write_study

SECRET = "pw-Zq7-secret"  # a password no message may print


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of the schema: sections, and the keys inside each."""
    paths = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        paths.append(key)
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                paths += _key_paths(arg, key + ".")
    return paths


KEYS = _key_paths(StudyConfig) + [
    "data.labels.neg", "data.labels.1", "search.target_modules.qv", "search.target_modules.x.y",
    "search.rank.low", "search.learning_rate.step", "data.messages.0", "enqueue.0",
    "training.bogus", "bogus", "model", "sampler", "tracking", "pruner",
]  # fmt: skip
assert {"data.prompt", "training.max_steps", "search.rank", "tracking.register"} <= set(KEYS)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=64),  # near the valid values, to get past the schema
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "all-linear", "qv", "query", "cpu", "tpe", "1se", "none", "4bit",
                     "causal-lm", "messages", "prompt-completion", "Review: {review}", "{",
                     "{0}", "{review!r}", "review", "sentiment", "\x00", "ü🙂", "../../etc"]),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(
                st.sampled_from(["low", "high", "log", "role", "content"]), st.text(max_size=6)
            ),
            inner,
            max_size=4,
        ),
    ),  # fmt: skip
    max_leaves=8,
)


def _yaml_text(value) -> str:
    """A value as the user would type it after `key=` (flow style, one line)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


RAW = st.one_of(
    VALUES.map(_yaml_text),
    st.text(max_size=20),  # anything, malformed YAML included
    st.sampled_from(["[", "{a: b", "'", "Review: {review}", "{negative: 0}", "1e400", "9" * 40]),
)
OVERRIDES = st.lists(st.tuples(st.sampled_from(KEYS), RAW), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def studies(tmp_path_factory, tiny_bert, tiny_gpt2, sentiment_csv) -> Iterator[dict[str, Path]]:
    """A classification study on the tiny BERT and a prompt-completion one on the tiny GPT-2."""
    folder = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch:
        # a generated `model` or `data.source` may read as a hub id: fail at once, not after the
        # hub client's retries (no network here, and none needed)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        yield _studies(folder, tiny_bert, tiny_gpt2, sentiment_csv)


def _studies(folder: Path, tiny_bert, tiny_gpt2, sentiment_csv) -> dict[str, Path]:
    sft = {"source": str(sentiment_csv), "format": "prompt-completion",
           "prompt": "Review: {review}\nSentiment:", "completion": " {sentiment}"}  # fmt: skip
    return {
        "cls": write_study(folder / "cls.yaml", tiny_bert, sentiment_csv),
        "sft": write_study(folder / "sft.yaml", tiny_gpt2, sentiment_csv, task="causal-lm",
                           data=sft, search={"target_modules": {"attn": ["c_attn"]}}),
        "out": folder / "out",
    }  # fmt: skip


def _validate(args: list[str]) -> tuple[int, str]:
    """`ranksearch validate ARGS` in this process; argparse's own refusal is exit 2 too."""
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        try:
            code = main(["validate", *args])
        except SystemExit as e:
            code = e.code
    return code, said.getvalue()


def _assert_answered(code: int, said: str, out: Path) -> None:
    # how far examples get (pytest --hypothesis-show-statistics): valid, refused by the checks
    # of a study, refused before them (a --set or a file that is not a mapping), or by argparse
    event("valid" if code == 0 else "checked" if "problem(s) in" in said else f"exit {code}")
    assert code in (0, 2), said
    assert code == 0 or "error:" in said, said  # a refusal says what is wrong
    assert "Traceback" not in said and SECRET not in said, said
    assert not out.exists()  # validate writes nothing


@given(base=st.sampled_from(["cls", "sft"]), overrides=OVERRIDES)
@example(base="cls", overrides=[("data.labels", "{neg: 0}")])  # the crashes found by hand
@example(base="cls", overrides=[("training", "5"), ("pruner.min_steps", "10")])
@example(base="cls", overrides=[("search.rank", "zzz")])
@example(base="sft", overrides=[("data.prompt", "[1, 2]")])
@example(base="sft", overrides=[("data.prompt", "Review: {review}")])
@example(base="cls", overrides=[("training.eval_every", "")])  # and by this test
@example(base="sft", overrides=[("training.seed", "-1")])
@example(base="cls", overrides=[("model", "1e400")])  # a hub id: offline, refused at once
def test_any_set_override_exits_0_or_2(studies, base, overrides):
    sets = [f"--set={key}={raw}" for key, raw in overrides]
    out = studies["out"]
    code, said = _validate(["--study", str(studies[base]), "--out", str(out), *sets])
    _assert_answered(code, said, out)


def _mutated(study: Path, changes: list[tuple[str, object]]) -> str:
    """The study file with a value put at each key path (mappings made on the way; keys of
    any YAML type where the generated values hold mappings)."""
    data = yaml.safe_load(study.read_text())
    for key, value in changes:
        node, *parents = data, *key.split(".")[:-1]
        for part in parents:
            if not isinstance(node.get(part), dict):  # absent, null or a scalar: a mapping now
                node[part] = {}
            node = node[part]
        node[key.split(".")[-1]] = value
    return yaml.safe_dump(data, allow_unicode=True)


@given(
    base=st.sampled_from(["cls", "sft"]),
    changes=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4),
    whole=st.one_of(st.none(), VALUES.map(yaml.safe_dump), st.text(max_size=60)),
)
def test_any_study_file_exits_0_or_2(studies, base, changes, whole):
    path = studies["out"].parent / "any.yaml"
    content = _mutated(studies[base], changes) if whole is None else whole
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    code, said = _validate(["--study", str(path), "--out", str(studies["out"])])
    _assert_answered(code, said, studies["out"])


HOSTS = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "[::1", "", "h st", "ü", "@", ":"])
PORTS = st.one_of(st.just(""), st.integers(-5, 10**6).map(lambda p: f":{p}"), st.text(max_size=4))
URLS = st.builds(
    lambda scheme, user, host, port, path: f"{scheme}{user}{host}{port}{path}",
    st.sampled_from(["sqlite:///", "sqlite://", "postgresql://", "postgresql+psycopg://",
                     "mysql://", "http://", "https://", "file://", "", "://", "bogus://"]),
    st.sampled_from(["", f"alice:{SECRET}@", f":{SECRET}@", f"alice:{SECRET}@x@"]),
    HOSTS,
    PORTS,
    st.one_of(st.just("/optuna"), st.text(max_size=12)),
)  # fmt: skip


@given(url=URLS)
def test_any_storage_or_tracking_url_is_used_or_refused_without_its_password(url):
    for check, error in ((check_storage, StorageError), (check_tracking, TrackingError)):
        try:
            check(url)
        except error as e:
            assert e.key and SECRET not in str(e) and SECRET not in e.message, e
