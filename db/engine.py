"""Where the database is, and engines configured for it."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from db.errors import StoreError

ROOT_DB = Path("/var/lib/egress/egress.db")


def default_url() -> str:
    """SQLite under /var/lib/egress as root, else under the user's XDG data home."""
    if os.geteuid() == 0:
        return f"sqlite:///{ROOT_DB}"
    return f"sqlite:///{data_home() / 'egress' / 'egress.db'}"


def data_home() -> Path:
    """$XDG_DATA_HOME, or ~/.local/share (the XDG spec: a relative value is ignored)."""
    value = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(value):
        value = os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(value)


def resolve_url(cli_url: str | None, config_url: str | None) -> str:
    """The database to use: --db, then $EGRESS_DB, then the config file, then the default."""
    for candidate in (cli_url, os.environ.get("EGRESS_DB"), config_url):
        if candidate:
            return normalize_url(candidate)
    return normalize_url(default_url())


def normalize_url(url: str) -> str:
    """A plain path becomes a SQLite URL; PostgreSQL without a driver gets psycopg 3."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().absolute()}"
    parsed = _parse(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    parsed = _parse(normalize_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def make_engine(url: str) -> Engine:
    """An engine for the URL; SQLite gets its folder, WAL and foreign keys."""
    parsed = _parse(normalize_url(url))
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    engine = create_engine(parsed)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the recorder
    # WAL with synchronous=NORMAL: no corruption on a crash, one fsync a checkpoint
    # instead of one a transaction (a power cut may lose the last transactions).
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")  # SQLite leaves them off by default
    cursor.close()


def describe(url: str) -> str:
    """The URL for messages, password hidden."""
    try:
        return make_url(normalize_url(url)).render_as_string(hide_password=True)
    except (StoreError, ArgumentError, ValueError):
        return url.split("://", 1)[0] + "://..." if "://" in url else url


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise StoreError(f"not a database URL: {url!r}") from None
