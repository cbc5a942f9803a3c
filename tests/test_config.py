import pytest

from webhook.config import Settings
from webhook.config_values import CosEndpoint
from webhook.errors import ConfigError
from webhook.ledger import MAX_VERSIONS_PER_JOB

GOOD = {
    "WEBHOOK_CALLBACK_TOKEN": "a" * 24,
    "WEBHOOK_ALLOWED_BUCKETS": "audio-1250000000, other-1250000000",
    "COS_SECRET_ID": "id",
    "COS_SECRET_KEY": "key",
    "COS_REGION": "ap-guangzhou",
    "WEBHOOK_SINK_DIR": "/tmp/out",
}


def test_reads_a_complete_environment() -> None:
    settings = Settings.from_env(GOOD | {"WEBHOOK_COS_ENDPOINT": "http://127.0.0.1:9000"})
    settings.check_receiver()
    settings.check_worker()
    assert settings.allowed_buckets == {"audio-1250000000", "other-1250000000"}
    assert settings.allowed_regions == {"ap-guangzhou"}
    assert settings.allowed_tags == {"NoiseReduction"}
    assert settings.cos_endpoint == CosEndpoint("http", "127.0.0.1", 9000)
    assert settings.database_url == "sqlite:///var/cos-webhook.db"


def test_paas_postgres_url_gets_the_driver_named() -> None:
    settings = Settings.from_env({"WEBHOOK_DATABASE_URL": "postgres://u:p@db:5432/app"})
    assert settings.database_url == "postgresql+psycopg://u:p@db:5432/app"


def test_two_tokens_for_rotation() -> None:
    settings = Settings.from_env({"WEBHOOK_CALLBACK_TOKEN": f"{'a' * 20},{'b' * 20}"})
    assert settings.callback_tokens == ("a" * 20, "b" * 20)


def test_secrets_stay_out_of_repr() -> None:
    text = repr(Settings.from_env(GOOD | {"WEBHOOK_HTTP_SINK_SECRET": "whsec_c2VjcmV0"}))
    assert "key" not in text.replace("secret_key", "")
    assert "whsec_c2VjcmV0" not in text


def test_the_cap_on_versions_per_job_defaults_to_the_ledgers_own() -> None:
    assert Settings.from_env({}).max_versions_per_job == MAX_VERSIONS_PER_JOB
    assert Settings.from_env({"WEBHOOK_MAX_VERSIONS_PER_JOB": "3"}).max_versions_per_job == 3


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WEBHOOK_CALLBACK_TOKEN": "short"}, "WEBHOOK_CALLBACK_TOKEN must be 16 to 256 characters"),
        ({"WEBHOOK_DATABASE_URL": "mysql://x/y"}, "WEBHOOK_DATABASE_URL must be a sqlite:/// or postgresql:// URL"),
        ({"WEBHOOK_MAX_BODY_BYTES": "lots"}, "WEBHOOK_MAX_BODY_BYTES must be a number, not 'lots'"),
        ({"WEBHOOK_MAX_ATTEMPTS": "-1"}, "WEBHOOK_MAX_ATTEMPTS must be greater than 0, not '-1'"),
        ({"WEBHOOK_MAX_VERSIONS_PER_JOB": "0"}, "WEBHOOK_MAX_VERSIONS_PER_JOB must be greater than 0, not '0'"),
        ({"WEBHOOK_MAX_VERSIONS_PER_JOB": "many"}, "WEBHOOK_MAX_VERSIONS_PER_JOB must be a number, not 'many'"),
        ({"WEBHOOK_RUN_WORKER": "maybe"}, "WEBHOOK_RUN_WORKER must be true or false, not 'maybe'"),
        ({"WEBHOOK_COS_ENDPOINT": "ftp://x"}, "WEBHOOK_COS_ENDPOINT must be an http:// or https:// URL"),
        ({"WEBHOOK_COS_ENDPOINT": "http://h:1/p"}, "WEBHOOK_COS_ENDPOINT must be scheme://host[:port] with no path"),
        ({"WEBHOOK_HTTP_SINK_URL": "not a url"}, "WEBHOOK_HTTP_SINK_URL must be an http:// or https:// URL"),
        ({"WEBHOOK_LOG_LEVEL": "loud"}, "WEBHOOK_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("COS_SECRET_ID", "COS_SECRET_ID is not set"),
        ("COS_SECRET_KEY", "COS_SECRET_KEY is not set"),
        ("COS_REGION", "COS_REGION is not set"),
        ("WEBHOOK_ALLOWED_BUCKETS", "WEBHOOK_ALLOWED_BUCKETS is not set"),
    ],
)
def test_worker_settings_missing(missing: str, message: str) -> None:
    env = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ConfigError, match="^" + message):
        Settings.from_env(env).check_worker()


def test_receiver_needs_a_token() -> None:
    with pytest.raises(ConfigError, match=r"^WEBHOOK_CALLBACK_TOKEN is not set"):
        Settings.from_env({}).check_receiver()


def test_http_sink_needs_its_secret() -> None:
    with pytest.raises(ConfigError, match=r"^WEBHOOK_HTTP_SINK_SECRET is not set"):
        Settings.from_env(GOOD | {"WEBHOOK_HTTP_SINK_URL": "https://hooks.example.com/x"}).check_worker()


def test_every_invalid_value_is_named_at_once() -> None:
    env = {"WEBHOOK_MAX_BODY_BYTES": "lots", "WEBHOOK_POLL_INTERVAL": "-1", "WEBHOOK_LOG_LEVEL": "LOUD"}

    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)

    named = sorted(part.split(" ", 1)[0] for part in str(caught.value).split("; "))
    assert named == ["WEBHOOK_LOG_LEVEL", "WEBHOOK_MAX_BODY_BYTES", "WEBHOOK_POLL_INTERVAL"]


def test_a_worker_names_everything_it_misses_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"WEBHOOK_HTTP_SINK_URL": "http://127.0.0.1:9/hook"}).check_worker(sinks=True)

    assert str(caught.value) == (
        "COS_SECRET_ID is not set; COS_SECRET_KEY is not set; COS_REGION is not set (for example ap-guangzhou); "
        "WEBHOOK_ALLOWED_BUCKETS is not set (comma-separated BucketName-APPID list); "
        "WEBHOOK_HTTP_SINK_SECRET is not set but WEBHOOK_HTTP_SINK_URL is"
    )


def test_a_worker_without_any_sink_says_so_with_the_rest() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"COS_SECRET_ID": "id", "COS_SECRET_KEY": "key"}).check_worker(sinks=True)

    problems = str(caught.value).split("; ")
    assert problems[0] == "COS_REGION is not set (for example ap-guangzhou)"
    assert problems[-1].startswith("no sink is configured: set WEBHOOK_SINK_DIR or WEBHOOK_HTTP_SINK_URL")
    assert len(problems) == 3
