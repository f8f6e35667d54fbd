"""Flows get ``weird``: anomalies seen on the flow (midstream, overlap-conflict).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

A JSON list as text, like the sub-records; null in rows written before it.
"""

from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("flows", sa.Column("weird", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("flows", "weird")
