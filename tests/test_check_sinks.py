"""``cos-webhook check`` names each sink's target on its ``ok`` and ``FAIL`` lines, and never a secret."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner, Result
from support.moto_server import MotoServer
from support.pipeline import BUCKET, REGION, TOKEN, settings_env
from support.rabbitmq import rabbitmq_user
from support.receiver import Receiver, Reply
from support.services import require_service

from webhook.cli import main
from webhook.dev.sandbox import Sandbox
from webhook.ledger import Ledger

KEY_ID = "AKIDCHECKKEY000000001"
S3_SECRET = "s3-secret-never-printed-0123456789"
REDIS_PASSWORD = "redis-password-never-printed"
URL_PASSWORD = "url-password-never-printed"
QUERY_SECRET = "query-secret-never-printed"
SIGNING_SECRET = "signing-secret-never-printed"


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def amqp_user() -> Iterator[tuple[str, str]]:
    with rabbitmq_user() as user:
        yield user


def sink(name: str, type_: str, options: str) -> str:
    return f'[[sinks]]\nname = "{name}"\ntype = "{type_}"\noptions = {{{options}}}\n'


def run_check(tmp_path: Path, sandbox: Sandbox, sinks: str, **environ: str) -> Result:
    """``check`` with a current ledger, the sandbox's CI and filesystem sink, and ``sinks`` in the config file."""
    database_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(database_url).migrate()
    settings = sandbox.settings(BUCKET, REGION, callback_tokens=(TOKEN,), sink_dir=str(tmp_path / "out"))
    config = tmp_path / "cos-webhook.toml"
    config.write_text(sinks)
    env = settings_env(settings) | {"WEBHOOK_DATABASE_URL": database_url, "WEBHOOK_CONFIG": str(config)} | environ
    return CliRunner().invoke(main, ["check"], env=env)


def sink_lines(result: Result) -> dict[str, str]:
    """The output's sink lines by sink name."""
    return {line.split(" (")[0].split()[-1]: line for line in result.output.splitlines() if " (" in line}


def test_every_sink_line_names_its_target_and_no_secret(
    tmp_path: Path, sandbox: Sandbox, moto: MotoServer, amqp_user: tuple[str, str]
) -> None:
    require_service("Redis", "127.0.0.1", 6379)
    user, password = amqp_user
    bucket = f"check-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=S3_SECRET
    ).create_bucket(Bucket=bucket)
    with Receiver(Reply(204)) as receiver:
        base = receiver.url
        hook = base.replace("http://", f"http://hook:{URL_PASSWORD}@") + f"hook?token={QUERY_SECRET}"
        bus = f"amqp://{user}:{password}@127.0.0.1:5672/%2F"
        result = run_check(
            tmp_path,
            sandbox,
            sink("hook", "http", f'url = "{hook}", secret_env = "HOOK_SECRET"')
            + sink("copy", "s3", f'bucket = "{bucket}", prefix = "audio/", endpoint_url = "{moto.url}"')
            + sink("lost", "s3", f'bucket = "no-such-bucket", region = "eu-west-1", endpoint_url = "{moto.url}"')
            + sink("stream", "redis", 'url = "redis://127.0.0.1:6379/0", stream = "test:cos-webhook:check"')
            + sink("keyed", "redis", f'url = "redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0", stream = "s"')
            # The broker's own exchange, not declared: the check leaves nothing behind.
            + sink("bus", "amqp", f'url = "{bus}", exchange = "amq.topic", declare = false')
            + sink("denied", "amqp", f'url = "amqp://{user}:{URL_PASSWORD}@127.0.0.1:5672/%2F", exchange = "x"'),
            AWS_ACCESS_KEY_ID=KEY_ID,
            AWS_SECRET_ACCESS_KEY=S3_SECRET,
            HOOK_SECRET=SIGNING_SECRET,
        )

    lines = sink_lines(result)
    assert result.exit_code == 1, result.output
    assert (
        lines["filesystem"]
        == f"ok    filesystem (filesystem) {tmp_path / 'out'}: does not exist yet; the first delivery creates it"
    )
    assert lines["hook"].startswith(f"ok    hook (http) {base.replace('http://', 'http://hook@')}hook: ")
    assert lines["copy"] == f"ok    copy (s3) s3://{bucket}/audio/ (us-east-1) at {moto.url}: reachable"
    assert lines["lost"].startswith(f"FAIL  lost (s3) s3://no-such-bucket/ (eu-west-1) at {moto.url}: lost: ")
    assert lines["stream"].startswith("ok    stream (redis) redis://127.0.0.1:6379/0 stream test:cos-webhook:check: ")
    # This Redis takes any password; what matters is that the line does not show it.
    assert lines["keyed"].startswith("ok    keyed (redis) redis://127.0.0.1:6379/0 stream s: ")
    shown = f"amqp://{user}@127.0.0.1:5672/%2F exchange amq.topic key cos-webhook.job"
    assert lines["bus"].startswith(f"ok    bus (amqp) {shown}: accepts messages")
    denied = f"amqp://{user}@127.0.0.1:5672/%2F exchange x key cos-webhook.job"
    assert lines["denied"].startswith(f"FAIL  denied (amqp) {denied}: denied: ")
    secrets = (SIGNING_SECRET, S3_SECRET, REDIS_PASSWORD, URL_PASSWORD, QUERY_SECRET, password)
    assert [secret for secret in secrets if secret in result.output] == []


@pytest.mark.parametrize(
    ("status", "line", "exit_code"),
    [
        (501, "ok    hook (http) {url}: receiver is reachable but does not answer HEAD (501): POST was not proven", 0),
        (405, "ok    hook (http) {url}: receiver is reachable but does not answer HEAD (405): POST was not proven", 0),
        (503, "FAIL  hook (http) {url}: hook: HTTP 503 Service Unavailable", 1),
    ],
)
def test_a_receiver_without_head_is_said_so_and_a_5xx_fails(
    tmp_path: Path, sandbox: Sandbox, status: int, line: str, exit_code: int
) -> None:
    with Receiver(Reply(status)) as receiver:
        url = receiver.url + "hook"
        options = f'url = "{url}", secret_env = "HOOK_SECRET"'
        result = run_check(tmp_path, sandbox, sink("hook", "http", options), HOOK_SECRET=SIGNING_SECRET)

    assert result.exit_code == exit_code, result.output
    assert sink_lines(result)["hook"] == line.format(url=url)
