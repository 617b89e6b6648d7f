"""A `.gguf` file as a model source: converted once into a Hugging Face folder every trial loads.

transformers reads GGUF (`from_pretrained(dir, gguf_file=name)`, PyPI `gguf`) and dequantizes
the weights to float32; that takes about 20 s for a 135M model, so it is done once per file and
cached under `$RANKSEARCH_CACHE` (default `~/.cache/ranksearch`), keyed by the file's SHA-256.
Orchestrators converting the same file at once take turns on a lock; the folder appears whole
(it is renamed into place) or not at all. The weights keep what quantization took from them at
source: they are the dequantized values, not the original full-precision model.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
from pathlib import Path

from ranksearch.config.paths import PathError

SUFFIX = ".gguf"


def cache_root() -> Path:
    return Path(os.environ.get("RANKSEARCH_CACHE", "~/.cache/ranksearch")).expanduser()


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file, computed once per (path, size, mtime) in this process."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def converted_dir(gguf: Path) -> Path:
    """The Hugging Face folder (config, safetensors, tokenizer, chat template) for `gguf`,
    converted now if no earlier run did."""
    final = cache_root() / "gguf" / f"{gguf.stem}-{file_digest(gguf)[:16]}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f"{final.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same file
        if not (final / "config.json").is_file():
            tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                convert(gguf, tmp)
            except Exception as e:  # noqa: BLE001 - the gguf reader raises many types
                # nothing of a file that will never convert stays in the cache; a process
                # waiting on this lock tries (and fails) on its own
                shutil.rmtree(tmp, ignore_errors=True)
                lock_path.unlink(missing_ok=True)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise PathError(
                    f"{gguf}: cannot read it as a GGUF model ({first}); give a .gguf file "
                    "transformers can load (needs PyPI `gguf`) or a model directory"
                ) from None
            tmp.rename(final)
    return final


def convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a float32 Hugging Face folder at `out` (transformers shows its
    progress: about 20 s for a 135M model, once per file)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers 5 refuses to save a model it still considers quantized; these weights are
    # already plain float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "SOURCE").write_text(f"dequantized from {gguf.name} (sha256 {file_digest(gguf)})\n")
