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
