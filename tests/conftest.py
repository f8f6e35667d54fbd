"""Shared fixtures: ``store_url`` runs a test on SQLite and on a throwaway PostgreSQL."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from db import Store

from hypothesis import settings as _hypothesis_settings

# No per-example deadline: on a loaded 2-core CI machine a slow example is not a bug,
# and a deadline there only makes the suite flaky. Examples are still bounded in number.
_hypothesis_settings.register_profile("egress", deadline=None)
_hypothesis_settings.load_profile("egress")


@dataclass(frozen=True)
class PostgresServer:
    """A unix-socket-only cluster this test session started, with one database for tests."""

    socket_dir: str
    port: int
    dbname: str

    def url(self, schema: str | None = None) -> str:
        """The test database; with a schema, one that only that schema is visible in."""
        url = (f"postgresql+psycopg://postgres@/{self.dbname}"
               f"?host={self.socket_dir}&port={self.port}")
        return url + (f"&options=-csearch_path%3D{schema}" if schema else "")

    def execute(self, statement, dbname: str | None = None) -> None:
        """Run one admin statement (psycopg.sql composed, never formatted by hand)."""
        import psycopg
        with psycopg.connect(host=self.socket_dir, port=self.port, user="postgres",
                             dbname=dbname or self.dbname, autocommit=True) as conn:
            conn.execute(statement)


def _pg_bindir() -> Path | None:
    """The newest PostgreSQL's bin folder, or the one on PATH."""
    def version(path):
        try:
            return int(Path(path).parent.name)
        except ValueError:
            return 0
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version)
    for candidate in reversed(found):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    return Path(initdb).parent if initdb and pg_ctl else None


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required in CI (install the postgresql package): {reason}",
                    pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


def _free_port() -> int:
    # Only names the socket file; still free on TCP so a stray default never collides.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """Start a throwaway cluster (as user postgres when root); stop and remove it afterwards."""
    bindir = _pg_bindir()
    if bindir is None:
        _unavailable("no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH")
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd
        try:
            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no 'postgres' user to run the server")
        as_user = ["runuser", "-u", "postgres", "--"]

    root = tempfile.mkdtemp(prefix="egress-pg-")
    data, log = os.path.join(root, "data"), os.path.join(root, "server.log")
    if as_user:
        os.chown(root, pg_user.pw_uid, pg_user.pw_gid)
    port = _free_port()
    started = False

    def run(*argv):
        result = subprocess.run(as_user + [str(bindir / argv[0]), *argv[1:]],
                                capture_output=True, text=True, cwd=root)
        if result.returncode != 0:
            tail = Path(log).read_text()[-2000:] if os.path.exists(log) else ""
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}): "
                               f"{result.stderr.strip()}\n{tail}")

    try:
        run("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-locale", "--no-sync")
        options = (f"-c listen_addresses='' -k {root} -p {port} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        started = True  # from here a half-started server must be stopped too
        run("pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start")
        from psycopg import sql
        server = PostgresServer(socket_dir=root, port=port, dbname=f"egress_test_{os.getpid()}")
        server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(server.dbname)),
                       dbname="postgres")
        yield server
    finally:
        try:
            if started and os.path.exists(os.path.join(data, "postmaster.pid")):
                run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(root, ignore_errors=True)


_schemas = itertools.count(1)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty database: a SQLite file, or a new schema in the test cluster's database.

    A schema per test, not a database: CREATE DATABASE costs a checkpoint each time.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'egress.db'}"
        return
    from psycopg import sql
    server: PostgresServer = request.getfixturevalue("postgres_server")
    schema = f"test_{next(_schemas)}"
    server.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield server.url(schema)
    finally:
        server.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def store(store_url):
    """An open Store on a fresh database; closed after the test."""
    with Store.open(store_url) as s:
        yield s


@pytest.fixture(autouse=True)
def _ledger_key(tmp_path_factory, monkeypatch):
    """Stores written by tests sign with a key of the test session, never the host's."""
    monkeypatch.setenv("EGRESS_LEDGER_KEY",
                       str(tmp_path_factory.getbasetemp() / "ledger.key"))
