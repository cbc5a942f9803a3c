"""Temporary keys: COS_SECRET_TOKEN, and a CAM role's keys refreshed from a metadata service (the sandbox's)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from qcloud_cos import CosServiceError
from support.pipeline import BUCKET, DONE, REGION, Pipeline

from webhook.ci.client import client_for, make_client, signer_for, source_client
from webhook.ci.credentials import Credentials, CredentialsError, RoleCredentials, credentials_for
from webhook.ci.fetch import presigned_url
from webhook.ci.verify import VerifyError, describe_job
from webhook.config import Settings
from webhook.dev.sandbox import Sandbox
from webhook.dev.sandbox.keys import TemporaryKeys
from webhook.errors import ConfigError
from webhook.models import ObjectLocation
from webhook.worker.runtime import Worker

NO_JOB = "j" + "0" * 32


def role_settings(sandbox: Sandbox, **more: Any) -> Settings:
    """The sandbox's settings with its role's temporary keys instead of its permanent ones."""
    role = {"credentials_role": sandbox.keys.role, "credentials_url": sandbox.credentials_url}
    return sandbox.settings(BUCKET, REGION, **({"secret_id": "", "secret_key": ""} | role | more))


def refused(call: Any, **kwargs: Any) -> CosServiceError:
    with pytest.raises(CosServiceError) as info:
        call(**kwargs)
    return info.value


def wait_past(expires_at: float) -> None:
    """Until the sandbox's clock (this machine's) has passed ``expires_at``."""
    while time.time() < expires_at:
        time.sleep(0.05)


def test_worker_with_role_credentials_delivers_jobs_across_expiries(pipeline: Pipeline) -> None:
    sandbox = pipeline.sandbox
    sandbox.keys.lifetime = 3
    settings = pipeline.settings.replace(
        secret_id="", secret_key="", credentials_role=sandbox.keys.role, credentials_url=sandbox.credentials_url
    )
    worker = Worker.from_settings(settings, pipeline.ledger)  # one worker, never restarted
    try:
        for n in range(3):
            job_id = pipeline.submit(pipeline.upload_input(f"in/{n}.wav"), output_key=f"out/{n}.wav")
            sandbox.wait_for_callbacks(n + 1, timeout=20)
            assert pipeline.drain(worker, job_id, DONE) == "delivered"
            assert (Path(settings.sink_dir) / f"{job_id}.wav").read_bytes() == pipeline.output_bytes(f"out/{n}.wav")
            wait_past(sandbox.keys.issued[-1].expires_at)  # the keys it used are dead now
    finally:
        worker.close()
    source = credentials_for(settings)
    assert isinstance(source, RoleCredentials)
    assert source.fetches >= 3
    assert len(sandbox.keys.issued) == source.fetches  # one fetch for all of the process's clients


class EveryReadNewKeys:
    """A source whose keys change at every read: the worst case of a refresh during a request."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.keyring = sandbox.keys

    def current(self) -> Credentials:
        keys = self.keyring.issue()
        return Credentials(keys.secret_id, keys.secret_key, keys.token, keys.expires_at)


@pytest.mark.parametrize("threads", [1, 4])
def test_one_request_never_signs_with_a_mix_of_old_and_new_keys(sandbox: Sandbox, threads: int) -> None:
    client = source_client(EveryReadNewKeys(sandbox), REGION, sandbox.endpoint)
    failures: list[Exception] = []

    def calls() -> None:
        try:
            client.put_object(Bucket=BUCKET, Key="probe", Body=b"x")  # x-cos-security-token
            client.head_object(Bucket=BUCKET, Key="probe")
            describe_job(client, BUCKET, NO_JOB)  # x-ci-security-token
        except (CosServiceError, VerifyError) as exc:
            failures.append(exc)

    running = [threading.Thread(target=calls) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    assert failures == []
    assert len(sandbox.keys.issued) >= 3 * threads  # each request took new keys


def test_presigned_url_made_with_role_keys_carries_their_token(sandbox: Sandbox) -> None:
    settings = role_settings(sandbox)
    client_for(settings).put_object(Bucket=BUCKET, Key="shared.wav", Body=b"RIFF")
    url = presigned_url(signer_for(settings, REGION), ObjectLocation(BUCKET, REGION, "shared.wav"), 60)
    assert "x-cos-security-token=" in url
    target, headers = sandbox.request_target(url)
    assert requests.get(target, headers=headers, timeout=10).content == b"RIFF"
    without_token, headers = sandbox.request_target(url.split("&x-cos-security-token=")[0])
    assert requests.get(without_token, headers=headers, timeout=10).status_code == 403


def test_request_with_an_expired_token_is_refused(sandbox: Sandbox) -> None:
    sandbox.keys.lifetime = 1
    keys = sandbox.keys.issue()
    client = make_client(keys.secret_id, keys.secret_key, REGION, sandbox.endpoint, token=keys.token)
    client.put_object(Bucket=BUCKET, Key="a", Body=b"x")
    wait_past(keys.expires_at)
    error = refused(client.put_object, Bucket=BUCKET, Key="a", Body=b"x")
    assert (error.get_status_code(), error.get_error_code()) == (403, "ExpiredToken")


def test_secret_token_setting_is_sent_with_every_request(sandbox: Sandbox) -> None:
    keys = sandbox.keys.issue()
    settings = temporary_settings(sandbox, keys, keys.token)
    client = client_for(settings)
    client.put_object(Bucket=BUCKET, Key="a", Body=b"x")  # COS: x-cos-security-token
    assert client.get_object(Bucket=BUCKET, Key="a")["Body"].get_raw_stream().read() == b"x"
    assert describe_job(client, BUCKET, NO_JOB) is None  # CI: x-ci-security-token


@pytest.mark.parametrize("token", ["", "not-the-token"])
def test_temporary_keys_without_their_token_are_refused(sandbox: Sandbox, token: str) -> None:
    keys = sandbox.keys.issue()
    client = client_for(temporary_settings(sandbox, keys, token))
    error = refused(client.put_object, Bucket=BUCKET, Key="a", Body=b"x")
    assert (error.get_status_code(), error.get_error_code()) == (403, "InvalidAccessKeyId")
    with pytest.raises(VerifyError, match="403 InvalidAccessKeyId"):
        describe_job(client, BUCKET, NO_JOB)


def temporary_settings(sandbox: Sandbox, keys: TemporaryKeys, token: str) -> Settings:
    return sandbox.settings(BUCKET, REGION, secret_id=keys.secret_id, secret_key=keys.secret_key, secret_token=token)


def test_failed_refresh_keeps_the_old_keys_until_they_expire(caplog: pytest.LogCaptureFixture) -> None:
    now = [time.time()]
    with Sandbox().start() as sandbox:
        source = RoleCredentials(sandbox.keys.role, sandbox.credentials_url, clock=lambda: now[0])
        first = source.current()
        assert first.token == sandbox.keys.issued[0].token
        assert first.expires_at is not None
    # The metadata service is gone: the refresh fails, and is said to have.
    now[0] = first.expires_at - 10
    with caplog.at_level(logging.WARNING, logger="webhook.ci.credentials"):
        assert source.current() == first
    assert any(f"refreshing role {source.role} failed" in record.getMessage() for record in caplog.records)
    assert source.current() == first  # not tried again at once
    now[0] = first.expires_at
    with pytest.raises(CredentialsError, match="unreachable"):
        source.current()


def test_unknown_role_is_an_error_naming_it(sandbox: Sandbox) -> None:
    source = RoleCredentials("no-such-role", sandbox.credentials_url)
    with pytest.raises(CredentialsError, match=r"role no-such-role: .* answered 404"):
        source.current()


def test_role_and_fixed_keys_are_exclusive(sandbox: Sandbox) -> None:
    settings = role_settings(sandbox, secret_id="AKID", secret_token="tok")
    with pytest.raises(ConfigError, match="COS_CREDENTIALS_ROLE and COS_SECRET_ID/COS_SECRET_TOKEN are both set"):
        settings.check_worker()
    role_settings(sandbox).check_worker()  # the role alone needs no keys


def test_secret_token_needs_the_keys_it_goes_with() -> None:
    settings = Settings.from_env({"COS_SECRET_TOKEN": "tok", "COS_REGION": REGION, "WEBHOOK_ALLOWED_BUCKETS": BUCKET})
    with pytest.raises(ConfigError) as info:
        settings.check_worker()
    assert str(info.value) == (
        "COS_SECRET_ID is not set; COS_SECRET_KEY is not set; "
        "COS_SECRET_TOKEN is set: it goes with the temporary COS_SECRET_ID and COS_SECRET_KEY"
    )


def test_secret_token_is_a_secret() -> None:
    settings = Settings.from_env(
        {"COS_SECRET_ID": "AKID", "COS_SECRET_KEY": "key", "COS_SECRET_TOKEN": "the-token-value", "COS_REGION": REGION}
    )
    assert "the-token-value" not in repr(settings)
    assert settings.redact("denied with the-token-value") == "denied with [redacted]"


def test_credentials_url_must_be_a_url() -> None:
    with pytest.raises(ConfigError, match="WEBHOOK_CREDENTIALS_URL must be an http:// or https:// URL"):
        Settings.from_env({"WEBHOOK_CREDENTIALS_URL": "metadata"})


def test_cos_sink_with_the_service_s_variables_takes_the_role_s_keys(pipeline: Pipeline, tmp_path: Path) -> None:
    config = tmp_path / "cos-webhook.toml"
    config.write_text(
        '[[sinks]]\nname = "archive"\ntype = "cos"\n'
        f'[sinks.options]\nbucket = "archive-1250000000"\nregion = "{REGION}"\nprefix = "denoised/"\n'
    )
    sandbox = pipeline.sandbox
    settings = pipeline.settings.replace(
        secret_id="",
        secret_key="",
        credentials_role=sandbox.keys.role,
        credentials_url=sandbox.credentials_url,
        sink_dir="",
        http_sink_url="",
        config_path=str(config),
    )
    job_id = pipeline.submit(pipeline.upload_input())
    sandbox.wait_for_callbacks(1, timeout=20)

    worker = Worker.from_settings(settings, pipeline.ledger)
    try:
        assert pipeline.drain(worker, job_id, DONE) == "delivered"
    finally:
        worker.close()
    stored = sandbox.object_path("archive-1250000000", f"denoised/{job_id}.wav").read_bytes()
    assert stored == pipeline.output_bytes()


def test_sandbox_serves_role_keys_as_a_cvm_s_metadata_service_does(sandbox: Sandbox) -> None:
    sandbox.keys.lifetime = 60
    named = requests.get(sandbox.credentials_url, timeout=10)
    issued = requests.get(sandbox.credentials_url + sandbox.keys.role, timeout=10).json()
    unknown = requests.get(sandbox.credentials_url + "other-role", timeout=10)

    assert named.text == sandbox.keys.role
    assert set(issued) == {"TmpSecretId", "TmpSecretKey", "Token", "ExpiredTime", "Expiration", "Code"}
    assert issued["Code"] == "Success"
    assert 0 < issued["ExpiredTime"] - time.time() <= 60
    assert unknown.status_code == 404
