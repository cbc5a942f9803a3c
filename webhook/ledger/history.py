"""The attempt timeline: every try at a step, recorded in the transaction that records its outcome."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.engine import Connection

from webhook.ledger.claims import Attempt
from webhook.ledger.schema import attempts as attempt_rows


def record_attempts(conn: Connection, job_id: str, worker_id: str, tried: Sequence[Attempt]) -> None:
    """Add ``tried`` to the job's timeline, in the caller's transaction."""
    if tried:
        conn.execute(
            attempt_rows.insert(),
            [
                {
                    "job_id": job_id,
                    "kind": a.step,
                    "sink": a.sink,
                    "started_at": a.started_at,
                    "duration_ms": a.duration_ms,
                    "outcome": a.outcome,
                    "code": a.code[:64],
                    "error": a.error,
                    "worker_id": worker_id,
                }
                for a in tried
            ],
        )
