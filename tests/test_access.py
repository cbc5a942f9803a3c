"""Who may post callbacks: the token, two tokens during rotation, and a source-address allowlist
that stays correct behind a PaaS proxy."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from support.samples import DOC_JSON

from webhook.config import Settings
from webhook.errors import ConfigError
from webhook.ledger import Ledger
from webhook.ledger.schema import callbacks
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

OLD, NEW = "old-token-0123456789", "new-token-0123456789"


@contextmanager
def receiver(tmp_path: Path, **changes: object) -> Iterator[tuple[str, Ledger]]:
    settings = Settings(**{"database_url": f"sqlite:///{tmp_path / 'ledger.db'}", "callback_tokens": (OLD,)} | changes)
    ledger = Ledger(settings.database_url)
    ledger.migrate()
    with BackgroundServer(create_app(settings, ledger)) as server:
        yield server.url, ledger
    ledger.dispose()


def post(url: str, token: str = OLD, **headers: str) -> requests.Response:
    return requests.post(f"{url}/callback/{token}", data=DOC_JSON, headers=headers, timeout=10)


def test_rotation_accepts_both_tokens_then_only_the_new_one(tmp_path: Path) -> None:
    with receiver(tmp_path, callback_tokens=(OLD, NEW)) as (url, _):
        assert post(url, OLD).status_code == 200
        assert post(url, NEW).json()["duplicate"] is True
    with receiver(tmp_path, callback_tokens=(NEW,)) as (url, _):
        refused = post(url, OLD)
        assert (refused.status_code, refused.json()["error"]) == (404, "unknown callback URL")
        assert post(url, NEW).status_code == 200


def test_the_access_line_names_which_token_was_used_never_its_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.web.app")
    with receiver(tmp_path, callback_tokens=(OLD, NEW)) as (url, _):
        post(url, OLD)
        post(url, NEW)
        post(url, "unknown-token-0123456789")

    access = [record for record in caplog.records if record.name == "webhook.web.app"]
    assert [getattr(record, "token", None) for record in access] == [1, 2, None]
    assert not any(OLD in record.getMessage() or NEW in record.getMessage() for record in access)


def test_source_outside_the_allowlist_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    with receiver(tmp_path, allowed_sources=(ipaddress.ip_network("10.0.0.0/8"),)) as (url, ledger):
        refused = post(url)
        assert (refused.status_code, refused.json()["error"]) == (403, "source address 127.0.0.1 is not allowed")
        assert ledger.views.counts() == {"tasks_pending": 0}
        # Without trusted proxies, a client's own X-Forwarded-For changes nothing.
        assert post(url, **{"X-Forwarded-For": "10.1.2.3"}).status_code == 403


def test_allowed_source_passes(tmp_path: Path) -> None:
    with receiver(tmp_path, allowed_sources=(ipaddress.ip_network("127.0.0.0/8"),)) as (url, _):
        assert post(url).status_code == 200


def test_behind_one_proxy_the_client_is_the_last_forwarded_address(tmp_path: Path) -> None:
    allow = (ipaddress.ip_network("203.0.113.0/24"),)
    with receiver(tmp_path, allowed_sources=allow, trusted_proxies=1) as (url, ledger):
        # The PaaS router appends the address it saw: that one is the client.
        assert post(url, **{"X-Forwarded-For": "203.0.113.7"}).status_code == 200
        # A client that writes an allowed address itself cannot pass: the router appends the real one.
        spoofed = post(url, **{"X-Forwarded-For": "203.0.113.7, 198.51.100.9"})
        assert (spoofed.status_code, spoofed.json()["error"]) == (403, "source address 198.51.100.9 is not allowed")
        with ledger.engine.connect() as conn:
            stored = conn.execute(callbacks.select()).all()
        assert [row.remote_addr for row in stored] == ["203.0.113.7"]


def test_health_is_not_behind_the_allowlist(tmp_path: Path) -> None:
    with receiver(tmp_path, allowed_sources=(ipaddress.ip_network("10.0.0.0/8"),)) as (url, _):
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WEBHOOK_ALLOWED_SOURCES": "10.0.0.0/33"}, "WEBHOOK_ALLOWED_SOURCES: "),
        ({"WEBHOOK_ALLOWED_SOURCES": "not-an-address"}, "WEBHOOK_ALLOWED_SOURCES: "),
        ({"WEBHOOK_TRUSTED_PROXIES": "-1"}, "WEBHOOK_TRUSTED_PROXIES must be a whole number (0 or more), not '-1'"),
    ],
)
def test_bad_access_settings(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert str(raised.value).startswith(message)
