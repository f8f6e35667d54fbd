"""Migrations: a fresh database comes up at head; newer or broken ones are refused loudly."""

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from db import Store, StoreError
from db import migrate
from db.engine import make_engine
from db.models import Base

TABLES = {"capture_runs", "tasks", "flows", "findings", "task_events", "dns_bindings"}


def test_fresh_database_is_at_head_with_the_tables(store_url):
    with Store.open(store_url) as store:
        with store.engine.connect() as conn:
            assert migrate.current(conn) == (migrate.head(),)
            assert TABLES <= set(sa.inspect(conn).get_table_names())


def test_migrations_build_exactly_the_models(store_url):
    with Store.open(store_url) as store, store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                Base.metadata)
    assert diff == []


def test_reopening_keeps_data(store_url, ):
    from tests.factories import make_flow
    flow = make_flow()
    with Store.open(store_url) as store:
        store.write([flow])
    with Store.open(store_url) as store:
        assert store.flows() == [flow]


def test_unknown_revision_is_refused(store_url):
    Store.open(store_url).close()
    engine = make_engine(store_url)
    version = sa.table("alembic_version", sa.column("version_num"))
    with engine.begin() as conn:
        conn.execute(sa.update(version).values(version_num="9999_from_the_future"))
    engine.dispose()
    with pytest.raises(StoreError) as caught:
        Store.open(store_url)
    message = str(caught.value)
    assert "9999_from_the_future" in message and "newer egress" in message
    assert "\n" not in message


def test_failed_migration_is_an_error_not_a_warning(store_url):
    # A table of that name already there makes 0001's CREATE TABLE fail.
    engine = make_engine(store_url)
    squatter = sa.Table("flows", sa.MetaData(), sa.Column("x", sa.Integer))
    with engine.begin() as conn:
        squatter.create(conn)
    engine.dispose()
    with pytest.raises(StoreError) as caught:
        Store.open(store_url)
    assert "migrating the database failed" in str(caught.value)
    assert "\n" not in str(caught.value)
