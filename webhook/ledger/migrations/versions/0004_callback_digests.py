"""Callbacks keep their body's hash and size; a body seen before is not stored a second time.

Plain added columns and indexes: no table is rebuilt, so this is quick on a large ledger.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("callbacks", sa.Column("sha256", sa.String(64), nullable=True))
    op.add_column("callbacks", sa.Column("size", sa.Integer, nullable=True))
    op.add_column("callbacks", sa.Column("body_of", sa.Integer, nullable=True))
    op.create_index("ix_callbacks_sha256", "callbacks", ["sha256"])
    op.create_index("ix_callbacks_received", "callbacks", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_callbacks_received", "callbacks")
    op.drop_index("ix_callbacks_sha256", "callbacks")
    with op.batch_alter_table("callbacks") as batch:
        for column in ("body_of", "size", "sha256"):
            batch.drop_column(column)
