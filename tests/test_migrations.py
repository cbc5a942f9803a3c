"""Schema migrations: the revisions build exactly the declared schema, adopt a ledger made before
them without losing a row, and processes refuse a ledger that is behind."""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from support.logs import records
from support.processes import COS_WEBHOOK, TEXT_LOGS

from webhook.cli import main
from webhook.config import Settings
from webhook.ledger import Ledger, LedgerError, Standing, migrate
from webhook.ledger.schema import metadata
from webhook.web.launch import web_app as create_app

T0 = "2026-01-01 00:00:00"


def fill_baseline(engine: sa.engine.Engine) -> None:
    """Rows as the version before migrations wrote them: a callback, its job, a version, a task."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO callbacks (id, received_at, remote_addr, content_type, headers, body, body_format,"
                " event_name) VALUES (1, :t, '127.0.0.1', 'application/json', '{}', :body, 'json', 'TaskFinish')"
            ),
            {"t": T0, "body": b'{"EventName": "TaskFinish"}'},
        )
        conn.execute(
            sa.text(
                "INSERT INTO jobs (job_id, callback_id, event_name, tag, state, status, reason, detail, created_at,"
                " updated_at) VALUES ('j1', 1, 'TaskFinish', 'NoiseReduction', 'Success', 'received', '', '{}',"
                " :t, :t)"
            ),
            {"t": T0},
        )
        conn.execute(
            sa.text(
                "INSERT INTO job_versions (job_id, callback_id, digest, detail, status, reason, received_at)"
                " VALUES ('j1', 1, 'd', '{}', 'pending', '', :t)"
            ),
            {"t": T0},
        )
        conn.execute(
            sa.text(
                "INSERT INTO tasks (job_id, kind, sink, status, attempts, run_after, last_error, updated_at)"
                " VALUES ('j1', 'verify', '', 'pending', 0, :t, '', :t)"
            ),
            {"t": T0},
        )


def schema_differences(engine: sa.engine.Engine) -> list[object]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def test_the_migrations_build_exactly_the_declared_schema(database_url: str) -> None:
    ledger = Ledger(database_url)
    ledger.migrate()
    assert schema_differences(ledger.engine) == []
    assert ledger.schema_problem() is None
    ledger.migrate()  # at head already: nothing to do
    assert ledger.schema_problem() is None
    ledger.dispose()


def test_a_ledger_made_before_migrations_is_adopted_with_its_rows(database_url: str) -> None:
    ledger = Ledger(database_url)
    migrate.upgrade(ledger.engine, migrate.BASELINE)
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE alembic_version"))  # now as create_all left it
    fill_baseline(ledger.engine)
    assert ledger.schema_problem() == "the ledger was made before migrations: run cos-webhook migrate"
    with pytest.raises(LedgerError, match="run cos-webhook migrate"):
        ledger.prepare(auto_migrate=False)

    ledger.prepare(auto_migrate=True)

    assert ledger.schema_problem() is None
    assert schema_differences(ledger.engine) == []
    view = ledger.views.show_job("j1")
    assert (view.status, [t.kind for t in view.tasks], len(view.versions)) == ("received", ["verify"], 1)
    assert ledger.views.raw_callbacks("j1")[0].body == b'{"EventName": "TaskFinish"}'
    ledger.dispose()


def test_every_revision_upgrades_a_ledger_with_rows_in_it(database_url: str) -> None:
    ledger = Ledger(database_url)
    migrate.upgrade(ledger.engine, migrate.BASELINE)
    fill_baseline(ledger.engine)
    ledger.migrate()
    assert [job.job_id for job in ledger.views.list_jobs()] == ["j1"]
    ledger.dispose()


def test_jobs_ci_failed_that_were_delivered_become_failed(database_url: str) -> None:
    ledger = Ledger(database_url)
    migrate.upgrade(ledger.engine, "0005")
    fill_baseline(ledger.engine)
    detail = '{"job_id": "j2", "state": "Failed", "code": "InputObjectNotExist", "message": "no such input"}'
    with ledger.engine.begin() as conn:
        for job_id, state, text, reason in (
            ("j2", "Failed", detail, ""),
            ("j3", "Cancel", "not json", "no sink takes this event"),
            ("j4", "Success", "{}", ""),
        ):
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (job_id, callback_id, event_name, tag, state, status, reason, detail,"
                    " created_at, updated_at) VALUES (:j, 1, 'TaskFinish', 'NoiseReduction', :s, 'delivered',"
                    " :r, :d, :t, :t)"
                ),
                {"j": job_id, "s": state, "r": reason, "d": text, "t": T0},
            )
    ledger.migrate()
    shown = {job_id: ledger.views.show_job(job_id) for job_id in ("j1", "j2", "j3", "j4")}
    assert {job_id: (v.status, v.reason) for job_id, v in shown.items()} == {
        "j1": ("received", ""),
        "j2": ("failed", "CI reports Failed (InputObjectNotExist: no such input)"),
        "j3": ("failed", "CI reports Cancel; no sink takes this event"),
        "j4": ("delivered", ""),
    }
    ledger.dispose()


def test_the_dashboard_tables_come_to_a_ledger_with_rows_in_it(database_url: str) -> None:
    ledger = Ledger(database_url)
    migrate.upgrade(ledger.engine, migrate.BASELINE)
    fill_baseline(ledger.engine)
    migrate.upgrade(ledger.engine, "0006")  # the revision before them

    ledger.migrate()

    assert schema_differences(ledger.engine) == []
    assert [job.job_id for job in ledger.views.list_jobs()] == ["j1"]
    ledger.sessions.open("a session id", "a password id", timedelta(hours=1))
    assert ledger.sessions.standing("a session id", "a password id") == Standing.IN
    assert ledger.sessions.login_attempt("192.0.2.1").count == 1
    ledger.dispose()


def env_for(url: str, **more: str) -> dict[str, str]:
    return os.environ | {"WEBHOOK_DATABASE_URL": url} | more


@pytest.mark.slow  # a worker process
def test_processes_refuse_a_ledger_that_is_behind_unless_told_to_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    old = Ledger(url)
    migrate.upgrade(old.engine, migrate.BASELINE)
    fill_baseline(old.engine)
    settings = Settings(database_url=url, callback_tokens=("t" * 16,))
    behind = (
        f"the ledger is at revision {migrate.BASELINE}, this version needs {migrate.head()}: run cos-webhook migrate"
    )

    with pytest.raises(LedgerError) as refused:
        create_app(settings)
    assert str(refused.value) == behind

    worker_env = {
        "WEBHOOK_ALLOWED_BUCKETS": "audio-1250000000",
        "COS_SECRET_ID": "id",
        "COS_SECRET_KEY": "key",
        "COS_REGION": "ap-guangzhou",
        "WEBHOOK_SINK_DIR": str(tmp_path / "out"),
    }
    worker = subprocess.run(
        [COS_WEBHOOK, "worker", "--burst"], env=env_for(url, **worker_env), capture_output=True, text=True, timeout=60
    )
    assert worker.returncode == 1
    assert worker.stderr.strip().splitlines()[-1] == f"Error: {behind}"
    assert old.schema_problem() == behind

    create_app(settings.replace(auto_migrate=True))
    assert old.schema_problem() is None
    assert [job.job_id for job in old.views.list_jobs()] == ["j1"]
    old.dispose()


def test_read_only_commands_never_change_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    empty = Ledger(url)
    with empty.engine.begin() as conn:
        conn.execute(sa.text("SELECT 1"))  # the file exists, with no table

    for command in (["jobs", "list"], ["jobs", "show", "j1"], ["dead", "list"]):
        result = CliRunner().invoke(main, command, env={"WEBHOOK_DATABASE_URL": url})
        assert result.exit_code == 1, result.output
        assert result.output == "Error: the ledger has no tables: run cos-webhook migrate\n"
    assert sa.inspect(empty.engine).get_table_names() == []

    result = CliRunner().invoke(main, ["migrate"], env={"WEBHOOK_DATABASE_URL": url})
    assert result.output == f"ledger at revision {migrate.head()}\n"
    assert set(metadata.tables) <= set(sa.inspect(empty.engine).get_table_names())
    empty.dispose()


@pytest.mark.slow  # cos-webhook processes
def test_processes_migrating_at_once_all_succeed(database_url: str) -> None:
    runs = [
        subprocess.Popen([COS_WEBHOOK, "migrate"], env=env_for(database_url), stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0]
    assert outputs == [f"ledger at revision {migrate.head()}\n"] * 3
    ledger = Ledger(database_url)
    assert schema_differences(ledger.engine) == []
    ledger.dispose()


@pytest.mark.slow  # cos-webhook processes
def test_migrate_says_what_it_did_and_alembic_says_nothing_below_warning(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = env_for(url, WEBHOOK_LOG_LEVEL="INFO", **TEXT_LOGS)
    run = subprocess.run([COS_WEBHOOK, "migrate"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"ledger at revision {migrate.head()}\n"
    [line] = records(run.stderr)  # ours alone: no alembic line ("setup plugin …", "Context impl …")
    assert line.endswith(f" INFO webhook.ledger.migrate migrated the ledger from revision (none) to {migrate.head()}")
