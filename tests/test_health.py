"""Probes: /livez (the process answers), /readyz (the ledger answers within a second and has its
schema; /healthz is its former name), and none of them in the access log."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests
import sqlalchemy as sa
from support.endpoint import TOKEN
from support.samples import DOC_JSON
from support.tcp_proxy import proxied_database

from webhook.config import Settings
from webhook.ledger import Ledger
from webhook.web import health
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

PROBES = ("/livez", "/readyz", "/healthz")


@contextmanager
def receiver(ledger: Ledger) -> Iterator[str]:
    settings = Settings(database_url=ledger.url, callback_tokens=(TOKEN,))
    with BackgroundServer(create_app(settings, ledger)) as server:
        yield server.url


def get(url: str) -> tuple[int, object]:
    response = requests.get(url, timeout=30)
    return response.status_code, response.json()


def test_every_probe_answers_ok_with_a_current_ledger(ledger: Ledger) -> None:
    with receiver(ledger) as url:
        assert [get(f"{url}{probe}") for probe in PROBES] == [(200, {"status": "ok"})] * 3


def test_a_missing_table_makes_the_process_unready_but_alive(ledger: Ledger) -> None:
    with receiver(ledger) as url:
        with ledger.engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE attempts"))
        unready = (
            503,
            {"status": "unavailable", "reason": "the ledger lacks tables attempts (run cos-webhook migrate)"},
        )
        assert get(f"{url}/readyz") == unready
        assert get(f"{url}/healthz") == unready
        assert get(f"{url}/livez") == (200, {"status": "ok"})


def test_schema_problem_names_every_missing_table(ledger: Ledger) -> None:
    assert ledger.schema_problem() is None
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE attempts"))
        conn.execute(sa.text("DROP TABLE locks"))
    assert ledger.schema_problem() == "the ledger lacks tables attempts, locks (run cos-webhook migrate)"


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_unreachable_or_silent_ledger_makes_the_process_unready(ledger: Ledger) -> None:
    with proxied_database(ledger.url) as (proxy, url):
        proxied = Ledger(url)
        with receiver(proxied) as url:
            assert get(f"{url}/readyz") == (200, {"status": "ok"})

            proxy.down()  # the port is closed: connecting is refused
            assert get(f"{url}/readyz") == (
                503,
                {"status": "unavailable", "reason": "the ledger is unreachable (OperationalError)"},
            )
            assert get(f"{url}/livez") == (200, {"status": "ok"})

            proxy.up()
            proxy.stall()  # connections open, but nothing answers
            assert get(f"{url}/readyz") == (
                503,
                {"status": "unavailable", "reason": f"the ledger did not answer within {health.READY_TIMEOUT:g} s"},
            )

            proxy.up()  # the stalled check goes on and succeeds
            assert any(get(f"{url}/readyz")[0] == 200 for _ in range(30))
        proxied.dispose()


def test_probes_and_scrapes_are_not_in_the_access_log(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), receiver(ledger) as url:
        for path in (*PROBES, "/metrics"):
            requests.get(f"{url}{path}", timeout=30)
        requests.post(f"{url}/callback/{TOKEN}", data=DOC_JSON, timeout=30)
    access = [r.getMessage() for r in caplog.records if r.name == "webhook.web.app"]
    assert access == ["127.0.0.1 POST /callback/<token> 200"]
