"""The ledger: one hash chain of signed entries per host, each covering rows (db.ledger).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Rows written before this revision have no entries: `egress verify` names the
first of them. Frozen: a later schema change is a new revision.
"""

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

HEX = sa.String(length=64)


def upgrade() -> None:
    op.create_table(
        "ledger",
        sa.Column("host", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("op", sa.String(length=32), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=True),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("digest", HEX, nullable=False),
        sa.Column("prev", HEX, nullable=False),
        sa.Column("hash", HEX, nullable=False),
        sa.Column("mac", HEX, nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.CheckConstraint("op IN ('insert', 'update', 'carry', 'prune')",
                           name=op.f("ck_ledger_op")),
        sa.PrimaryKeyConstraint("host", "seq", name=op.f("pk_ledger")),
    )


def downgrade() -> None:
    op.drop_table("ledger")
