"""A .gguf model file: converted once into a cached Hugging Face folder, whoever asks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import SMOLLM2_GGUF, require_smollm2


@pytest.mark.pretrained
def test_two_processes_convert_one_gguf_file_once(tmp_path):
    """Two orchestrators starting at once on a fresh cache agree on one complete folder."""
    require_smollm2()
    code = (
        "from ranksearch.data.prepare import model_location; "
        f"print(model_location({SMOLLM2_GGUF!r}))"
    )
    env = {**os.environ, "RANKSEARCH_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = {p.communicate(timeout=600)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outs) == 1, outs
    folder = Path(outs.pop())
    assert folder.parent == tmp_path / "gguf"
    # nothing half-written beside it: the folder was renamed into place whole
    assert [p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")] == [
        folder.name
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # saved as plain float32 weights
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (folder / "tokenizer_config.json").read_text()
    )
    assert "sha256" in (folder / "SOURCE").read_text()


@pytest.mark.parametrize("content", [b"not a gguf file at all", b"GGUF\x03\x00\x00\x00cut short"])
def test_a_bad_gguf_file_is_named_and_leaves_nothing_in_the_cache(
    tmp_path, monkeypatch, sentiment_csv, content
):
    from ranksearch.cli.validate import model_problems
    from ranksearch.config.load import load_study

    from ..conftest import write_study

    cache = tmp_path / "cache"
    monkeypatch.setenv("RANKSEARCH_CACHE", str(cache))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    study = write_study(tmp_path / "s.yaml", bad, sentiment_csv, task="causal-lm",
                        data={"source": str(sentiment_csv), "text_column": "review"})  # fmt: skip
    ((key, message),) = model_problems(load_study(study)[0])
    assert key == "model.path" and f"{bad}: cannot read it as a GGUF model" in message
    assert list((cache / "gguf").iterdir()) == []  # no lock, no half-converted folder
