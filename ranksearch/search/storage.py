"""Optuna storage: open it with heartbeats, check it is reachable before anything runs, and
find the study `run` wrote for the commands that read it (`report`, `status`, `export`)."""

from __future__ import annotations

import contextlib
import fcntl
import zlib
from collections.abc import Iterator
from pathlib import Path

import optuna

from ranksearch.config.paths import creatable_dir, redact_url
from ranksearch.config.problems import StudyError

HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a RUNNING trial without a heartbeat for this long is failed by any worker


class StorageError(Exception):
    """The storage URL cannot be used; `message` carries the redacted URL and the fix, `key`
    the option to change."""

    def __init__(self, message: str, key: str = "--storage"):
        self.key, self.message = key, message
        super().__init__(f"`{key}` {message}")


def default_storage_url(study_dir: Path) -> str:
    return f"sqlite:///{study_dir.resolve() / 'optuna.db'}"


def open_existing(
    study_name: str, study_dir: Path, url: str | None, *, source: str, run_first: str
) -> optuna.Study:
    """The study `run` wrote, in `url` or else in `study_dir`'s optuna.db. Raises StudyError
    naming `--out` or `--storage` when it is not there (`run_first`: the command that makes
    it), StorageError when the storage cannot be reached."""
    if url is None and not (study_dir / "optuna.db").is_file():
        problem = f"no study in {study_dir}; run it first ({run_first}) or pass --out/--storage"
        raise StudyError([("--out", problem)], source)
    url = url or default_storage_url(study_dir)
    check_storage(url)
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(url))
    except KeyError:
        problem = f"no study {study_name!r} in {redact_url(url)}"
        raise StudyError([("--storage", problem)], source) from None


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # several orchestrators on one SQLite file wait for the lock instead of failing
        return {"connect_args": {"timeout": 60}}
    # An orchestrator uses a connection or two at a time (its loop, the heartbeat, the study
    # lock): a small pool keeps many workers on one server far from its max_connections.
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 4}


def check_storage(url: str) -> None:
    """Connect once (nothing is written); raise StorageError naming `--storage` and the fix."""
    import sqlalchemy

    shown = redact_url(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # ValueError: a port that is no number
        raise StorageError(
            f"{shown}: not a database URL; use e.g. sqlite:///runs/x/optuna.db or "
            "postgresql://user:password@host:5432/db"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        parent = Path(parsed.database or ".").expanduser().resolve().parent
        if not creatable_dir(parent):
            raise StorageError(
                f"{shown}: {parent} is not a directory that can be written or created"
            )
        return
    connect_args = {"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=connect_args)
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as e:
        raise StorageError(
            f"{shown}: driver {e.name!r} is not installed; "
            "pip install 'ranksearch[postgres]' (psycopg) or the driver for your database"
        ) from None
    except Exception as e:  # noqa: BLE001 - drivers raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(
            f"{shown}: cannot connect ({first.replace(url, shown)}). "
            "Check that the server runs and the URL, user and database are right."
        ) from None


@contextlib.contextmanager
def init_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock while a database's schema is created or migrated.

    Several orchestrators starting at once on a fresh database would otherwise race through the
    same DDL ("duplicate column name" on SQLite, "studydirection already exists" on
    PostgreSQL). SQLite: a file lock beside the database; PostgreSQL: an advisory lock.
    """
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with _advisory_lock(engine, "ranksearch:schema"):
            yield
        engine.dispose()
    else:
        yield


@contextlib.contextmanager
def _advisory_lock(engine, name: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock (the server releases it if the holder dies)."""
    import sqlalchemy

    key = zlib.crc32(name.encode())
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def open_storage(
    url: str, heartbeat_interval: float = HEARTBEAT_INTERVAL, grace_period: float = GRACE_PERIOD
) -> optuna.storages.RDBStorage:
    with init_lock(url):
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=max(1, round(heartbeat_interval)),
            grace_period=max(1, round(grace_period)),
        )


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Hold the study's lock: every process on the study serializes "count trials, then ask".

    This is what makes `budget.n_trials` a cap on the whole study: two workers cannot both see
    one trial left and both start it. PostgreSQL: a session advisory lock (released by the
    server if the holder dies); SQLite (one machine): a file lock.
    """
    engine = getattr(storage, "_backend", storage).engine  # Optuna wraps it in a cache
    backend = engine.url.get_backend_name()
    if backend == "sqlite":
        with init_lock(f"sqlite:///{engine.url.database}"):
            yield
    elif backend == "postgresql":
        with _advisory_lock(engine, f"ranksearch:study:{study_name}"):
            yield
    else:  # other databases: counts and asks are not serialized (a trial or two over n_trials)
        yield


def trials_without_heartbeat(storage: optuna.storages.BaseStorage, study_id: int) -> set[int]:
    """Ids of the study's RUNNING trials that never recorded a heartbeat.

    Optuna's stale check looks only at trials with a heartbeat; a trial lost between `ask` and
    its first heartbeat would stay RUNNING for ever. Read from Optuna's own tables."""
    import sqlalchemy

    engine = getattr(storage, "_backend", storage).engine
    query = sqlalchemy.text(
        "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id"
        " WHERE t.study_id = :study AND t.state = 'RUNNING' AND h.trial_id IS NULL"
    )
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(query, {"study": study_id})}
