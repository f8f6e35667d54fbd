"""Alembic environment: runs on the connection db.migrate passes in, never from an ini file.

A new revision: `python -c "import db.migrate as m; m.new_revision('what', '0002')"`.
"""

from alembic import context

from db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("egress migrations run through db.migrate, with a connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things; batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
