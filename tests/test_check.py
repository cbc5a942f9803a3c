"""``cos-webhook check`` looks and never touches: what is missing is reported, not created."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from support.pipeline import BUCKET, REGION, TOKEN, settings_env

from webhook.cli import main
from webhook.dev.sandbox import Sandbox
from webhook.ledger import Ledger
from webhook.ledger.migrate import head
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

TOKEN_OK = "ok    callback token: 1 configured"
CI_OK = f"ok    ci: {BUCKET} ({REGION}) accepts the credentials"
PERMISSIONS_OK = [
    f"ok    permission: {action} on {BUCKET}"
    for action in ("ci:DescribeMediaJob", "ci:DescribeMediaJobs", "cos:HeadObject", "cos:GetObject")
]


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` and a file's bytes (None for a directory), the sandbox's own left out."""
    return {
        str(p.relative_to(path)): None if p.is_dir() else p.read_bytes()
        for p in path.rglob("*")
        if p.relative_to(path).parts[0] != "sandbox"
    }


@pytest.fixture
def deploy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, as on a fresh machine: relative paths land here."""
    path = tmp_path / "deploy"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


def check(sandbox: Sandbox, database_url: str | None, sink_dir: str) -> Result:
    """Run ``check`` as an operator would; ``database_url=None`` leaves the variable unset (its default)."""
    settings = sandbox.settings(BUCKET, REGION, callback_tokens=(TOKEN,), sink_dir=sink_dir)
    env: dict[str, str | None] = {**settings_env(settings), "WEBHOOK_DATABASE_URL": database_url}
    return CliRunner().invoke(main, ["check"], env=env)


@pytest.mark.parametrize(
    ("database_url", "expected_path"),
    [
        (None, "var/cos-webhook.db"),  # the default: relative, and its directory is missing too
        ("sqlite:///{deploy}/ledgers/new.db", "ledgers/new.db"),  # the directory exists, the file does not
    ],
    ids=["default-url", "absolute-path"],
)
def test_a_missing_ledger_and_sink_directory_are_reported_and_not_created(
    tmp_path: Path, deploy: Path, sandbox: Sandbox, database_url: str | None, expected_path: str
) -> None:
    (deploy / "ledgers").mkdir()
    before = snapshot(tmp_path)

    result = check(sandbox, database_url and database_url.format(deploy=deploy), "out/audio")

    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        TOKEN_OK,
        f"FAIL  ledger: sqlite database {deploy / expected_path} does not exist (run cos-webhook migrate)",
        CI_OK,
        *PERMISSIONS_OK,
        f"ok    filesystem (filesystem) {deploy / 'out/audio'}: does not exist yet; the first delivery creates it",
    ]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("held_open", [False, True], ids=["closed", "open-elsewhere"])
def test_an_existing_ledger_is_only_read(tmp_path: Path, deploy: Path, sandbox: Sandbox, held_open: bool) -> None:
    """Closed (WAL database without -wal and -shm) or open in a running process: nothing is added or changed."""
    url = f"sqlite:///{deploy / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.migrate()
    (deploy / "out").mkdir()
    try:
        if held_open:
            ledger.ping()
        else:
            ledger.dispose()
            assert sorted(p.name for p in deploy.iterdir()) == ["ledger.db", "out"]
        before = snapshot(tmp_path)

        result = check(sandbox, url, "out")

        assert result.exit_code == 0, result.output
        assert result.output.splitlines() == [
            TOKEN_OK,
            f"ok    ledger: sqlite is reachable and its schema is current ({head()})",
            CI_OK,
            *PERMISSIONS_OK,
            f"ok    filesystem (filesystem) {deploy / 'out'}: writable",
        ]
        assert snapshot(tmp_path) == before
    finally:
        ledger.dispose()


def test_an_empty_database_file_lacks_every_table_and_stays_empty(
    tmp_path: Path, deploy: Path, sandbox: Sandbox
) -> None:
    (deploy / "ledger.db").write_bytes(b"")  # what an earlier check used to leave behind
    (deploy / "out").mkdir()
    before = snapshot(tmp_path)

    result = check(sandbox, f"sqlite:///{deploy / 'ledger.db'}", "out")

    assert result.exit_code == 1, result.output
    assert (
        result.output.splitlines()[1] == "FAIL  ledger: sqlite is reachable but has no tables: run cos-webhook migrate"
    )
    assert snapshot(tmp_path) == before


def test_the_public_url_is_probed_when_set(tmp_path: Path, deploy: Path, sandbox: Sandbox) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).migrate()
    settings = sandbox.settings(BUCKET, REGION, callback_tokens=(TOKEN,), sink_dir=str(tmp_path / "out"))
    with BackgroundServer(create_app(settings, Ledger(url))) as receiver:
        public = receiver.url
        env = {**settings_env(settings), "WEBHOOK_DATABASE_URL": url, "WEBHOOK_PUBLIC_URL": public}
        reached = CliRunner().invoke(main, ["check"], env=env)
    gone = CliRunner().invoke(main, ["check"], env=env)  # the same URL, nothing listening any more

    assert reached.exit_code == 0, reached.output
    assert f"ok    public url: {public}/livez answered 200" in reached.output.splitlines()
    assert gone.exit_code == 1
    assert f"FAIL  public url: {public}/livez: ConnectionError: " in gone.output
