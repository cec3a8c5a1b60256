"""Settings from defaults < a TOML file < TIDEWIRE_* variables < given values; their masking."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from tidewire import Settings
from tidewire.cli_settings import flag_name
from tidewire.config import SettingsError, field_docs
from tidewire.masking import mask, mask_setting

SECRET = "s" * 40


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_each_source_overrides_the_one_before_for_every_kind_of_field(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.toml",
        """
        heartbeat = 3
        max_event_bytes = 5000
        cancel_on_disconnect = false
        allow_origins = ["https://file.example"]
        max_file_size = "none"
        broker = "redis://file:6379/0"
        lease = 2.5
        sse_retry_ms = 100
        """.replace("        ", ""),
    )
    environ = {
        "TIDEWIRE_MAX_EVENT_BYTES": "6000",
        "TIDEWIRE_ALLOW_ORIGINS": "https://a.example, https://b.example",
        "tidewire_lease": "4",  # names are not case-sensitive
        "TIDEWIRE_BROKER": "redis://env:6379/0",
        "TIDEWIRE_CHANNEL_MAX_AGE": "none",
        "TIDEWIRE_URL": "http://elsewhere",  # the client's, not a setting: left alone
    }
    given = {"lease": "8", "cancel_on_disconnect": True, "broker": "redis://flag:6379/0"}

    settings = Settings.load(config, environ, given)

    assert settings.heartbeat == 3.0  # file
    assert settings.sse_retry_ms == 100  # file
    assert settings.max_file_size is None  # file, "none"
    assert settings.max_event_bytes == 6000  # env over file
    assert settings.allow_origins == ("https://a.example", "https://b.example")  # env, commas
    assert settings.channel_max_age is None  # env, "none"
    assert settings.lease == 8.0  # given over env over file
    assert settings.cancel_on_disconnect is True  # given over file
    assert settings.broker == "redis://flag:6379/0"
    assert settings.run_window == Settings().run_window  # no source: the default

    # Without the given values, and without the file.
    assert Settings.load(config, environ).lease == 4.0
    assert Settings.load(None, environ).heartbeat == Settings().heartbeat


def test_from_env_reads_the_file_tidewire_config_names(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "heartbeat = 2\nrun_ttl = 9\n")
    settings = Settings.from_env({"TIDEWIRE_CONFIG": str(config), "TIDEWIRE_RUN_TTL": "7"})
    assert (settings.heartbeat, settings.run_ttl) == (2.0, 7.0)
    # Given values still win; lists from a variable are comma-separated.
    assert Settings.from_env({"TIDEWIRE_HEARTBEAT": "4"}, heartbeat=1.0).heartbeat == 1.0
    assert Settings.from_env({"TIDEWIRE_ALLOW_ORIGINS": "https://x.example"}).allow_origins == (
        "https://x.example",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'max_event_bytes = "lots"',
            "config.toml: max_event_bytes: Input should be a valid integer",
        ),
        ("heartbaet = 3", "config.toml: heartbaet: no such setting"),
        (
            "cancel_on_disconnect = 3",
            "config.toml: cancel_on_disconnect: Input should be a valid boolean",
        ),
        ("allow_origins = [1, 2]", "config.toml: allow_origins: Input should be a valid string"),
        ("heartbeat = ", "config.toml: not TOML"),
    ],
)
def test_a_bad_file_names_the_file_and_the_field(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "config.toml", text + "\n")
    with pytest.raises(SettingsError) as caught:
        Settings.load(config, {})
    assert str(caught.value).replace(str(tmp_path) + "/", "").startswith(message)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no such file"):
        Settings.load(tmp_path / "nope.toml", {})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TIDEWIRE_HEARTBEAT", "soon", "TIDEWIRE_HEARTBEAT: Input should be a valid number"),
        ("TIDEWIRE_MAX_RUNS", "1.5", "TIDEWIRE_MAX_RUNS: Input should be a valid integer"),
        (
            "TIDEWIRE_CANCEL_ON_DISCONNECT",
            "maybe",
            "TIDEWIRE_CANCEL_ON_DISCONNECT: Input should be a valid boolean",
        ),
        (
            "TIDEWIRE_MAX_FILE_SIZE",
            "big",
            "TIDEWIRE_MAX_FILE_SIZE: Input should be a valid integer",
        ),
    ],
)
def test_a_bad_variable_is_named(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert str(caught.value).startswith(message)


def test_a_bad_given_value_is_named_as_the_caller_names_it() -> None:
    with pytest.raises(SettingsError, match=r"^--lease: Input should be a valid number"):
        Settings.load(None, {}, {"lease": "abc"}, given_as=flag_name)
    with pytest.raises(SettingsError, match=r"^--allow-origin"):
        Settings.load(None, {}, {"allow_origins": (1,)}, given_as=flag_name)
    # Every bad value at once, each on its line.
    with pytest.raises(SettingsError) as caught:
        Settings.load(None, {}, {"lease": "x", "max_runs": "y"}, given_as=flag_name)
    lines = str(caught.value).splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["--lease", "--max-runs"]


def test_the_variables_of_settings_read_back_as_the_same_settings() -> None:
    settings = Settings(
        heartbeat=1.5,
        cancel_on_disconnect=False,
        channel_max_age=None,  # None where the default is not
        max_file_size=None,
        allow_origins=("https://a.example", "https://b.example"),
        broker="redis://:pw@host:6379/1",
        auth_secret=SECRET,
        max_event_bytes=12345,
    )
    environ = settings.environ()
    assert environ["TIDEWIRE_CHANNEL_MAX_AGE"] == "none"
    assert environ["TIDEWIRE_STORAGE"] is None  # None as by default: no variable
    # Nor for a default: an app's `Settings.from_env(lease=...)` still decides it …
    assert environ["TIDEWIRE_LEASE"] is None and environ["TIDEWIRE_HEARTBEAT"] == "1.5"
    # … unless somebody chose it, default or not.
    assert settings.environ({"lease"})["TIDEWIRE_LEASE"] == "10.0"
    assert Settings.from_env({k: v for k, v in environ.items() if v is not None}) == settings


def test_chosen_names_every_field_a_source_set(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("lease = 10.0\n")
    env = {"TIDEWIRE_DRAIN_TIMEOUT": "30", "OTHER": "x"}
    chosen = Settings.chosen(config, env, {"heartbeat": 15.0})
    assert chosen == {"lease", "drain_timeout", "heartbeat"}


def test_masked_hides_secrets_and_url_passwords_and_nothing_else() -> None:
    settings = Settings(
        auth_secret=SECRET,
        link_secret="link-key",
        broker="redis://user:hunter2@redis.internal:6379/0",
        storage="s3://bucket/p?endpoint=http://minio:9000&secret_key=sk&access_key=ak",
        auth_audience="my-api",
    )
    masked = settings.masked()
    assert masked["auth_secret"] == masked["link_secret"] == "***"
    assert masked["broker"] == "redis://user:***@redis.internal:6379/0"
    assert (
        masked["storage"]
        == "s3://bucket/p?endpoint=http://minio:9000&secret_key=***&access_key=***"
    )
    assert masked["auth_audience"] == "my-api"
    assert masked["heartbeat"] == settings.heartbeat
    text = settings.to_toml()
    for secret in (SECRET, "link-key", "hunter2", "sk&", "=ak"):
        assert secret not in text


def test_to_toml_is_a_config_file_that_reads_back(tmp_path: Path) -> None:
    settings = Settings(
        heartbeat=2.0,
        max_file_size=None,
        allow_origins=("https://a.example",),
        accel_redirect='/_files/"x"',
        cancel_on_disconnect=False,
    )
    config = write(tmp_path / "printed.toml", settings.to_toml())
    assert tomllib.loads(config.read_text())["heartbeat"] == 2.0
    assert Settings.load(config, {}) == settings


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("metrics_token", "t0k3n", "***"),  # a field added later, by its name
        ("admin_password", "pw", "***"),
        ("auth_public_key", "/etc/key.pem", "/etc/key.pem"),  # public
        ("broker", "redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("broker", "redis://h:1/0", "redis://h:1/0"),
        ("allow_origins", ("https://u:pw@a.example",), ("https://u:***@a.example",)),
        ("max_file_size", None, None),
    ],
)
def test_mask_setting(name: str, value: object, shown: object) -> None:
    assert mask_setting(name, value) == shown


def test_mask_leaves_ordinary_text_alone() -> None:
    for text in (
        "GET /streams/demo?n=5 HTTP/1.1",
        "user@example.com wrote",
        "a=b",
        "http://h/p?q=1",
    ):
        assert mask(text) == text
    assert mask("GET /x?access_token=abc&n=1") == "GET /x?access_token=***&n=1"
    assert mask("GET /x?access%5Ftoken=abc") == "GET /x?access%5Ftoken=***"


def test_every_field_has_its_doc() -> None:
    docs = field_docs()
    for f in dataclasses.fields(Settings):
        assert docs.get(f.name), f.name
    assert docs["heartbeat"].startswith("Seconds of silence")
    assert docs["auth_issuer"] == docs["auth_audience"]  # one comment for the two
