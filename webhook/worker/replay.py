"""Giving jobs another chance, the same way from the command line and the dashboard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from webhook.ledger import DeadLetter, Ledger, Replayed
from webhook.sinks.config import SinkSpec


def replay_job(
    ledger: Ledger, specs: Mapping[str, SinkSpec], job_id: str, chosen: Sequence[str] = (), by: str = "replay"
) -> Replayed:
    """Verify the job again if it never got through verification, else deliver it again to ``chosen``
    or, when none is chosen, to every configured sink that takes it. ``by`` names who asked, in the
    job's timeline.

    Raises :class:`~webhook.ledger.LedgerError` for an unknown job or one still waiting for verification.
    """
    job = ledger.views.show_job(job_id).job
    wanted = tuple(chosen) or tuple(name for name, spec in specs.items() if job is not None and spec.accepts(job))
    return ledger.jobs.replay(job_id, wanted, by)


def replay_letter(ledger: Ledger, letter: DeadLetter, by: str = "replay") -> Replayed:
    """A dead verification is verified again; a dead delivery is delivered again to its sink only."""
    return ledger.jobs.replay(letter.job_id, [letter.sink] if letter.sink else [], by)
