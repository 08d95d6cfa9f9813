"""Tests for relayd.config: sources, precedence, errors, and the shipped relayd.toml.

Every test passes ``environ`` and ``default_path`` explicitly, so neither the machine's
environment nor its /etc/relayd/relayd.toml can leak in.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from relayd.config import (
    DEFAULT_CONFIG_PATH,
    Settings,
    load_settings,
    settings_as_json,
)
from relayd.errors import ConfigError, RelaydError

SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "config" / "relayd.toml"
NO_FILE = Path("/nonexistent/relayd.toml")


def load(
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    default_path: Path = NO_FILE,
) -> Settings:
    """load_settings with an empty environment and no default file unless given."""
    return load_settings(
        config_path=config_path,
        environ={} if environ is None else environ,
        overrides=overrides,
        default_path=default_path,
    )


def write(tmp_path: Path, text: str, name: str = "relayd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def setting_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Dotted keys of every leaf field, from the models' public pydantic description."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from setting_keys(annotation, f"{prefix}{name}.")
        else:
            yield prefix + name


def toml_keys(table: Mapping[str, object], prefix: str = "") -> Iterator[str]:
    # Descend into sections only: a table-valued setting (auth.tokens) is one key.
    for name, value in table.items():
        if isinstance(value, Mapping) and not prefix and name in Settings.model_fields:
            yield from toml_keys(value, f"{prefix}{name}.")
        else:
            yield prefix + name


# --- defaults and precedence ---------------------------------------------------------------


def test_defaults() -> None:
    settings = load()
    assert settings == Settings()
    assert settings.server.host == ""
    assert settings.server.port == 9030
    assert settings.limits.max_connections == 10000
    assert settings.log.level == "info"
    assert settings.log.bodies is False


def test_default_config_path() -> None:
    assert Path("/etc/relayd/relayd.toml") == DEFAULT_CONFIG_PATH


def test_toml_overrides_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\nport = 8000\nhost = "127.0.0.1"\n[limits]\nidle_timeout_s = 0\n'
        '[log]\nformat = "console"\n',
    )
    settings = load(config_path=path)
    assert settings.server.port == 8000
    assert settings.server.host == "127.0.0.1"
    assert settings.limits.idle_timeout_s == 0.0
    assert settings.log.format == "console"
    assert settings.limits.max_connections == 10000  # untouched keys keep their defaults


def test_env_overrides_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_connections = 100\nmessage_burst = 7\n")
    settings = load(config_path=path, environ={"RELAYD_LIMITS__MAX_CONNECTIONS": "5"})
    assert settings.limits.max_connections == 5
    assert settings.limits.message_burst == 7


def test_env_strings_are_coerced() -> None:
    settings = load(
        environ={
            "RELAYD_LOG__MESSAGES": "false",
            "RELAYD_LIMITS__MESSAGES_PER_SECOND": "2.5",
            "RELAYD_SERVER__HOST": "::1",
        }
    )
    assert settings.log.messages is False
    assert settings.limits.messages_per_second == 2.5
    assert settings.server.host == "::1"


def test_env_key_part_is_case_insensitive() -> None:
    assert load(environ={"RELAYD_Server__Port": "1234"}).server.port == 1234


def test_env_without_prefix_is_ignored() -> None:
    assert load(environ={"HOME": "/root", "relayd_foo": "x", "LOG__LEVEL": "x"}) == Settings()


def test_plain_port_sets_server_port() -> None:
    assert load(environ={"PORT": "8080"}).server.port == 8080


def test_relayd_server_port_beats_port() -> None:
    settings = load(environ={"PORT": "8080", "RELAYD_SERVER__PORT": "8081"})
    assert settings.server.port == 8081


def test_overrides_beat_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 1\n[log]\nlevel = "error"\n')
    settings = load(
        config_path=path,
        environ={"RELAYD_SERVER__PORT": "2", "PORT": "3", "RELAYD_LOG__LEVEL": "warning"},
        overrides={"server.port": 0, "log.level": "debug"},
    )
    assert settings.server.port == 0
    assert settings.log.level == "debug"


def test_none_override_means_flag_not_given() -> None:
    settings = load(environ={"PORT": "8080"}, overrides={"server.port": None})
    assert settings.server.port == 8080


def test_environ_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYD_LIMITS__MESSAGE_BURST", "9")
    settings = load_settings(default_path=NO_FILE)
    assert settings.limits.message_burst == 9


def test_settings_alone_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYD_SERVER__PORT", "1")
    monkeypatch.setenv("SERVER", '{"port": 2}')
    assert Settings().server.port == 9030


# --- the default file ----------------------------------------------------------------------


def test_default_path_used_when_present(tmp_path: Path) -> None:
    default = write(tmp_path, "[server]\nport = 7000\n")
    assert load(default_path=default).server.port == 7000


def test_default_path_ignored_when_absent(tmp_path: Path) -> None:
    assert load(default_path=tmp_path / "absent.toml") == Settings()


def test_explicit_config_replaces_default_path(tmp_path: Path) -> None:
    default = write(tmp_path, "[server]\nport = 7000\n", name="default.toml")
    given_path = write(tmp_path, "[limits]\nmessage_burst = 3\n", name="given.toml")
    settings = load(config_path=given_path, default_path=default)
    assert settings.server.port == 9030
    assert settings.limits.message_burst == 3


# --- errors --------------------------------------------------------------------------------


def test_unknown_toml_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_conections = 5\n")
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert info.value.key == "limits.max_conections"
    assert info.value.source == f"in {path}"
    assert info.value.reason == "unknown key"
    assert str(info.value) == f"limits.max_conections: unknown key (in {path})"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[clustre]\ntoken = 'x'\n", "clustre"),
        ("[limits.extra]\nx = 1\n", "limits.extra"),
        ("port = 9030\n", "port"),
    ],
)
def test_unknown_toml_section_or_top_level_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{key}: unknown key \(in .*relayd\.toml\)$"):
        load(config_path=path)


def test_section_given_a_value(tmp_path: Path) -> None:
    path = write(tmp_path, "server = 5\n")
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert str(info.value) == f"server: is a section, not a setting (in {path})"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("RELAYD_LIMITS__MAX_CONECTIONS", "limits.max_conections"),
        ("RELAYD_FOO", "foo"),
        ("RELAYD_LIMITS_MAX_CONNECTIONS", "limits_max_connections"),
        ("RELAYD_SERVER__PORT__X", "server.port.x"),
    ],
)
def test_unknown_env_var(name: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={name: "5"})
    assert info.value.key == key
    assert str(info.value) == f"{key}: unknown key (from environment {name})"


def test_env_var_naming_a_section() -> None:
    with pytest.raises(ConfigError, match=r"^log: is a section, not a setting"):
        load(environ={"RELAYD_LOG": "debug"})


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError) as info:
        load(overrides={"server.prot": 1})
    assert str(info.value) == "server.prot: unknown key (from command line)"


def test_bad_value_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 70000\n")
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert str(info.value) == (
        f"server.port: Input should be less than or equal to 65535 (in {path})"
    )


@pytest.mark.parametrize(
    ("environ", "overrides", "key", "source"),
    [
        (
            {"RELAYD_SERVER__PORT": "70000"},
            None,
            "server.port",
            "from environment RELAYD_SERVER__PORT",
        ),
        ({"PORT": "http"}, None, "server.port", "from environment PORT"),
        ({"RELAYD_LOG__LEVEL": "DEBUG"}, None, "log.level", "from environment RELAYD_LOG__LEVEL"),
        ({}, {"server.port": -1}, "server.port", "from command line"),
        ({}, {"limits.max_connections": 0}, "limits.max_connections", "from command line"),
    ],
)
def test_bad_value_names_key_and_source(
    environ: dict[str, str], overrides: dict[str, object] | None, key: str, source: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ=environ, overrides=overrides)
    assert info.value.key == key
    assert info.value.source == source
    assert str(info.value).startswith(f"{key}: ")
    assert str(info.value).endswith(f" ({source})")


def test_error_blames_the_source_of_the_effective_value(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 8000\n")
    with pytest.raises(ConfigError) as info:
        load(config_path=path, environ={"RELAYD_SERVER__PORT": "99999"})
    assert info.value.source == "from environment RELAYD_SERVER__PORT"


def test_bad_value_overridden_by_a_later_source_is_not_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 99999\n")
    settings = load(config_path=path, environ={"PORT": "8000"})
    assert settings.server.port == 8000


@pytest.mark.parametrize("value", ["inf", "nan", "-1.0"])
def test_timeouts_must_be_finite_and_in_range(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[limits]\nidle_timeout_s = {value}\n")
    with pytest.raises(ConfigError, match=r"^limits\.idle_timeout_s: "):
        load(config_path=path)


def test_explicit_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert info.value.key is None
    assert str(info.value) == f"cannot read {path}: No such file or directory"


def test_malformed_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match=rf"^invalid TOML in {path}: ") as info:
        load(config_path=path)
    assert info.value.key is None


def test_toml_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_bytes(b'[server]\nhost = "\xff"\n')
    with pytest.raises(ConfigError, match=rf"^invalid TOML in {path}: "):
        load(config_path=path)


def test_config_error_is_a_relayd_error() -> None:
    assert issubclass(ConfigError, RelaydError)


@given(port=st.integers(min_value=-(2**20), max_value=2**20))
def test_any_port_from_env_is_taken_or_blamed_on_env(port: int) -> None:
    environ = {"RELAYD_SERVER__PORT": str(port)}
    if 0 <= port <= 65535:
        assert load(environ=environ).server.port == port
    else:
        with pytest.raises(ConfigError) as info:
            load(environ=environ)
        assert info.value.key == "server.port"
        assert info.value.source == "from environment RELAYD_SERVER__PORT"


# --- the settings object -------------------------------------------------------------------


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.server.port = 1
    with pytest.raises(ValidationError, match="frozen"):
        settings.log = settings.log


def test_settings_as_json_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 1\n[log]\nformat = "console"\n')
    settings = load(config_path=path)
    assert Settings.model_validate_json(settings_as_json(settings)) == settings


# --- the shipped config/relayd.toml --------------------------------------------------------


def test_shipped_config_loads_to_the_defaults() -> None:
    assert load(config_path=SHIPPED_CONFIG) == Settings()


def test_shipped_config_lists_every_setting() -> None:
    shipped = tomllib.loads(SHIPPED_CONFIG.read_text())
    assert sorted(toml_keys(shipped)) == sorted(setting_keys(Settings))


def test_every_shipped_key_is_commented() -> None:
    lines = SHIPPED_CONFIG.read_text().splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[number - 1].startswith("#"), f"no comment above: {line}"


# --- [cluster] -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://redis.internal",
        "rediss://relayd@redis.internal:6380/2",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=3",
    ],
)
def test_cluster_broker_urls_accepted(url: str) -> None:
    settings = load(environ={"RELAYD_CLUSTER__BROKER_URL": url})
    assert settings.cluster.broker_url == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://:hunter2@redis.internal/0", "no password in the URL: put it in password_file"),
        ("redis://relayd:hunter2@redis.internal", "no password in the URL"),
        ("http://redis.internal", "scheme must be redis://, rediss:// or unix://"),
        ("redis:///0", "no host"),
        ("redis://redis.internal:99999", "Port out of range"),
        ("redis://redis.internal/zero", "the database must be a number"),
        ("unix://", "unix:// needs a socket path"),
    ],
)
def test_cluster_bad_broker_url_names_the_key_and_source(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={"RELAYD_CLUSTER__BROKER_URL": url})
    assert info.value.key == "cluster.broker_url"
    assert info.value.source == "from environment RELAYD_CLUSTER__BROKER_URL"
    assert reason in info.value.reason
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("probe_interval_s = 3.0\nprobe_timeout_s = 3.0\n", "probe_timeout_s must be longer"),
        ("probe_interval_s = 6.0\nprobe_timeout_s = 9.0\n", "node_timeout_s must be longer"),
        ('tls_ca_file = "/etc/ca.pem"\n', "tls_ca_file is for rediss:// only"),
        ('node_name = "a b"\n', "String should match pattern"),
    ],
)
def test_cluster_inconsistent_settings_refused(tmp_path: Path, text: str, reason: str) -> None:
    path = write(tmp_path, "[cluster]\nenabled = true\n" + text)
    with pytest.raises(ConfigError, match=reason):
        load(config_path=path)


def test_cluster_off_by_default() -> None:
    assert Settings().cluster.enabled is False
