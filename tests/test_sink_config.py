"""The sink configuration file: validation messages, filters, per-sink retry, check, dead letters."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from support.pipeline import Pipeline, run_one, settings_env
from support.receiver import Receiver, Reply
from support.sink_dir import written

from webhook.cli import main
from webhook.config import Settings
from webhook.errors import ConfigError
from webhook.models import Job
from webhook.sinks.build import build_sinks, sink_context
from webhook.sinks.events import build_event
from webhook.sinks.options import HttpOptions
from webhook.worker.runtime import Worker

DONE = {"delivered", "failed", "rejected", "dead"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cos-webhook.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sinks = [", "not valid TOML: "),
        (
            '[[sinks]]\nname = "a"\ntype = "ftp"\n',
            "sinks[0]: type must be one of filesystem, http, cos, s3, redis, amqp, not 'ftp'",
        ),
        ('[[sinks]]\nname = "a"\n', "sinks[0]: type is required (filesystem, http, cos, s3, redis or amqp)"),
        (
            '[[sinks]]\nname = "a"\ntype = "cos"\n[sinks.options]\nregion = "ap-guangzhou"\n',
            "sinks[0].options.bucket: required",
        ),
        (
            '[[sinks]]\nname = "a"\ntype = "filesystem"\noptions = {dir = "/tmp", colour = "red"}\n',
            "sinks[0].options.colour: unknown key",
        ),
        (
            '[[sinks]]\nname = "Bad Name"\ntype = "filesystem"\noptions = {dir = "/tmp"}\n',
            "sinks[0].name: String should match pattern '^[a-z0-9][a-z0-9_-]{0,63}$'",
        ),
        (
            '[[sinks]]\nname = "a"\ntype = "filesystem"\nevents = ["sometimes"]\noptions = {dir = "/tmp"}\n',
            "sinks[0].events[0]: Input should be 'success' or 'failure'",
        ),
        (
            '[[sinks]]\nname = "a"\ntype = "filesystem"\noptions = {dir = "/tmp"}\nretry = {max_attempts = 0}\n',
            "sinks[0].retry.max_attempts: Input should be greater than 0",
        ),
        (
            '[[sinks]]\nname = "a"\ntype = "redis"\noptions = {stream = "s", url = "http://x"}\n',
            "sinks[0].options.url: String should match pattern '^rediss?://'",
        ),
        (
            '[[sinks]]\nname = "a"\ntype = "http"\n'
            'options = {url = "http://x", secret_env = "S", mode = "multipart", presign_seconds = 60}\n',
            'sinks[0].options: Value error, file_from and presign_seconds need mode = "json"',
        ),
    ],
    ids=["toml", "type", "no-type", "missing", "unknown-key", "name", "events", "retry", "url", "http-mode"],
)
def test_bad_file_names_the_key_and_reason(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        Settings(config_path=str(path))
    assert str(raised.value).startswith(f"{path}: {message}")


def test_references_and_names_are_checked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[sinks]]\nname = "events"\ntype = "redis"\noptions = {stream = "s", file_from = "events"}\n',
    )
    with pytest.raises(ConfigError, match=r"options\.file_from 'events' is not a filesystem, cos or s3 sink"):
        Settings(config_path=str(path))
    path.write_text('[[sinks]]\nname = "filesystem"\ntype = "filesystem"\noptions = {dir = "/tmp"}\n')
    settings = Settings(config_path=str(path))
    with pytest.raises(ConfigError, match="sink name 'filesystem' is used twice"):
        settings.replace(sink_dir="/tmp/x")


def test_missing_file_only_matters_when_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./cos-webhook.toml here
    assert Settings.from_env({}).sink_specs() == []
    with pytest.raises(ConfigError, match=r"^WEBHOOK_CONFIG: .*none\.toml does not exist$"):
        Settings.from_env({"WEBHOOK_CONFIG": str(tmp_path / "none.toml")})
    (tmp_path / "cos-webhook.toml").write_text('[[sinks]]\nname = "a"\ntype = "filesystem"\noptions = {dir = "x"}\n')
    assert [spec.name for spec in Settings.from_env({}).sink_specs()] == ["a"]


@pytest.mark.parametrize(("environ", "mode"), [({}, "json"), ({"WEBHOOK_HTTP_SINK_MODE": "multipart"}, "multipart")])
def test_environment_http_sink_mode(
    environ: dict[str, str], mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./cos-webhook.toml here
    http = {"WEBHOOK_HTTP_SINK_URL": "http://127.0.0.1:9/hook", "WEBHOOK_HTTP_SINK_SECRET": "s"}
    (spec,) = Settings.from_env(http | environ).sink_specs()
    assert isinstance(spec.options, HttpOptions)
    assert (spec.name, spec.options.mode) == ("http", mode)


def test_environment_and_file_sinks_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[sinks]]\nname = "archive"\ntype = "filesystem"\nevents = ["success"]\ntags = ["NoiseReduction"]\n'
        '[sinks.options]\ndir = "/tmp/archive"\n[sinks.retry]\nmax_attempts = 3\nmax_age = 3600\n',
    )
    specs = Settings(sink_dir="/tmp/env", config_path=str(path)).sink_specs()
    assert [(s.name, s.type) for s in specs] == [("filesystem", "filesystem"), ("archive", "filesystem")]
    archive = specs[1]
    assert archive.retry.max_attempts == 3
    assert archive.retry.max_age == 3600
    assert archive.accepts(Job(job_id="j", tag="NoiseReduction", state="Success"))
    assert not archive.accepts(Job(job_id="j", tag="NoiseReduction", state="Failed"))
    assert not archive.accepts(Job(job_id="j", tag="Other", state="Success"))


@pytest.mark.parametrize(
    ("secret", "key"),
    [
        ("whsec_" + base64.b64encode(b"the hook's own signing key").decode(), b"the hook's own signing key"),
        ("a plain secret, used as its UTF-8 bytes: \u00fc", "a plain secret, used as its UTF-8 bytes: \u00fc".encode()),
    ],
    ids=["whsec", "plain"],
)
def test_secret_comes_from_the_named_variable(tmp_path: Path, secret: str, key: bytes) -> None:
    with Receiver() as receiver:
        path = write(
            tmp_path,
            '[[sinks]]\nname = "hook"\ntype = "http"\n'
            f'options = {{url = "{receiver.url}", secret_env = "HOOK_SECRET"}}\n',
        )
        specs = Settings(config_path=str(path)).sink_specs()
        with pytest.raises(ConfigError, match=r"^sink hook: environment variable HOOK_SECRET is not set$"):
            build_sinks(specs, sink_context(Settings(), {}))
        context = sink_context(Settings(http_sink_secret="whsec_b3RoZXI="), {"HOOK_SECRET": secret})
        hook = build_sinks(specs, context)["hook"]
        failed = Job(job_id="j1", tag="NoiseReduction", state="Failed")
        hook.deliver(build_event(failed, "hook", None))
        hook.close()
    (request,) = receiver.requests
    assert request.body is not None
    # The signature is the HMAC of the variable's value, computed here independently of any library:
    # signed with that key, not another variable's, not WEBHOOK_HTTP_SINK_SECRET's.
    signed = f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.".encode() + request.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert request.headers["webhook-signature"] == f"v1,{expected}"
    Webhook("whsec_" + base64.b64encode(key).decode()).verify(request.body, request.headers, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_b3RoZXI=").verify(request.body, request.headers, json_parse=False)


def test_missing_extra_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[[sinks]]\nname = "q"\ntype = "redis"\noptions = {stream = "s"}\n')
    # As if the redis extra were not installed.
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "webhook.sinks.redis", raising=False)
    with pytest.raises(
        ConfigError, match=r"^sink q \(type redis\) needs the redis extra: pip install 'cos-webhook\[redis\]'$"
    ):
        build_sinks(Settings(config_path=str(path)).sink_specs(), sink_context(Settings(), {}))


# -- in the worker ------------------------------------------------------------------------------


def with_file(pipeline: Pipeline, tmp_path: Path, text: str) -> Pipeline:
    path = write(tmp_path, text)
    pipeline.settings = pipeline.settings.replace(config_path=str(path))
    return pipeline


def test_filters_choose_the_sinks_of_each_job(pipeline: Pipeline, tmp_path: Path) -> None:
    failures = tmp_path / "failures"
    with_file(
        pipeline,
        tmp_path,
        f'[[sinks]]\nname = "failures"\ntype = "filesystem"\nevents = ["failure"]\noptions = {{dir = "{failures}"}}\n',
    )
    ok = pipeline.submit(pipeline.upload_input())
    broken = pipeline.submit("in/missing.wav", output_key="out/never.wav")
    worker = pipeline.worker()
    assert pipeline.drain(worker, ok, DONE) == "delivered"
    assert pipeline.drain(worker, broken, DONE) == "failed"  # CI failed it: its failure event delivered
    sinks_of = {
        job: [d["sink"] for d in pipeline.ledger.views.show_job(job).to_dict()["deliveries"]] for job in (ok, broken)
    }
    assert sinks_of == {ok: ["filesystem", "http"], broken: ["failures", "filesystem", "http"]}
    assert written(failures) == [f"{broken}.event.json"]


def test_each_sink_has_its_own_retry_budget(pipeline: Pipeline, tmp_path: Path) -> None:
    with Receiver(Reply(503)) as failing:
        with_file(
            pipeline,
            tmp_path,
            '[[sinks]]\nname = "impatient"\ntype = "http"\nretry = {max_attempts = 2, backoff_base = 0.01}\n'
            f'options = {{url = "{failing.url}", secret_env = "WEBHOOK_HTTP_SINK_SECRET"}}\n',
        )
        job_id = pipeline.submit(pipeline.upload_input())
        assert pipeline.drain(pipeline.worker(), job_id, DONE) == "dead"
        assert len(failing.requests) == 2
    deliveries = {d["sink"]: d for d in pipeline.ledger.views.show_job(job_id).to_dict()["deliveries"]}
    assert (deliveries["impatient"]["status"], deliveries["impatient"]["attempts"]) == ("dead", 2)
    assert deliveries["impatient"]["last_error"].startswith("impatient: HTTP 503")
    assert deliveries["impatient"]["last_error"].endswith(" (ran out of 2 attempts)")
    # The job's other sinks are delivered regardless.
    assert (deliveries["http"]["status"], deliveries["filesystem"]["status"]) == ("done", "done")


def test_max_age_ends_retries(pipeline: Pipeline, tmp_path: Path) -> None:
    pipeline.http.reply(Reply(503))
    with_file(
        pipeline,
        tmp_path,
        f'[[sinks]]\nname = "fresh-only"\ntype = "http"\nretry = {{max_attempts = 50, max_age = 0.001}}\n'
        f'options = {{url = "{pipeline.http.url}x", secret_env = "WEBHOOK_HTTP_SINK_SECRET"}}\n',
    )
    job_id = pipeline.submit(pipeline.upload_input())
    worker = pipeline.worker()
    pipeline.drain(worker, job_id, {"verified"})
    run_one(worker)
    deliveries = {d["sink"]: d for d in pipeline.ledger.views.show_job(job_id).to_dict()["deliveries"]}
    assert deliveries["fresh-only"]["status"] == "dead"
    assert deliveries["fresh-only"]["attempts"] == 1
    assert deliveries["fresh-only"]["last_error"].endswith("(gave up: older than max_age 0.001s)")


def test_check_prints_a_verdict_per_sink(pipeline: Pipeline, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[[sinks]]\nname = "archive"\ntype = "filesystem"\noptions = {{dir = "{tmp_path / "archive"}"}}\n'
        '[[sinks]]\nname = "broken"\ntype = "http"\n'
        'options = {url = "http://127.0.0.1:9/hook", secret_env = "WEBHOOK_HTTP_SINK_SECRET"}\n',
    )
    env = settings_env(pipeline.settings) | {"WEBHOOK_CONFIG": str(path)}
    result = CliRunner().invoke(main, ["check"], env=env)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[1].startswith("ok    ledger: ")
    assert f"ok    filesystem (filesystem) {pipeline.settings.sink_dir}: " in result.output
    assert f"ok    http (http) {pipeline.settings.http_sink_url}: receiver answered HEAD with 200" in result.output
    archive = tmp_path / "archive"
    assert f"ok    archive (filesystem) {archive}: does not exist yet; the first delivery creates it" in lines
    assert not archive.exists()  # checking created nothing
    assert "FAIL  broken (http) http://127.0.0.1:9/hook: broken: request failed: Connection refused" in lines


def test_check_reports_a_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[[sinks]]\nname = "a"\ntype = "cos"\noptions = {region = "x"}\n')
    result = CliRunner().invoke(main, ["check"], env={"WEBHOOK_CONFIG": str(path)})
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: configuration error: {path}: sinks[0].options.bucket: required"


def test_dead_letters_listed_and_replayed(pipeline: Pipeline) -> None:
    pipeline.http.reply(Reply(410))
    jobs = [pipeline.submit(pipeline.upload_input(), output_key=f"out/{n}.wav") for n in range(3)]
    worker = pipeline.worker()
    for job_id in jobs:
        assert pipeline.drain(worker, job_id, DONE) == "dead"
    env = settings_env(pipeline.settings)

    listed = CliRunner().invoke(main, ["dead", "list", "--json"], env=env)
    letters = [json.loads(line) for line in listed.output.splitlines()]
    assert sorted(letter["job_id"] for letter in letters) == sorted(jobs)
    assert {(letter["sink"], letter["attempts"]) for letter in letters} == {("http", 1)}
    assert all(letter["last_error"].startswith("http: HTTP 410") for letter in letters)
    assert CliRunner().invoke(main, ["dead", "list", "--json", "--since", "1h"], env=env).output == listed.output
    assert CliRunner().invoke(main, ["dead", "list", "--json", "--sink", "filesystem"], env=env).output == ""

    pipeline.http.reply(Reply(200))
    replayed = CliRunner().invoke(main, ["replay", "--dead", "--sink", "http", "--since", "1d"], env=env)
    assert replayed.exit_code == 0, replayed.output
    assert replayed.output.endswith("3 dead letters scheduled again\n")
    for job_id in jobs:
        assert pipeline.drain(worker, job_id, DONE) == "delivered"
    assert CliRunner().invoke(main, ["dead", "list"], env=env).output.splitlines()[1:] == []


def test_replay_needs_a_job_or_dead(pipeline: Pipeline) -> None:
    result = CliRunner().invoke(main, ["replay"], env=settings_env(pipeline.settings))
    assert result.exit_code == 2
    assert "give a JOB_ID, --dead or --rejected" in result.output


def test_bad_since(pipeline: Pipeline) -> None:
    result = CliRunner().invoke(main, ["dead", "list", "--since", "yesterday"], env=settings_env(pipeline.settings))
    assert result.exit_code == 2
    assert "'yesterday' is neither a duration like 2h or 3d nor an ISO date/time" in result.output


def test_worker_without_any_sink_refuses_to_start(pipeline: Pipeline) -> None:
    settings = pipeline.settings.replace(sink_dir="", http_sink_url="")
    with pytest.raises(ConfigError, match=r"^no sink is configured: set WEBHOOK_SINK_DIR or WEBHOOK_HTTP_SINK_URL"):
        Worker.from_settings(settings, pipeline.ledger)
