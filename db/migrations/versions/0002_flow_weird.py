"""Flows get ``weird`` (anomalies) and ``tunnel`` (CONNECT/SOCKS); bindings their resolver.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Both JSON text, like the sub-records; null in rows written before them.
"""

from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("flows", sa.Column("weird", sa.Text(), nullable=True))
    op.add_column("flows", sa.Column("tunnel", sa.Text(), nullable=True))
    op.add_column("dns_bindings", sa.Column("resolver", sa.String(length=64), nullable=True))
    op.add_column("dns_bindings", sa.Column("resolver_port", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("dns_bindings", "resolver_port")
    op.drop_column("dns_bindings", "resolver")
    op.drop_column("flows", "tunnel")
    op.drop_column("flows", "weird")
