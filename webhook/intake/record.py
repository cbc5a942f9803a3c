"""Recording a callback, whichever way it came: ``POST /callback`` (:mod:`webhook.intake.http`), a
TDMQ message (:mod:`webhook.intake.consumer`) or a job reconcile found (:mod:`webhook.intake.reconcile`).

Each channel stores the request its own way (headers, where it came from), then calls
:func:`record_callback`: triage, then one ledger transaction. A job already known is a duplicate;
callbacks recording the same job at the same moment are sorted out inside the ledger. The errors,
and what each channel does with them:

- :class:`~webhook.ledger.LedgerUnavailable`: nothing was stored, and the same callback may be
  stored later (the database is away, its disk full, its schema broken). HTTP answers 503 with
  ``Retry-After``, the consumer leaves the message on its queue, reconcile reports the run failed.
- :class:`~webhook.ledger.LedgerRefused`, a kind of the former: the database can never hold what
  this callback says. The consumer keeps the message with the reason, so that it does not come back
  for ever; HTTP answers the same 503: to a sender, a callback not stored is one to send again.
"""

from __future__ import annotations

from webhook.intake.triage import triage
from webhook.ledger import Ledger, RawRequest, Recorded
from webhook.models import Callback
from webhook.telemetry import metrics


def record_callback(
    ledger: Ledger, raw: RawRequest, callback: Callback, allowed_tags: frozenset[str], max_versions: int
) -> Recorded:
    """Store ``raw`` and the jobs ``callback`` reports: those with an allowed tag are verified and forwarded,
    a known job's new version only while the job has fewer than ``max_versions`` (else it is kept, capped)."""
    recorded = ledger.jobs.record(raw, callback, triage(callback, allowed_tags), max_versions)
    metrics.versions_capped(len(recorded.capped))
    return recorded


def record_unless_known(
    ledger: Ledger, raw: RawRequest, callback: Callback, allowed_tags: frozenset[str]
) -> Recorded | None:
    """:func:`record_callback` for a callback nobody sent (reconcile's): stored only if the ledger
    knows none of its jobs, else not at all (None). Runs that find the same job at once store it once."""
    return ledger.jobs.record_new(raw, callback, triage(callback, allowed_tags))
