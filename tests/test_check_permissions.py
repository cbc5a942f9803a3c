"""``cos-webhook check`` names each call the worker makes that its credentials may not make."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from support.pipeline import BUCKET, REGION, TOKEN, settings_env

from webhook.cli import main
from webhook.dev.sandbox import Sandbox
from webhook.ledger import Ledger


def deployed(tmp_path: Path, sandbox: Sandbox) -> dict[str, str]:
    """The environment of a deploy on the sandbox, with a migrated SQLite ledger."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.migrate()
    ledger.dispose()
    settings = sandbox.settings(BUCKET, REGION, callback_tokens=(TOKEN,), sink_dir=str(tmp_path))
    return {**settings_env(settings), "WEBHOOK_DATABASE_URL": url}


def test_a_denied_call_is_a_fail_line_naming_it_and_the_bucket(tmp_path: Path, sandbox: Sandbox) -> None:
    env = deployed(tmp_path, sandbox)
    allowed = CliRunner().invoke(main, ["check"], env=env)
    sandbox.keys.deny("ci:DescribeMediaJobs", sandbox.secret_id)  # reconcile's listing
    sandbox.keys.deny("cos:HeadObject")

    denied = CliRunner().invoke(main, ["check"], env=env)

    assert allowed.exit_code == 0, allowed.output
    assert denied.exit_code == 1
    lines = [line for line in denied.output.splitlines() if "permission:" in line]
    assert lines[0] == f"ok    permission: ci:DescribeMediaJob on {BUCKET}"
    assert lines[1].startswith(
        f"FAIL  permission: ci:DescribeMediaJobs on {BUCKET}: denied: CI answered 403 AccessDenied: Access Denied."
    )
    assert lines[2].startswith(f"FAIL  permission: cos:HeadObject on {BUCKET}: denied: COS answered 403")
    assert lines[3] == f"ok    permission: cos:GetObject on {BUCKET}"
    assert [line for line in denied.output.splitlines() if line.startswith("FAIL")] == lines[1:3]


def test_a_role_is_checked_with_the_keys_it_is_given(tmp_path: Path, sandbox: Sandbox) -> None:
    env = {
        **deployed(tmp_path, sandbox),
        "COS_SECRET_ID": "",
        "COS_SECRET_KEY": "",
        "COS_CREDENTIALS_ROLE": sandbox.keys.role,
        "WEBHOOK_CREDENTIALS_URL": sandbox.credentials_url,
    }
    sandbox.keys.deny("cos:GetObject", sandbox.keys.role)

    result = CliRunner().invoke(main, ["check"], env=env)

    assert result.exit_code == 1
    (failed,) = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert failed.startswith(f"FAIL  permission: cos:GetObject on {BUCKET}: denied: COS answered 403 AccessDenied")
    assert f"ok    ci: {BUCKET} ({REGION}) accepts the credentials" in result.output.splitlines()
