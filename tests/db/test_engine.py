"""Where the database is, and how engines are set up."""

import os

import pytest

from db import Store, StoreError, default_url, resolve_url
from db.engine import make_engine, normalize_url


def test_default_is_under_var_lib_for_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_DATA_HOME", "/somewhere")
    assert default_url() == "sqlite:////var/lib/egress/egress.db"


def test_default_is_under_xdg_data_home_for_users(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_url() == f"sqlite:///{tmp_path}/data/egress/egress.db"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset_or_relative in ("", "relative/dir"):
        monkeypatch.setenv("XDG_DATA_HOME", unset_or_relative)
        assert default_url() == f"sqlite:///{tmp_path}/home/.local/share/egress/egress.db"


def test_precedence_cli_then_env_then_config_then_default(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv("EGRESS_DB", raising=False)
    assert resolve_url(None, None) == default_url()
    assert resolve_url(None, "sqlite:////c.db") == "sqlite:////c.db"
    monkeypatch.setenv("EGRESS_DB", "sqlite:////e.db")
    assert resolve_url(None, "sqlite:////c.db") == "sqlite:////e.db"
    assert resolve_url("sqlite:////cli.db", "sqlite:////c.db") == "sqlite:////cli.db"


def test_plain_paths_are_sqlite_files(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EGRESS_DB", raising=False)
    assert resolve_url("ledger.db", None) == f"sqlite:///{tmp_path}/ledger.db"
    assert resolve_url("/srv/x/egress.db", None) == "sqlite:////srv/x/egress.db"


def test_postgresql_gets_psycopg_3():
    assert normalize_url("postgresql://u:pw@db.example/egress") == \
        "postgresql+psycopg://u:pw@db.example/egress"
    assert normalize_url("postgresql+psycopg://u@h/e") == "postgresql+psycopg://u@h/e"
    assert make_engine("postgresql://u@h/e").dialect.driver == "psycopg"


def test_bad_url_is_a_store_error():
    for url in ("nonsense://", "postgresql://:x:@"):
        with pytest.raises(StoreError) as caught:
            Store.open(url)
        assert "\n" not in str(caught.value)


def test_sqlite_folder_is_created_with_wal_and_foreign_keys(tmp_path):
    path = tmp_path / "a" / "b" / "egress.db"
    with Store.open(str(path)) as store, store.engine.connect() as conn:
        assert path.exists()
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_unreachable_postgresql_is_a_one_line_store_error(tmp_path):
    url = f"postgresql://nobody@/egress?host={tmp_path}&port=1"
    with pytest.raises(StoreError) as caught:
        Store.open(url)
    assert "cannot open the database" in str(caught.value)
    assert "\n" not in str(caught.value)
