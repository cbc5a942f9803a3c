"""Queue messages that are not a readable callback: kept with the reason, listed, re-parsed later.

A consumer stores such a message (:meth:`Quarantine.keep`) and only then deletes it from its queue,
so a poisoned message neither blocks the queue nor is lost. The same message handed over again
(its delete was lost) counts one more delivery of the same row. Once a fix makes it readable,
:meth:`Quarantine.resolve` marks it recorded, with the callback it became.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from webhook.ledger.errors import LedgerError, begin, connect
from webhook.ledger.schema import messages, utcnow

QUARANTINED = "quarantined"
RECORDED = "recorded"


@dataclass(frozen=True)
class KeptMessage:
    """A message as the queue handed it over, why it could not be read, and what became of it."""

    id: int
    queue: str
    msg_id: str
    body: bytes
    reason: str
    status: str
    deliveries: int
    callback_id: int | None
    received_at: datetime
    updated_at: datetime

    def to_dict(self, body: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "queue": self.queue,
            "msg_id": self.msg_id,
            "status": self.status,
            "reason": self.reason,
            "deliveries": self.deliveries,
            "callback_id": self.callback_id,
            "received_at": self.received_at.isoformat() + "Z",
            "updated_at": self.updated_at.isoformat() + "Z",
        }
        return out | ({"body": self.body.decode("utf-8", "replace")} if body else {})


class Quarantine:
    """The ``messages`` table."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = postgresql if engine.dialect.name == "postgresql" else sqlite

    def keep(self, queue: str, msg_id: str, body: bytes, reason: str) -> int:
        """Store the message (or count one more delivery of it); its row id. Committed on return."""
        now = utcnow()
        insert = self._dialect.insert(messages).values(
            queue=queue[:128],
            msg_id=msg_id[:128],
            body=body,
            reason=reason,
            status=QUARANTINED,
            deliveries=1,
            received_at=now,
            updated_at=now,
        )
        upsert = insert.on_conflict_do_update(
            index_elements=[messages.c.queue, messages.c.msg_id],
            set_={"deliveries": messages.c.deliveries + 1, "updated_at": now},
        ).returning(messages.c.id)
        with begin(self._engine) as conn:
            return int(conn.execute(upsert).scalar_one())

    def listed(
        self, status: str | None = QUARANTINED, since: datetime | None = None, limit: int = 1000
    ) -> list[KeptMessage]:
        """Kept messages, oldest first: those still quarantined, or every one with ``status`` None."""
        query = sa.select(messages).order_by(messages.c.received_at, messages.c.id).limit(limit)
        if status is not None:
            query = query.where(messages.c.status == status)
        if since is not None:
            query = query.where(messages.c.updated_at >= since)
        with connect(self._engine) as conn:
            return [_kept(row) for row in conn.execute(query)]

    def get(self, message_id: int) -> KeptMessage:
        with connect(self._engine) as conn:
            row = conn.execute(sa.select(messages).where(messages.c.id == message_id)).first()
        if row is None:
            raise LedgerError(f"no kept message #{message_id}")
        return _kept(row)

    def resolve(self, message_id: int, callback_id: int) -> None:
        """The message was read after all and recorded as callback ``callback_id``."""
        self._update(message_id, status=RECORDED, callback_id=callback_id, reason="")

    def refuse(self, message_id: int, reason: str) -> None:
        """Reading it again failed: keep it quarantined with the latest reason."""
        self._update(message_id, reason=reason)

    def count(self) -> int:
        """Messages still quarantined, for metrics."""
        query = sa.select(sa.func.count()).select_from(messages).where(messages.c.status == QUARANTINED)
        with connect(self._engine) as conn:
            return int(conn.execute(query).scalar_one())

    def _update(self, message_id: int, **values: Any) -> None:
        with begin(self._engine) as conn:
            updated = conn.execute(
                messages.update().where(messages.c.id == message_id).values(**values, updated_at=utcnow())
            ).rowcount
        if not updated:
            raise LedgerError(f"no kept message #{message_id}")


def _kept(row: Any) -> KeptMessage:
    return KeptMessage(
        id=row.id,
        queue=row.queue,
        msg_id=row.msg_id,
        body=bytes(row.body),
        reason=row.reason,
        status=row.status,
        deliveries=row.deliveries,
        callback_id=row.callback_id,
        received_at=row.received_at,
        updated_at=row.updated_at,
    )
