"""Where things are: study files, `package://` paths, the study directory, redacted URLs."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import site
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from ranksearch.config.problems import Problem

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

PACKAGE_SCHEME = "package://"
BUILTIN_STUDIES = Path(__file__).parents[1] / "search_spaces"


class PathError(Exception):
    """A path that cannot be resolved; the message says what was tried and how to fix it."""


def study_search_dirs() -> list[Path]:
    """`./search_spaces` (a user's own studies) first, then the studies shipped with the package."""
    return [Path.cwd() / "search_spaces", BUILTIN_STUDIES]


def resolve_study_file(study: str, search_dirs: list[Path] | None = None) -> Path:
    """`--study` is a path to a YAML file, or a NAME looked up as `search_spaces/NAME.yaml`."""
    candidate = Path(study).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise PathError(f"--study {study}: no such file")
        return candidate
    if "/" in study or "\\" in study or ".." in study or not re.fullmatch(r"[\w.-]+", study):
        raise PathError(
            f"--study {study!r}: a study name may not contain '/', '..' or spaces; "
            "give a path to an existing .yaml file or a name from `ranksearch list`"
        )
    dirs = search_dirs if search_dirs is not None else study_search_dirs()
    for d in dirs:
        for suffix in (".yaml", ".yml"):
            path = d / f"{study}{suffix}"
            if path.is_file():
                return path
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.y*ml")})
    raise PathError(
        f"--study {study}: no study file named {study}.yaml in "
        + ", ".join(str(d) for d in dirs)
        + f". Known studies: {', '.join(known) or 'none'}"
    )


def resolve_package_path(uri: str) -> Path:
    """`package://pkg/sub/file` -> the file inside the installed package `pkg`.

    The package is located without importing it (some data packages fail to import).
    """
    rest = uri.removeprefix(PACKAGE_SCHEME)
    package, _, inner = rest.partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise PathError(
            f"{uri}: package `{package}` is not installed; install it "
            f"(for the default study: pip install -e '.[demo]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise PathError(f"{uri}: `{inner}` does not exist inside package `{package}`")
    return path


def local_path(source: str) -> Path | None:
    """The local file or directory a model/data source names, or None for a hub id."""
    if source.startswith(PACKAGE_SCHEME):
        return resolve_package_path(source)
    path = Path(source).expanduser()
    if path.exists() or source.startswith(("/", "./", "../", "~")):
        return path
    return None


def study_dir(study_name: str, out: Path | None) -> Path:
    """`--out`, else runs/<study>; absolute, so that workers and MLflow find it from any working
    directory. Nothing a study stores depends on it: trials record their folders relative to it,
    and every command resolves them from the directory it is given (a study can be moved)."""
    return (out if out is not None else Path("runs") / study_name).absolute()


def model_reference(source: str) -> str:
    """How a study's `model` is named for use elsewhere: a `package://` path or a hub id as
    given (resolved where it is loaded), a local path made absolute."""
    if source.startswith(PACKAGE_SCHEME):
        return source
    path = local_path(source)
    return source if path is None else str(path.absolute())


def trial_dir(study_dir: Path, trial: FrozenTrial) -> Path:
    """A trial's folder, found from the study directory it is read from.

    Trials record it relative to the study directory (`trials/3`), so a copied or moved study
    still finds its trials. Studies written before recorded it absolute: that path is used where
    it still exists, else the trial's `trials/<n>` in this study directory.
    """
    recorded = Path(trial.user_attrs.get("trial_dir") or f"trials/{trial.number}")
    if recorded.is_absolute() and not recorded.exists():
        return study_dir / "trials" / recorded.name
    return study_dir / recorded


def creatable_dir(path: Path) -> bool:
    """Whether `path` is a writable directory or could be created, judged without writing."""
    for parent in (path, *path.parents):
        if parent.exists():
            return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    return False


def path_option(text: str) -> Path:
    """An argparse `type` for a directory option: an empty value is refused, not taken as the
    current directory (`Path("")` is `.`)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty path; give a directory, or leave the option out for its default"
        )
    return Path(text)


def installed_roots() -> list[Path]:
    """Where installed packages live (site-packages, and this package itself when it is
    installed in editable mode from a checkout): no study writes there."""
    paths = sysconfig.get_paths()
    roots = {paths["purelib"], paths["platlib"], *site.getsitepackages()}
    roots.add(str(Path(__file__).parents[1]))
    return sorted(Path(r).resolve() for r in roots)


def out_problems(out: Path, data_sources: list[str | None] = ()) -> list[Problem]:
    """`--out` must be a directory this process can write, or one it can create, outside any
    installed package and apart from the data: not the folder of a data file nor inside a data
    directory (a study writes its own `data/`, `trials/` and databases there)."""
    if out.exists() and not out.is_dir():
        return [Problem("--out", f"{out} is a file, not a directory; give a directory path")]
    if not creatable_dir(out):
        return [Problem("--out", f"{out} is not a directory that can be written or created")]
    where = out.resolve()
    fix = "give a directory of its own, e.g. runs/<study> (the default)"
    for root in installed_roots():
        if where.is_relative_to(root):
            return [Problem("--out", f"{out} is inside the installed packages ({root}); {fix}")]
    for source in filter(None, data_sources):
        try:
            path = local_path(source)
        except PathError:
            continue  # said by the data checks
        if path is None:
            continue
        data = path.resolve()
        if data.is_dir() and where.is_relative_to(data):
            return [Problem("--out", f"{out} is inside the data directory {data}; {fix}")]
        if where == data.parent:
            return [Problem("--out", f"{out} is the folder of the data file {data}; {fix}")]
    return []


# `user:password@` wherever a parser would not find it (no scheme, a malformed host): from the
# user name's colon to the last `@`, so that a password holding `/` or `@` is hidden whole
USERINFO = re.compile(r"^(?P<head>(?:[\w+.-]*://)?[^:/@]*):(?!//).*@", re.DOTALL)


def redact_url(url: str) -> str:
    """Hide the password in a storage or tracking URL: `postgresql://u:***@host/db`, also in
    a malformed one (`u:pw@host/db`, `postgresql://u:pw@[::1/db`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.password is None:
        # unparsed; `u:pw@host` read as scheme `u`; `s://u:p/w@host`, whose password SQLAlchemy
        # reads up to the `@` (an `@` in a URL's path is hidden too: better than a password)
        return USERINFO.sub(r"\g<head>:***@", url)
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
