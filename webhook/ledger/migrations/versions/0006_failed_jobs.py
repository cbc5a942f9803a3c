"""Jobs CI reports did not succeed get their own status: ``failed`` instead of ``delivered``.

Data only: the jobs already delivered as a failure event are marked ``failed`` with CI's code and
message as their reason, read from the stored job (as the code now writes them).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_jobs = sa.table(
    "jobs", sa.column("job_id", sa.String), sa.column("state", sa.String), sa.column("status", sa.String),
    sa.column("reason", sa.String), sa.column("detail", sa.Text),
)  # fmt: skip


def _failure(state: str, detail: str) -> str:
    """As ``Job.failure`` says it; a detail that cannot be read leaves CI's state alone."""
    try:
        stored = json.loads(detail)
        said = ": ".join(str(part) for part in (stored.get("code"), stored.get("message")) if part)
    except (ValueError, AttributeError):
        said = ""
    return f"CI reports {state}" + (f" ({said})" if said else "")


def upgrade() -> None:
    conn = op.get_bind()
    failed = conn.execute(
        sa.select(_jobs.c.job_id, _jobs.c.state, _jobs.c.detail, _jobs.c.reason).where(
            _jobs.c.status == "delivered", _jobs.c.state != "Success"
        )
    ).all()
    for row in failed:
        reason = _failure(row.state, row.detail) + (f"; {row.reason}" if row.reason else "")
        conn.execute(_jobs.update().where(_jobs.c.job_id == row.job_id).values(status="failed", reason=reason))


def downgrade() -> None:
    conn = op.get_bind()
    conn.execute(_jobs.update().where(_jobs.c.status == "failed").values(status="delivered", reason=""))
