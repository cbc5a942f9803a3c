"""Recording callbacks: SQLite and PostgreSQL each have their own implementation, and store the same rows.

The same callbacks, with the same outcomes recorded between them, go to a ledger of each kind; what
each then answers and holds, read back through the ledger's views, must be the same but for ids
and times.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support.samples import numbered_job as job
from support.services import postgres_schema

from webhook.intake.triage import triage
from webhook.ledger import DeliveryClaim, Ledger, RawRequest, Recorded, VerifyClaim
from webhook.ledger.schema import callbacks
from webhook.models import Callback, Job, job_from_json, job_to_dict

TAGS = frozenset({"NoiseReduction"})
MAX_VERSIONS = 2  # versions verified per job: the steps reach it


def callback(*jobs: Job, event: str = "TaskFinish") -> tuple[RawRequest, Callback]:
    body = json.dumps({"EventName": event, "JobsDetail": [job_to_dict(j) for j in jobs]}).encode()
    raw = RawRequest(body=body, content_type="application/json", headers={"X-Test": "1"}, remote_addr="10.0.0.1")
    return raw, Callback(event_name=event, jobs=jobs, body_format="json")


# What arrives, in order, and what becomes of the jobs between callbacks. Each job's id says which.
STEPS: list[tuple[str, Any]] = [
    ("record", callback(job(1), job(2, tag="VoiceSeparate"))),  # a new job, and one only recorded
    ("reject", job(1)),
    ("record", callback(job(3))),
    ("give up", job(3)),  # its verification died: any callback for it gets it verified again
    ("record", callback(job(4))),
    ("deliver", job(4)),
    (
        "record",  # every kind of job at once, in no particular order
        callback(
            job(5),  # new
            job(4, state="Failed"),  # another version of a delivered job: a duplicate
            job(1, state="Failed"),  # another version of a rejected job: verified again
            job(3),  # the same version of a job whose verification died: verified again
            job(2),  # a job only recorded before, now with an allowed tag: a duplicate
            job(5, state="Failed"),  # a twin in the same callback: the first one counts
        ),
    ),
    ("record", callback(job(1, state="Failed"), job(5, state="Cancel"))),  # said before; a new version
    # Both have their most versions (MAX_VERSIONS): the new ones are kept, not verified; job 3 has one.
    ("record", callback(job(5, state="Pause"), job(1, state="Pause"), job(3, state="Failed"))),
    ("record", callback(job(5, state="Pause"))),  # said before: a duplicate, capped or not
    ("record", callback(job(6), event="TaskProgress")),  # another event: only recorded
    ("record", callback(job(6), event="TaskProgress")),  # the same body again: stored once
    ("record", callback()),  # no job at all
]


def run(ledger: Ledger) -> list[object]:
    """Play :data:`STEPS` on ``ledger``; what each recording answered."""
    answers: list[object] = []
    for action, what in STEPS:
        if action == "record":
            raw, parsed = what
            answers.append(answer(ledger.jobs.record(raw, parsed, triage(parsed, TAGS), MAX_VERSIONS)))
            continue
        got = ledger.queue.claim("w1", 60)
        assert isinstance(got, VerifyClaim)
        assert got.task.job_id == what.job_id
        version = got.versions[0]
        if action == "reject":
            assert ledger.queue.reject(got.task, "w1", "output differs", {version.id: "output differs"})
        elif action == "give up":
            assert ledger.queue.give_up(got.task, "w1", "CI API unreachable")
        else:
            accepted = job_from_json(version.detail)
            delivery = ledger.queue.accept_and_claim(got, "w1", ["http"], version, accepted, {}, (), 60)
            assert isinstance(delivery, DeliveryClaim)
            assert ledger.queue.complete(delivery.deliveries[0], "w1")
    return answers


def answer(recorded: Recorded) -> tuple[tuple[str, ...], ...]:
    return recorded.job_ids, recorded.duplicates, recorded.ignored, recorded.capped


def held(ledger: Ledger) -> dict[str, Any]:
    """Every job as the views show it, with its requests: callbacks numbered in order, times only there or not."""
    job_ids = sorted({j.job_id for _, what in STEPS if isinstance(what, tuple) for j in what[1].jobs})
    shown = {job_id: ledger.views.show_job(job_id).to_dict() for job_id in job_ids}
    requests = {job_id: ledger.views.raw_callbacks(job_id) for job_id in job_ids}
    numbers = {n: rank for rank, n in enumerate(sorted({r.id for rs in requests.values() for r in rs}))}
    return {
        "jobs": without_times(shown, numbers),
        "requests": {
            job_id: [(numbers[r.id], r.remote_addr, r.content_type, r.headers, bytes(r.body)) for r in rs]
            for job_id, rs in requests.items()
        },
        "counts": ledger.views.counts(),
    }


def without_times(value: Any, numbers: dict[int, int]) -> Any:
    if isinstance(value, dict):
        return {
            key: numbers[item]
            if key == "callback_id"
            else (item is not None)
            if key.endswith("_at")
            else without_times(item, numbers)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [without_times(item, numbers) for item in value]
    return value


@pytest.fixture
def ledgers(tmp_path: Path) -> Iterator[tuple[Ledger, Ledger]]:
    with postgres_schema() as url:
        sqlite, postgres = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}"), Ledger(url)
        for ledger in (sqlite, postgres):
            ledger.migrate()
        yield sqlite, postgres
        for ledger in (sqlite, postgres):
            ledger.dispose()


@pytest.mark.postgres
def test_both_databases_record_the_same_rows(ledgers: tuple[Ledger, Ledger]) -> None:
    sqlite, postgres = ledgers
    answers = run(sqlite)
    assert run(postgres) == answers
    assert held(postgres) == held(sqlite)
    # What the steps are there for, so that the comparison above covers each case.
    one, two, three, four, five, six = (job(n).job_id for n in range(1, 7))
    assert answers == [
        ((one, two), (), (two,), ()),
        ((three,), (), (), ()),
        ((four,), (), (), ()),
        ((five, one, three), (four, two), (), ()),
        ((five,), (one,), (), ()),
        ((three,), (five, one), (), (five, one)),
        ((), (five,), (), ()),
        ((six,), (), (six,), ()),
        ((), (six,), (), ()),
        ((), (), (), ()),
    ]
    versions = {job_id: [v["status"] for v in view["callbacks"]] for job_id, view in held(sqlite)["jobs"].items()}
    assert versions[five] == versions[one] == ["pending", "pending", "capped"]
    statuses = {job_id: view["status"] for job_id, view in held(sqlite)["jobs"].items()}
    assert statuses == {
        one: "received",
        two: "ignored",
        three: "received",
        four: "delivered",
        five: "received",
        six: "ignored",
    }


@pytest.mark.postgres
def test_callbacks_recording_the_same_new_job_at_once_each_get_an_answer() -> None:
    # SQLite takes its write lock up front, so only PostgreSQL's writers meet on the job's key.
    with postgres_schema() as url:
        ledger = Ledger(url)
        ledger.migrate()
        try:
            start = threading.Barrier(8)

            def send(state: str) -> Recorded:
                raw, parsed = callback(job(1, state=state), job(2))
                start.wait()
                return ledger.jobs.record(raw, parsed, triage(parsed, TAGS))

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(send, ["Success"] * 4 + ["Failed"] * 4))
            view = ledger.views.show_job(job(1).job_id)
        finally:
            ledger.dispose()
    one, two = job(1).job_id, job(2).job_id
    assert sum(one in a.job_ids for a in answers) == 2  # each version once: the first, then the other one
    assert sum(two in a.job_ids for a in answers) == 1
    assert all({*a.job_ids, *a.duplicates} == {one, two} for a in answers)
    assert len(view.versions) == 2
    assert [(t.kind, t.status) for t in view.tasks] == [("verify", "pending")]


def test_record_new_stores_a_callback_only_when_every_job_is_new(ledger: Ledger) -> None:
    def stored() -> int:
        with ledger.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(callbacks)).scalar_one())

    raw, parsed = callback(job(1))
    ledger.jobs.record(raw, parsed, triage(parsed, TAGS))
    # A new version of a job still to be verified would be kept by record; record_new keeps nothing.
    for known in (callback(job(1, state="Failed")), callback(job(2), job(1))):
        assert ledger.jobs.record_new(*known, triage(known[1], TAGS)) is None
    assert stored() == 1
    raw, parsed = callback(job(2))
    recorded = ledger.jobs.record_new(raw, parsed, triage(parsed, TAGS))
    assert recorded is not None
    assert (recorded.job_ids, recorded.duplicates, stored()) == ((job(2).job_id,), (), 2)


def test_a_capped_version_is_kept_but_never_verified(ledger: Ledger) -> None:
    first, second = callback(job(1)), callback(job(1, state="Failed"))
    ledger.jobs.record(*first, triage(first[1], TAGS), 1)
    got = ledger.queue.claim("w1", 60)
    assert isinstance(got, VerifyClaim)
    assert ledger.queue.reject(got.task, "w1", "output differs", {got.versions[0].id: "output differs"})
    recorded = ledger.jobs.record(*second, triage(second[1], TAGS), 1)
    assert (recorded.job_ids, recorded.duplicates, recorded.capped) == ((), (job(1).job_id,), (job(1).job_id,))
    view = ledger.views.show_job(job(1).job_id)
    assert view.status == "rejected"  # not verified again for it
    assert [v.status for v in view.versions] == ["rejected", "capped"]
    assert "the most one job may have" in view.versions[1].reason
    assert len(ledger.views.raw_callbacks(job(1).job_id)) == 2  # its request is kept all the same
    # Verified again (a replay): every version but the capped one.
    ledger.jobs.replay(job(1).job_id, [])
    again = ledger.queue.claim("w1", 60)
    assert isinstance(again, VerifyClaim)
    assert [v.id for v in again.versions] == [got.versions[0].id]
    assert [v.status for v in ledger.views.show_job(job(1).job_id).versions] == ["pending", "capped"]
