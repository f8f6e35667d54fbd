"""Every name db exports loads, and loading the background writer leaves SQLAlchemy out."""

import subprocess
import sys

import db


def test_every_export_loads():
    for name in db.__all__:
        assert getattr(db, name) is not None


def test_background_writer_does_not_load_sqlalchemy():
    code = ("import sys, db.background; "
            "assert 'sqlalchemy' not in sys.modules, 'sqlalchemy loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_head_constant_is_alembics_head():
    from db import migrate
    assert migrate.head() == migrate.HEAD
