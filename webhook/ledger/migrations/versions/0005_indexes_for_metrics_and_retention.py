"""Indexes that keep metrics scrapes and retention cheap on a large ledger.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_status", "jobs", ["status", "updated_at"])
    op.create_index("ix_tasks_groups", "tasks", ["status", "kind", "sink", "run_after"])


def downgrade() -> None:
    op.drop_index("ix_tasks_groups", "tasks")
    op.drop_index("ix_jobs_status", "jobs")
