"""Bulkheads and breakers in the ledger, on SQLite and PostgreSQL: a claim leases each sink's
deliveries only up to the slots free for it, and none of a sink whose breaker is open; after the
pause one probe is leased, and its outcome closes or reopens the breaker."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from click.testing import CliRunner
from support.samples import numbered_job as job

from webhook.cli import main
from webhook.config import Settings
from webhook.intake.triage import triage
from webhook.ledger import Breaker, DeliveryClaim, Ledger, RawRequest, Room, VerifyClaim, migrate
from webhook.ledger.breakers import Health, State
from webhook.ledger.schema import tasks
from webhook.models import Callback, job_from_json
from webhook.telemetry.metrics import LedgerCollector
from webhook.web.app import create_app

RAW = RawRequest(body=b"<Response/>", content_type="application/xml", headers={}, remote_addr="127.0.0.1")
SINKS = ["filesystem", "http"]
LIMIT = 3
LONG, NONE = 3600.0, 0.0  # pauses: one that outlasts the test, one that is over at once


def verified(ledger: Ledger, *numbers: int, lease: Sequence[str] | None = None) -> list[DeliveryClaim | None]:
    """Jobs recorded and verified by w1, each going on to the deliveries of ``lease`` (None: every sink)."""
    callback = Callback(event_name="TaskFinish", jobs=tuple(job(n) for n in numbers), body_format="xml")
    ledger.jobs.record(RAW, callback, triage(callback, frozenset({"NoiseReduction"})))
    got = []
    for claim in ledger.queue.claim_lanes("w1", 60, Room(len(numbers), {})):
        assert isinstance(claim, VerifyClaim)
        version = claim.versions[0]
        detail = job_from_json(version.detail)
        got.append(ledger.queue.accept_and_claim(claim, "w1", SINKS, version, detail, {}, (), 60, lease))
    return got


def attempts(ledger: Ledger, n: int) -> dict[str, tuple[str, int]]:
    """Each delivery of job ``n``: its status and attempts."""
    view = ledger.views.show_job(job(n).job_id).to_dict()
    return {d["sink"]: (d["status"], d["attempts"]) for d in view["deliveries"]}


def fail(ledger: Ledger, claim: DeliveryClaim | None, sink: str, pause: float, worker: str = "w1") -> None:
    assert claim is not None
    (delivery,) = [d for d in claim.deliveries if d.sink == sink]
    assert ledger.queue.retry_later(delivery, worker, "503", 0.0, (), Health(sink, False, LIMIT, pause))


def succeed(ledger: Ledger, claim: DeliveryClaim | None, sink: str, worker: str = "w1") -> None:
    assert claim is not None
    (delivery,) = [d for d in claim.deliveries if d.sink == sink]
    assert ledger.queue.complete(delivery, worker, (), Health(sink, True, LIMIT))


def claimed(ledger: Ledger, room: Room, worker: str = "w2") -> list[tuple[str, str]]:
    """(job id, sink) of every delivery a claim with ``room`` leases."""
    return sorted((d.job_id, d.sink) for c in ledger.queue.claim_lanes(worker, 60, room) for d in c.tasks)


def open_http(ledger: Ledger, pause: float) -> list[DeliveryClaim | None]:
    """Three jobs whose http deliveries fail once each: the breaker opens; filesystem is delivered."""
    claims = verified(ledger, 1, 2, 3)
    for claim in claims:
        fail(ledger, claim, "http", pause)
        succeed(ledger, claim, "filesystem")
    return claims


def test_a_claim_leases_each_sink_only_as_far_as_its_slots_allow(ledger: Ledger) -> None:
    verified(ledger, 1, 2, 3, lease=[])  # every delivery due, none leased
    assert attempts(ledger, 1) == {"filesystem": ("pending", 0), "http": ("pending", 0)}
    first = ledger.queue.claim_lanes("w2", 60, Room(4, {"filesystem": 1, "http": 0}))
    assert [[(d.job_id, d.sink) for d in c.tasks] for c in first] == [[(job(1).job_id, "filesystem")]]
    (claim,) = first
    assert isinstance(claim, DeliveryClaim)
    assert claim.pending_elsewhere == {"http"}  # the job's staged file is kept for it
    # The oldest http delivery only: one slot.
    assert claimed(ledger, Room(4, {"filesystem": 5, "http": 1})) == [
        (job(1).job_id, "http"),
        (job(2).job_id, "filesystem"),
        (job(3).job_id, "filesystem"),
    ]


def test_a_verification_leases_the_deliveries_of_the_sinks_with_room_only(ledger: Ledger) -> None:
    (went_on,) = verified(ledger, 1, lease=["filesystem"])
    assert went_on is not None
    assert [d.sink for d in went_on.deliveries] == ["filesystem"]
    assert went_on.pending_elsewhere == {"http"}
    assert attempts(ledger, 1) == {"filesystem": ("pending", 1), "http": ("pending", 0)}
    assert claimed(ledger, Room(0, {"http": 1})) == [(job(1).job_id, "http")]


def test_repeated_failures_open_the_breaker_and_its_deliveries_wait_without_attempts(ledger: Ledger) -> None:
    open_http(ledger, LONG)
    breaker = ledger.breakers.all()["http"]
    assert (breaker.state, breaker.failures) == (State.OPEN, LIMIT)
    before = {n: attempts(ledger, n) for n in (1, 2, 3)}
    assert before[1] == {"filesystem": ("done", 1), "http": ("pending", 1)}

    assert claimed(ledger, Room(8, {"filesystem": 8, "http": 8})) == []
    (went_on,) = verified(ledger, 4)  # a new job goes on to filesystem only
    assert went_on is not None
    assert [d.sink for d in went_on.deliveries] == ["filesystem"]
    assert claimed(ledger, Room(8, {"filesystem": 8, "http": 8})) == []
    assert {n: attempts(ledger, n) for n in (1, 2, 3)} == before  # waiting burns no attempt
    assert attempts(ledger, 4) == {"filesystem": ("pending", 1), "http": ("pending", 0)}


def test_after_the_pause_one_probe_and_its_success_closes_the_breaker(ledger: Ledger) -> None:
    open_http(ledger, NONE)
    probe = ledger.queue.claim_lanes("w2", 60, Room(0, {"http": 8}))
    assert [[d.sink for d in c.tasks] for c in probe] == [["http"]]
    assert ledger.breakers.all()["http"].state == State.PROBING
    assert claimed(ledger, Room(0, {"http": 8}), "w3") == []  # one probe at a time
    (claim,) = probe
    assert isinstance(claim, DeliveryClaim)
    succeed(ledger, claim, "http", "w2")
    assert ledger.breakers.all()["http"] == Breaker("http")
    assert len(claimed(ledger, Room(0, {"http": 8}), "w3")) == 2  # resumed: the rest are leased


def test_a_failed_probe_opens_the_breaker_again(ledger: Ledger) -> None:
    open_http(ledger, NONE)
    (probe,) = ledger.queue.claim_lanes("w2", 60, Room(0, {"http": 8}))
    assert isinstance(probe, DeliveryClaim)
    fail(ledger, probe, "http", LONG, "w2")
    breaker = ledger.breakers.all()["http"]
    assert (breaker.state, breaker.failures) == (State.OPEN, LIMIT + 1)
    assert claimed(ledger, Room(0, {"http": 8}), "w3") == []


def test_a_failure_that_is_not_the_sinks_leaves_its_breaker_alone(ledger: Ledger) -> None:
    claims = verified(ledger, 1, 2, 3, 4)
    for claim in claims:
        assert claim is not None
        (delivery,) = [d for d in claim.deliveries if d.sink == "http"]
        assert ledger.queue.retry_later(delivery, "w1", "fetch failed", 0.0)  # no health: not the sink's
    assert "http" not in ledger.breakers.all()
    assert len(claimed(ledger, Room(0, {"http": 8}))) == 4


def test_metrics_show_each_sinks_breaker_and_the_deliveries_it_holds(ledger: Ledger) -> None:
    open_http(ledger, LONG)
    verified(ledger, 4, lease=[])  # due for either sink: filesystem's waits for a slot, not a breaker
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in LedgerCollector(ledger.stats.snapshot).collect()
        for sample in family.samples
    }
    state = {
        (dict(labels)["sink"], dict(labels)["state"]): v
        for (name, labels), v in samples.items()
        if name == "cos_webhook_sink_breaker" and v
    }
    assert state == {("filesystem", "closed"): 1, ("http", "open"): 1}
    assert samples[("cos_webhook_sink_paused_deliveries", (("sink", "http"),))] == 4
    assert samples[("cos_webhook_sink_paused_deliveries", (("sink", "filesystem"),))] == 0


def test_jobs_sinks_lists_each_sinks_breaker(ledger: Ledger) -> None:
    open_http(ledger, LONG)
    env = {"WEBHOOK_DATABASE_URL": ledger.url, "WEBHOOK_SINK_DIR": "/tmp/sink", "WEBHOOK_CONFIG": ""}
    result = CliRunner().invoke(main, ["jobs", "sinks", "--json"], env=env)
    assert result.exit_code == 0, result.output
    rows = {row.pop("sink"): row for row in map(json.loads, result.output.splitlines())}
    until = ledger.breakers.all()["http"].until
    assert until is not None
    assert rows == {
        "filesystem": {"breaker": "closed", "failures": 0, "until": None, "due": 0},
        "http": {"breaker": "open", "failures": LIMIT, "until": until.strftime("%Y-%m-%dT%H:%M:%SZ"), "due": 3},
    }
    text = CliRunner().invoke(main, ["jobs", "sinks"], env=env).output.splitlines()
    assert text[0].split() == ["SINK", "BREAKER", "FAILURES", "DUE", "UNTIL"]
    assert text[2].split()[:4] == ["http", "open", str(LIMIT), "3"]


def test_the_dashboard_overview_shows_each_sinks_breaker(ledger: Ledger) -> None:
    open_http(ledger, LONG)
    settings = Settings(
        database_url=ledger.url, callback_tokens=("t" * 16,), dashboard_password="pw", sink_dir="/tmp/sink"
    )
    client = create_app(settings, ledger).test_client()
    page = client.get("/dashboard/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    client.post("/dashboard/login", data={"password": "pw", "csrf_token": token.group(1)})
    overview = client.get("/dashboard/").text
    http = re.search(r'<tr id="sink-http">(.*?)</tr>', overview, re.DOTALL)
    assert http is not None, overview
    assert '<span class="badge breaker-open">open</span>' in http.group(1)
    assert f'<td class="num">{LIMIT}</td>' in http.group(1)
    filesystem = re.search(r'<tr id="sink-filesystem">(.*?)</tr>', overview, re.DOTALL)
    assert filesystem is not None
    assert '<span class="badge breaker-closed">closed</span>' in filesystem.group(1)


def test_every_configured_sink_has_a_breaker_once_ensured_and_an_open_one_stays_open(ledger: Ledger) -> None:
    open_http(ledger, LONG)
    ledger.breakers.ensure(["filesystem", "http", "archive"])  # a worker's start
    ledger.breakers.ensure(["archive"])  # again: nothing changes
    found = {sink: (b.state, b.failures) for sink, b in ledger.breakers.all().items()}
    assert found == {"archive": (State.CLOSED, 0), "filesystem": (State.CLOSED, 0), "http": (State.OPEN, LIMIT)}
    samples = [
        (s.labels["sink"], s.labels["state"])
        for family in LedgerCollector(ledger.stats.snapshot).collect()
        for s in family.samples
        if s.name == "cos_webhook_sink_breaker" and s.value
    ]
    assert sorted(samples) == [("archive", "closed"), ("filesystem", "closed"), ("http", "open")]


def test_jobs_show_says_a_delivery_waits_for_its_paused_sink(ledger: Ledger) -> None:
    open_http(ledger, LONG)
    env = {"WEBHOOK_DATABASE_URL": ledger.url, "WEBHOOK_SINK_DIR": "/tmp/sink", "WEBHOOK_CONFIG": ""}
    job_id = job(1).job_id
    until = ledger.breakers.all()["http"].until
    assert until is not None
    shown = until.strftime("%Y-%m-%dT%H:%M:%SZ")
    text = CliRunner().invoke(main, ["jobs", "show", job_id], env=env).output
    assert f"(sink open until {shown}: waiting, no attempt spent)" in text
    [filesystem] = [line for line in text.splitlines() if line.startswith("delivery:    filesystem")]
    assert "waiting" not in filesystem  # delivered: its sink's breaker says nothing of it
    data = json.loads(CliRunner().invoke(main, ["jobs", "show", job_id, "--json"], env=env).output)
    breakers = {d["sink"]: d.get("breaker") for d in data["deliveries"]}
    assert breakers == {"filesystem": None, "http": {"state": "open", "until": shown}}


def test_the_breakers_revision_upgrades_a_ledger_with_deliveries_waiting(database_url: str) -> None:
    ledger = Ledger(database_url)
    migrate.upgrade(ledger.engine, "0007")
    callback = Callback(event_name="TaskFinish", jobs=(job(1),), body_format="xml")
    ledger.jobs.record(RAW, callback, triage(callback, frozenset({"NoiseReduction"})))
    with ledger.engine.begin() as conn:  # verified before the upgrade: both deliveries due
        conn.execute(tasks.update().values(status="done"))
        for sink in SINKS:
            conn.execute(
                sa.text(
                    "INSERT INTO tasks (job_id, kind, sink, status, attempts, run_after, last_error, updated_at)"
                    " VALUES (:job_id, 'deliver', :sink, 'pending', 0, :t, '', :t)"
                ),
                {"job_id": job(1).job_id, "sink": sink, "t": datetime(2026, 1, 1)},
            )

    ledger.migrate()

    assert ledger.schema_problem() is None
    assert ledger.breakers.all() == {}  # every sink starts closed
    assert claimed(ledger, Room(0, {"filesystem": 1, "http": 1})) == [(job(1).job_id, s) for s in SINKS]
    ledger.dispose()
