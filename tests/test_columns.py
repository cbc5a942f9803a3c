"""A typed column holding what its type cannot (a hand-edit, a bug; SQLite keeps anything): that
row's task is dead with the reason, every other job is delivered, and nothing that shows the
ledger fails on it."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from support.pipeline import DONE, Pipeline, run_one, settings_env
from support.receiver import Reply
from support.samples import numbered_job
from test_dashboard import PASSWORD, logged_in

from webhook.cli import main
from webhook.intake.triage import triage
from webhook.ledger import Ledger, RawRequest, Room, VerifyClaim, utcnow
from webhook.ledger.readable import broken_tasks
from webhook.ledger.schema import attempts, callbacks, jobs, tasks, versions
from webhook.models import Callback, Job, job_to_dict
from webhook.web.app import create_app

# Corrupted in the row of the job (jobs) or of its verify task (tasks), both waiting for verification;
# whether the value is still there to be seen once the task is dead.
COLUMNS = [
    (jobs.c.created_at, True),
    (jobs.c.updated_at, False),  # both written anew when the job is dead
    (jobs.c.status, False),
    (tasks.c.run_after, False),
    (tasks.c.attempts, False),
    (tasks.c.locked_until, False),
    (tasks.c.status, False),
    (tasks.c.kind, False),  # put right (a verification: the task has no sink) when the task is leased
]
# PostgreSQL's types refuse bad times and integers; a status or a kind is a string there too.
CASES = [pytest.param("sqlite", *case, id=f"sqlite-{case[0]}") for case in COLUMNS] + [
    pytest.param("postgresql", *case, id=f"postgresql-{case[0]}", marks=pytest.mark.postgres)
    for case in COLUMNS
    if case[0].name in ("status", "kind")
]


def corrupt(pipeline: Pipeline, column: sa.Column[str], job_id: str) -> None:
    """Write a value the column's type cannot hold, past SQLAlchemy's own conversion."""
    table = column.table.name  # type: ignore[attr-defined]
    update = sa.text(f"UPDATE {table} SET {column.name} = 'garbage' WHERE job_id = :job_id")
    with pipeline.ledger.engine.begin() as conn:
        conn.execute(update, {"job_id": job_id})


@pytest.mark.parametrize(("database_url", "column", "shown_after"), CASES, indirect=["database_url"])
def test_an_unreadable_column_is_a_dead_task_and_the_other_jobs_are_delivered(
    pipeline: Pipeline, column: sa.Column[str], shown_after: bool
) -> None:
    reason = f"unreadable {column.table.name}.{column.name}: garbage"  # type: ignore[attr-defined]
    broken = pipeline.submit(pipeline.upload_input())
    pipeline.wait_until(lambda: pipeline.status(broken) == "received", what="the first callback")
    corrupt(pipeline, column, broken)
    fine = pipeline.submit(pipeline.upload_input("in/second.wav"), output_key="out/second.wav")
    pipeline.wait_until(lambda: pipeline.status(fine) == "received", what="the second callback")

    # What shows the ledger shows the row, and which column cannot be read.
    env = settings_env(pipeline.settings)
    listed = CliRunner().invoke(main, ["jobs", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    shown = CliRunner().invoke(main, ["jobs", "show", broken], env=env)
    assert shown.exit_code == 0, shown.output
    assert reason in shown.output
    if column.table is jobs:
        assert reason in listed.output
    client = logged_in(create_app(pipeline.settings.replace(dashboard_password=PASSWORD), pipeline.ledger))
    for page in ("/dashboard/", "/dashboard/jobs", f"/dashboard/jobs/{broken}", "/dashboard/dead"):
        answer = client.get(page)
        assert answer.status_code == 200, page
    assert reason in client.get(f"/dashboard/jobs/{broken}").get_data(as_text=True)

    worker = pipeline.worker()
    assert pipeline.drain(worker, fine, DONE) == "delivered"
    assert pipeline.drain(worker, broken, DONE) == "dead"
    view = pipeline.ledger.views.show_job(broken)
    (verify,) = view.to_dict()["verify"]
    assert verify["status"] == "dead"
    assert reason in verify["last_error"]
    # created_at stays as it was, to be seen; the other columns were written anew to close the task.
    assert (reason in view.unreadable) is shown_after
    shown = CliRunner().invoke(main, ["jobs", "show", broken], env=env)
    assert shown.exit_code == 0, shown.output
    assert reason in shown.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_dead_letters_with_an_unreadable_column_still_list(pipeline: Pipeline) -> None:
    pipeline.http.reply(Reply(400))  # refused for good: the job's http delivery is dead
    job_id = pipeline.submit(pipeline.upload_input())
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "dead"
    corrupt(pipeline, tasks.c.done_at, job_id)

    dead = CliRunner().invoke(main, ["dead", "list"], env=settings_env(pipeline.settings))
    assert dead.exit_code == 0, dead.output
    assert job_id in dead.output
    client = logged_in(create_app(pipeline.settings.replace(dashboard_password=PASSWORD), pipeline.ledger))
    assert client.get("/dashboard/dead").status_code == 200
    shown = CliRunner().invoke(main, ["jobs", "show", job_id], env=settings_env(pipeline.settings))
    assert "unreadable tasks.done_at: garbage" in shown.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_unreadable_delivery_is_dead_and_the_job_its_other_sinks_have(pipeline: Pipeline) -> None:
    pipeline.http.reply(Reply(503))  # the http delivery is retried later: still pending
    job_id = pipeline.submit(pipeline.upload_input())
    worker = pipeline.worker()
    pipeline.wait_until(lambda: run_one(worker) and pipeline.status(job_id) == "verified", what="a retried delivery")
    update = sa.text("UPDATE tasks SET run_after = 'garbage' WHERE job_id = :job_id AND sink = 'http'")
    with pipeline.ledger.engine.begin() as conn:
        conn.execute(update, {"job_id": job_id})

    assert pipeline.drain(worker, job_id, DONE) == "dead"
    deliveries = {d["sink"]: d for d in pipeline.ledger.views.show_job(job_id).to_dict()["deliveries"]}
    assert deliveries["filesystem"]["status"] == "done"
    assert deliveries["http"]["status"] == "dead"
    assert "unreadable tasks.run_after: garbage" in deliveries["http"]["last_error"]


# What a job keeps of its history: what each callback said (its versions), the requests, the attempts.
HISTORY = [versions.c.received_at, callbacks.c.received_at, attempts.c.started_at]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("column", HISTORY, ids=lambda c: f"{c.table.name}.{c.name}")
def test_an_unreadable_time_in_a_jobs_history_is_shown_and_spoils_nothing(
    pipeline: Pipeline, column: sa.Column[str]
) -> None:
    reason = f"unreadable {column.table.name}.{column.name}: garbage"  # type: ignore[attr-defined]
    job_id = pipeline.submit(pipeline.upload_input())
    worker = pipeline.worker()
    assert pipeline.drain(worker, job_id, DONE) == "delivered"
    if column.table is callbacks:  # type: ignore[attr-defined]
        named = sa.text(
            "UPDATE callbacks SET received_at = 'garbage' "
            "WHERE id IN (SELECT callback_id FROM job_versions WHERE job_id = :job_id)"
        )
        with pipeline.ledger.engine.begin() as conn:
            conn.execute(named, {"job_id": job_id})
    else:
        corrupt(pipeline, column, job_id)

    env = settings_env(pipeline.settings)
    for args in (["jobs", "list"], ["jobs", "show", job_id], ["jobs", "show", job_id, "--raw", "--json"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(main, ["jobs", "show", job_id, "--raw"], env=env)
    assert shown.exit_code == 0, shown.output
    assert reason in shown.output
    client = logged_in(create_app(pipeline.settings.replace(dashboard_password=PASSWORD), pipeline.ledger))
    for page in ("/dashboard/", "/dashboard/jobs", f"/dashboard/jobs/{job_id}", "/dashboard/dead"):
        assert client.get(page).status_code == 200, page
    assert reason in client.get(f"/dashboard/jobs/{job_id}").get_data(as_text=True)
    # Nothing the worker does reads it: the job is delivered again when replayed.
    pipeline.ledger.jobs.replay(job_id, ["http"])
    assert pipeline.drain(worker, job_id, DONE) == "delivered"


def test_a_broken_task_leased_to_a_worker_is_left_to_it_until_its_lease_runs_out(ledger: Ledger) -> None:
    raw, parsed = record_args(numbered_job(1))
    ledger.jobs.record(raw, parsed, triage(parsed, frozenset({"NoiseReduction"})))
    held = ledger.queue.claim("w1", 60)
    assert held is not None
    # Broken while w1 works on it: a status no claim knows (SQLite would take any bad column).
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET status = 'garbage'"))
    assert ledger.queue.claim("w2", 60) is None  # w1's lease still runs
    with ledger.engine.begin() as conn:
        conn.execute(tasks.update().values(locked_until=utcnow() - timedelta(seconds=1)))
    taken = ledger.queue.claim("w2", 60)
    assert isinstance(taken, VerifyClaim)
    assert taken.unreadable == "unreadable tasks.status: garbage"


def record_args(job: Job) -> tuple[RawRequest, Callback]:
    data = json.dumps({"EventName": "TaskFinish", "JobsDetail": [job_to_dict(job)]}).encode()
    return RawRequest(data, "application/json", {}, "10.0.0.1"), Callback("TaskFinish", (job,), "json")


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_search_for_tasks_never_due_finds_them_through_an_index(ledger: Ledger) -> None:
    # Claims search whenever the queue is idle: the search must not read every task (NOT IN would).
    search = sa.select(tasks.c.id).where(broken_tasks("postgresql")).params(now=utcnow())
    sql = str(search.compile(dialect=ledger.engine.dialect, compile_kwargs={"literal_binds": True}))
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # an empty table: the index if it can
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))
    assert "Index Cond: ((status)::text < 'dead'::text)" in plan, plan


def test_a_task_of_a_kind_no_lane_asks_for_is_claimed_as_unreadable(ledger: Ledger) -> None:
    raw, parsed = record_args(numbered_job(1))
    ledger.jobs.record(raw, parsed, triage(parsed, frozenset({"NoiseReduction"})))
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET kind = 'garbage'"))
    # As the worker's claim loop asks: by lane (verifications, each sink's deliveries).
    (taken,) = ledger.queue.claim_lanes("w1", 60, Room(verify=1, sinks={"http": 1}))
    assert isinstance(taken, VerifyClaim)  # no sink: it was the job's verification
    assert taken.unreadable == "unreadable tasks.kind: garbage"
    assert [t.kind for t in ledger.views.show_job(numbered_job(1).job_id).tasks] == ["verify"]  # put right
