"""The MLflow tracking store: its URI, the check that it is reachable, credentials kept out of
URIs, artifact locations rebased when a study moves, and retries over SQLite's write locks.

The tags ranksearch sets on runs are named here, for the tracker, the answer and the UI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ranksearch.config.paths import redact_url
from ranksearch.search.storage import StorageError, check_storage, init_lock

if TYPE_CHECKING:
    pass


T = TypeVar("T")
_log = logging.getLogger(__name__)
ROLE = "ranksearch.role"
ANSWER = "ranksearch.answer"  # on the best and recommended trials' runs: best, recommended
# on the parent run: the logged model of the recommendation, its trial, its registered version
MODEL_URI, MODEL_TRIAL, MODEL_VERSION = (
    "ranksearch.model_uri",
    "ranksearch.model_trial",
    "ranksearch.registered_model",
)


class TrackingError(Exception):
    """The tracking store (or the UI on it) cannot be used: `key` is the setting or option to
    change ("" when none is at fault), `message` what is wrong and the fix."""

    def __init__(self, message: str, key: str = "tracking.uri"):
        self.key, self.message = key, message
        super().__init__(f"`{key}` {message}" if key else message)


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{study_dir.resolve() / 'mlflow.db'}"


# where MLflow's SQLite store records artifact locations (absolute file:// URIs)
ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),  # registered versions of the logged models
)


def rebase_artifacts(uri: str, study_dir: Path) -> None:
    """Point the default store's artifact locations at `<study dir>/mlartifacts` where the study
    is now. MLflow records them as absolute URIs and offers no call to change them, so a copied
    or moved study would read and write its artifacts in the old place; every command that opens
    the default store rebases it first (a no-op once it points here). Other stores: untouched."""
    import sqlite3

    db = study_dir / "mlflow.db"
    if uri != default_tracking_uri(study_dir) or not db.is_file():
        return
    root = (study_dir / "mlartifacts").resolve().as_uri()
    with init_lock(uri), contextlib.closing(sqlite3.connect(db, timeout=60)) as conn, conn:
        try:
            rows = conn.execute("SELECT DISTINCT artifact_location FROM experiments").fetchall()
        except sqlite3.OperationalError:  # the schema is not created yet
            return
        for (old,) in rows:
            if not old.endswith("/mlartifacts") or old == root:
                continue  # MLflow's own Default experiment, or already here
            for table, column in ARTIFACT_COLUMNS:
                with contextlib.suppress(sqlite3.OperationalError):  # a table of another version
                    conn.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE substr({column}, 1, ?) = ?",
                        (root, len(old) + 1, len(old), old),
                    )


def check_tracking(uri: str) -> None:
    """Reach the tracking store once, before any trial starts."""
    shown = redact_url(uri)
    if uri.startswith(("http://", "https://")):
        import http.client
        import urllib.request

        try:
            with urllib.request.urlopen(_health_request(uri), timeout=5) as r:
                if r.status == 200:
                    return
        except (ValueError, http.client.InvalidURL) as e:  # a malformed host or port
            raise TrackingError(
                f"{shown}: not a valid URL ({str(e).replace(uri, shown)[:120]}); "
                "use http://host:port, e.g. http://127.0.0.1:5000"
            ) from None
        except OSError as e:
            raise TrackingError(
                f"{shown}: MLflow server not reachable ({e}); start it "
                "(mlflow server --host 127.0.0.1 --port 5000) or use `--no-mlflow`"
            ) from None
        raise TrackingError(f"{shown}: /health did not answer 200")
    if "://" not in uri:
        raise TrackingError(f"{shown}: expected sqlite:///..., a database URL or http://host:port")

    try:
        check_storage(uri)
    except StorageError as e:
        raise TrackingError(e.message) from None  # the same store problem, another setting


def _health_request(uri: str):
    """GET <server>/health, with the URL's user:password (if any) as basic auth, not in the URL."""
    import base64
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    url = urlunsplit(parts._replace(netloc=host)).rstrip("/") + "/health"
    request = urllib.request.Request(url)
    if parts.username:
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def credentials_to_env(uri: str) -> str:
    """Move `user:password@` out of an http URI into MLflow's own variables, so that nothing
    MLflow prints or stores carries the password; return the URI without them."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not uri.startswith(("http://", "https://")) or parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = parts.username
    os.environ["MLFLOW_TRACKING_PASSWORD"] = parts.password or ""
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def retry(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call an MLflow client method, waiting out SQLite write locks held by other processes."""
    delay = 0.05
    for attempt in range(12):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - MlflowException and sqlalchemy errors
            if "locked" not in str(e) or attempt == 11:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


def set_tag(client, run_id: str, key: str, value: str) -> None:
    """set_tag where another orchestrator of the study may set the same tag at the same moment:
    the store then refuses the second insert (a UNIQUE constraint); set again, it updates."""
    try:
        retry(client.set_tag, run_id, key, value)
    except Exception as e:  # noqa: BLE001 - the store's integrity error, whatever its type
        if "unique constraint" not in str(e).lower():
            raise
        retry(client.set_tag, run_id, key, value)


@contextlib.contextmanager
def global_uri(uri: str):
    """MLflow logs models through its global tracking URI (and exports it to the environment,
    for subprocesses): set for the call, then put back as it was."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def study_parents(client, experiment_id: str, study_name: str) -> list:
    """The study's parent runs in one store, earliest first (the earliest is the one used)."""
    runs = retry(
        client.search_runs,
        [experiment_id],
        f"tags.`{ROLE}` = 'study' and tags.`optuna.study_name` = '{study_name}'",
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def tracking_uri(cfg, study_dir: Path, uri_option: str | None) -> str:
    return (
        uri_option
        or cfg.tracking.uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(study_dir)
    )
