"""A typed column holding what its type cannot (a hand-edit, a bug; SQLite keeps anything): that
row's task is dead with the reason, every other job is delivered, and nothing that shows the
ledger fails on it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from support.pipeline import DONE, Pipeline, run_one, settings_env
from support.receiver import Reply
from test_dashboard import PASSWORD, logged_in

from webhook.cli import main
from webhook.ledger.schema import jobs, tasks
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
]
# PostgreSQL's types refuse bad times and integers; a status is a string there too.
CASES = [pytest.param("sqlite", *case, id=f"sqlite-{case[0]}") for case in COLUMNS] + [
    pytest.param("postgresql", *case, id=f"postgresql-{case[0]}", marks=pytest.mark.postgres)
    for case in COLUMNS
    if case[0].name == "status"
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
