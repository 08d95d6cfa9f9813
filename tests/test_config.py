"""Tests for relayd.config: sources, precedence, errors, and the shipped relayd.toml.

Every test passes ``environ`` and ``default_path`` explicitly, so neither the machine's
environment nor its /etc/relayd/relayd.toml can leak in.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from relayd import config_sources
from relayd.config import (
    DEFAULT_CONFIG_PATH,
    MAX_REPLY_TIMEOUT_S,
    AdminSettings,
    LimitsSettings,
    Settings,
    settings_as_json,
)
from relayd.config_sources import IgnoredVariable, Loaded
from relayd.errors import ConfigError, RelaydError
from tests.deployments import KUBERNETES_SERVICE_LINKS

SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "config" / "relayd.toml"
NO_FILE = Path("/nonexistent/relayd.toml")


def load(
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    default_path: Path = NO_FILE,
) -> Settings:
    """The settings alone, with an empty environment and no default file unless given."""
    return config_sources.load(
        config_path=config_path,
        environ={} if environ is None else environ,
        overrides=overrides,
        default_path=default_path,
    ).settings


def load_config(
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    default_path: Path = NO_FILE,
) -> Loaded:
    """relayd.config_sources.load, isolated as :func:`load` is."""
    return config_sources.load(
        config_path=config_path,
        environ={} if environ is None else environ,
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


def test_env_text_is_read_as_the_settings_type() -> None:
    settings = load(
        environ={
            "RELAYD_LOG__BODIES": "true",
            "RELAYD_LOG__MESSAGES": "refusals",
            "RELAYD_LIMITS__MESSAGES_PER_SECOND": "2.5",
            "RELAYD_SERVER__HOST": "::1",
        }
    )
    assert settings.log.bodies is True
    assert settings.log.messages == "refusals"
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
    settings = config_sources.load(default_path=NO_FILE).settings
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


def test_a_default_file_that_is_a_link_to_nothing_is_an_error_not_the_defaults(
    tmp_path: Path,
) -> None:
    # /etc/relayd/relayd.toml linked to a config on a volume not mounted: relayd took it
    # for no file and served the built-in defaults, authentication off.
    default = tmp_path / "relayd.toml"
    default.symlink_to(tmp_path / "unmounted" / "relayd.toml")
    with pytest.raises(ConfigError) as info:
        load(default_path=default)
    assert str(info.value) == (
        f"cannot read {default} (the default config file): No such file or directory"
    )


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
    assert info.value.reason == "unknown key; did you mean limits.max_connections?"
    assert str(info.value) == (
        f"limits.max_conections: unknown key; did you mean limits.max_connections? (in {path})"
    )


def test_unknown_key_far_from_any_setting_gets_no_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nbananas = 5\n")
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert str(info.value) == f"limits.bananas: unknown key (in {path})"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        # One problem for a whole section, called one, with the section it most likely is.
        (
            "[limit]\nmax_connections = 5\nbananas = 1\n",
            "limit: unknown section; did you mean [limits]?",
        ),
        ("[clustre]\ntoken = 'x'\n", "clustre: unknown section; did you mean [cluster]?"),
        ("limt.max_connections = 5\n", "limt: unknown section; did you mean [limits]?"),
        ("[bananas]\nx = 1\n", "bananas: unknown section"),
        ("[limits.extra]\nx = 1\n", "limits.extra: unknown key"),
        # A key without its section: the setting of that name (the public listener's).
        ("port = 9030\n", "port: unknown key; did you mean server.port?"),
        (
            "max_connections = 5\n",
            "max_connections: unknown key; did you mean limits.max_connections?",
        ),
    ],
)
def test_unknown_toml_section_or_top_level_key(tmp_path: Path, text: str, line: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert str(info.value) == f"{line} (in {path})"


def test_section_given_a_value(tmp_path: Path) -> None:
    path = write(tmp_path, "server = 5\n")
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert str(info.value) == f"server: is a section, not a setting (in {path})"


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("RELAYD_LIMITS__MAX_CONECTIONS", "RELAYD_LIMITS__MAX_CONNECTIONS"),
        ("RELAYD_LIMITS_MAX_CONNECTIONS", "RELAYD_LIMITS__MAX_CONNECTIONS"),
        ("RELAYD_SERVER__PORT__X", "RELAYD_SERVER__PORT"),
        # The section left out: the setting of that name, the public listener's first.
        ("RELAYD_PORT", "RELAYD_SERVER__PORT"),
        ("RELAYD_HOST", "RELAYD_SERVER__HOST"),
        ("RELAYD_MAX_CONNECTIONS", "RELAYD_LIMITS__MAX_CONNECTIONS"),
        ("RELAYD_FOO", None),
        ("RELAYD_LOG", None),  # a section, not a setting
    ],
)
def test_unknown_env_var_is_ignored_and_reported(name: str, suggestion: str | None) -> None:
    loaded = load_config(environ={name: "5", "RELAYD_LIMITS__MESSAGE_BURST": "7"})
    assert loaded.ignored == (IgnoredVariable(name, suggestion),)
    assert loaded.settings.limits.message_burst == 7  # the rest still applies


@pytest.mark.parametrize(
    ("name", "value"),
    [
        *KUBERNETES_SERVICE_LINKS.items(),
        # A named port, a Service named relayd-admin, IPv6, UDP.
        ("RELAYD_SERVICE_PORT_WS", "9030"),
        ("RELAYD_ADMIN_SERVICE_HOST", "10.0.0.9"),
        ("RELAYD_ADMIN_PORT", "tcp://10.0.0.9:9031"),
        ("RELAYD_ADMIN_PORT_9031_TCP_ADDR", "fd00::9"),
        ("RELAYD_PORT_9030_UDP", "udp://[fd00::1]:9030"),
    ],
)
def test_kubernetes_service_links_are_ignored_without_a_warning(name: str, value: str) -> None:
    loaded = load_config(environ={name: value})
    assert loaded.ignored == ()
    assert loaded.settings == Settings()


@pytest.mark.parametrize(
    ("name", "value", "suggestion"),
    [
        # One underscore short: a link to a Service named relayd-server would be tcp://...
        ("RELAYD_SERVER_PORT", "8080", "RELAYD_SERVER__PORT"),
        ("RELAYD_ADMIN_PORT", "9100", "RELAYD_ADMIN__PORT"),
        ("RELAYD_SERVICE_PORT", "http", "RELAYD_SERVER__PORT"),
    ],
)
def test_a_typo_shaped_like_a_service_link_is_still_warned_about(
    name: str, value: str, suggestion: str | None
) -> None:
    assert load_config(environ={name: value}).ignored == (IgnoredVariable(name, suggestion),)


def test_a_kubernetes_pod_environment_starts_with_the_defaults() -> None:
    environ = {**KUBERNETES_SERVICE_LINKS, "KUBERNETES_SERVICE_HOST": "10.0.0.2"}
    assert load_config(environ=environ) == Loaded(Settings(), None, ())


@pytest.mark.parametrize("name", ["RELAYD_SERVER__PORT", "PORT", "RELAYD_LOG__LEVEL"])
def test_an_empty_variable_is_unset(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, '[server]\nport = 8000\n[log]\nlevel = "debug"\n')
    settings = load(config_path=path, environ={name: ""})
    assert (settings.server.port, settings.log.level) == (8000, "debug")


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError) as info:
        load(overrides={"server.prot": 1})
    assert (
        str(info.value) == "server.prot: unknown key; did you mean server.port? (from command line)"
    )


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
    assert str(info.value) == f"cannot read {path} (from command line): No such file or directory"


def test_malformed_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match=rf"^invalid TOML in {path}: ") as info:
        load(config_path=path)
    assert info.value.key is None


def test_toml_that_is_not_utf8_is_refused_where_it_is_not(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_bytes(b'[server]\nhost = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert str(info.value) == (
        f"invalid TOML in {path}: not UTF-8: byte 0xff (at line 2, column 9)"
    )


@pytest.mark.parametrize("key", ["server.host", "admin.host"])
@pytest.mark.parametrize("host", ["999.1.1.1", " 127.0.0.1", "[::1]", "a..b", "-relay", "x y"])
def test_a_host_that_is_no_address_or_name_is_a_config_error(key: str, host: str) -> None:
    # It passed check-config, and serve then failed to listen (exit 1, a hint about ports
    # in use), so systemd restarted it over and over.
    variable = "RELAYD_" + key.upper().replace(".", "__")
    with pytest.raises(ConfigError) as info:
        load(environ={variable: host})
    assert info.value.key == key
    assert "not an IP address or a host name" in str(info.value)


@pytest.mark.parametrize(
    "host",
    [
        *("", "::", "::1", "0.0.0.0", "10.1.2.3", "localhost", "relay-1.example.com.", "a_b"),
        # What the resolver takes too: short IPv4 forms, names in any script, digits last.
        *("0", "127.1", "münchen.example", "host.123"),
    ],
)
def test_addresses_and_names_are_hosts(host: str) -> None:
    assert load(environ={"RELAYD_SERVER__HOST": host}).server.host == host


def test_a_byte_order_mark_is_no_statement(tmp_path: Path) -> None:
    # Some Windows editors save UTF-8 with one; tomllib read it as an invalid statement.
    path = tmp_path / "relayd.toml"
    path.write_bytes(b"\xef\xbb\xbf[server]\nport = 7000\n")
    assert load(config_path=path).server.port == 7000
    # And a bad byte after one is named where it is, not three bytes off.
    path.write_bytes(b'\xef\xbb\xbf[server]\nhost = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert str(info.value).endswith("not UTF-8: byte 0xff (at line 2, column 9)")


def test_toml_nested_too_deeply_is_a_config_error(tmp_path: Path) -> None:
    # tomllib recurses per nested array: a RecursionError escaped as a traceback (exit 1,
    # which systemd's RestartPreventExitStatus=78 does not stop).
    path = write(tmp_path, "[server]\nallowed_origins = " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert str(info.value) == f"invalid TOML in {path}: nested too deeply"


def test_json_nested_too_deeply_in_a_variable_is_a_config_error() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ConfigError) as info:
        load(environ={"RELAYD_SERVER__ALLOWED_ORIGINS": deep})
    assert info.value.key == "server.allowed_origins"
    assert "nested too deeply" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[log]\nbodies = "yes"\n', "log.bodies", "Input should be a valid boolean"),
        ("[log]\nbodies = 1\n", "log.bodies", "Input should be a valid boolean"),
        ("[log]\nmessages = 1\n", "log.messages", "Input should be 'all', 'refusals'"),
        ("[limits]\nmax_connections = 5.0\n", "limits.max_connections", "valid integer"),
        ('[limits]\nmax_connections = "5"\n', "limits.max_connections", "valid integer"),
        ("[server]\nhost = 1\n", "server.host", "Input should be a valid string"),
        ('[server]\nallowed_origins = "https://a.example"\n', "server.allowed_origins", "array"),
        ("[server]\nhost = 1979-05-27\n", "server.host", "TOML date or time"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_coerced(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert info.value.key == key
    assert reason in info.value.reason
    assert info.value.source == f"in {path}"


def test_an_integer_is_a_float() -> None:
    path_free = load(overrides={"limits.messages_per_second": 5})
    assert path_free.limits.messages_per_second == 5.0


@pytest.mark.parametrize(
    ("name", "text", "key"),
    [
        ("RELAYD_LOG__BODIES", "yes", "log.bodies"),
        ("RELAYD_LOG__BODIES", "1", "log.bodies"),
        ("RELAYD_LOG__MESSAGES", "1", "log.messages"),
        ("RELAYD_LIMITS__MAX_CONNECTIONS", "5.0", "limits.max_connections"),
        ("RELAYD_LIMITS__MAX_CONNECTIONS", "lots", "limits.max_connections"),
        ("PORT", "9030.0", "server.port"),
    ],
)
def test_environment_text_of_the_wrong_type_is_refused(name: str, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={name: text})
    assert info.value.key == key
    assert info.value.source == f"from environment {name}"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("RELAYD_SERVER__ALLOWED_ORIGINS", "https://a.example"),
        ("RELAYD_AUTH__TOKENS", "alice=x"),
    ],
)
def test_a_list_or_table_variable_that_is_not_json_is_one_problem(name: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={name: text})
    [problem] = info.value.problems
    assert problem.reason.startswith("expected JSON (")
    assert problem.source == f"from environment {name}"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\nprot = 1\n[limits]\nmax_connections = 0\n[log]\nbodies = "yes"\n',
    )
    with pytest.raises(ConfigError) as info:
        load(config_path=path, environ={"RELAYD_LIMITS__IDLE_TIMEOUT_S": "-1"})
    lines = str(info.value).splitlines()
    assert lines == [problem.line for problem in info.value.problems]
    assert sorted(lines) == sorted(
        [
            f"server.prot: unknown key; did you mean server.port? (in {path})",
            f"limits.max_connections: Input should be greater than 0 (in {path})",
            "limits.idle_timeout_s: Input should be greater than or equal to 0 "
            "(from environment RELAYD_LIMITS__IDLE_TIMEOUT_S)",
            f"log.bodies: Input should be a valid boolean (in {path})",
        ]
    )
    # The error's own fields are the first problem's.
    first = info.value.problems[0]
    assert (info.value.key, info.value.source, info.value.reason) == (
        first.key,
        first.source,
        first.reason,
    )


# --- which file ----------------------------------------------------------------------------


def test_the_file_read_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(config_path=path).path == path
    assert load_config(default_path=path).path == path
    assert load_config(default_path=tmp_path / "absent.toml").path is None


def test_relayd_config_names_the_file(tmp_path: Path) -> None:
    named = write(tmp_path, "[server]\nport = 7001\n", name="named.toml")
    default = write(tmp_path, "[server]\nport = 7002\n", name="default.toml")
    loaded = load_config(environ={"RELAYD_CONFIG": str(named)}, default_path=default)
    assert (loaded.path, loaded.settings.server.port, loaded.ignored) == (named, 7001, ())


def test_config_flag_beats_relayd_config(tmp_path: Path) -> None:
    named = write(tmp_path, "[server]\nport = 7001\n", name="named.toml")
    given_path = write(tmp_path, "[server]\nport = 7003\n", name="given.toml")
    loaded = load_config(config_path=given_path, environ={"RELAYD_CONFIG": str(named)})
    assert (loaded.path, loaded.settings.server.port) == (given_path, 7003)


def test_relayd_config_naming_a_missing_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(environ={"RELAYD_CONFIG": str(missing)})
    assert str(info.value) == (
        f"cannot read {missing} (from environment RELAYD_CONFIG): No such file or directory"
    )


def test_a_failed_load_still_says_which_file_and_which_variables(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_connections = 0\n")
    with pytest.raises(config_sources.LoadError) as info:
        load_config(config_path=path, environ={"RELAYD_PORT": "9040"})
    assert (info.value.path, info.value.ignored) == (
        path,
        (IgnoredVariable("RELAYD_PORT", "RELAYD_SERVER__PORT"),),
    )
    assert str(info.value) == f"limits.max_connections: Input should be greater than 0 (in {path})"


def test_each_setting_says_where_its_value_came_from(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[auth]\nmode = "token"\n[tls]\ncert_file = "c.pem"\nkey_file = "k.pem"\n'
    )
    loaded = config_sources.load(
        config_path=path,
        environ={"RELAYD_AUTH__TOKENS_FILE": "/t"},
        overrides={"admin.port": 0},
        default_path=NO_FILE,
    )
    assert loaded.source("auth.mode") == loaded.source("tls.cert_file") == f"in {path}"
    assert loaded.source("auth.tokens_file") == "from environment RELAYD_AUTH__TOKENS_FILE"
    assert loaded.source("admin.port") == "from command line"
    assert loaded.source("admin.api_key_file") == "from built-in defaults"


def test_empty_relayd_config_is_unset(tmp_path: Path) -> None:
    default = write(tmp_path, "[server]\nport = 7002\n")
    loaded = load_config(environ={"RELAYD_CONFIG": ""}, default_path=default)
    assert (loaded.path, loaded.settings.server.port) == (default, 7002)


# --- settings that conflict ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_host", "admin_host"),
    [
        ("", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.1", "0.0.0.0"),
        ("::1", "::"),
        # localhost binds both loopback addresses; an address may be written two ways.
        ("localhost", "127.0.0.1"),
        ("::1", "localhost"),
        ("::0001", "::1"),
        ("LocalHost", "localhost"),
    ],
)
def test_the_admin_listener_cannot_take_the_public_address(
    tmp_path: Path, server_host: str, admin_host: str
) -> None:
    path = write(tmp_path, f'[server]\nhost = "{server_host}"\n[admin]\nhost = "{admin_host}"\n')
    with pytest.raises(ConfigError) as info:
        load(config_path=path, overrides={"admin.port": 9030})
    assert info.value.key == "admin.port"
    assert info.value.source == "from command line"
    assert "--admin-port" in info.value.reason


def test_the_admin_listener_may_share_a_port_on_another_address() -> None:
    settings = load(
        overrides={
            "server.host": "127.0.0.2",
            "admin.host": "127.0.0.1",
            "admin.port": 9030,
        }
    )
    assert settings.admin.port == settings.server.port == 9030


def test_a_disabled_admin_listener_conflicts_with_nothing() -> None:
    settings = load(environ={"RELAYD_ADMIN__ENABLED": "false", "RELAYD_ADMIN__PORT": "9030"})
    assert settings.admin.port == 9030


def test_config_error_is_a_relayd_error() -> None:
    assert issubclass(ConfigError, RelaydError)


@given(port=st.integers(min_value=-(2**20), max_value=2**20))
def test_any_port_from_env_is_taken_or_blamed_on_env(port: int) -> None:
    environ = {"RELAYD_SERVER__PORT": str(port)}
    if port == AdminSettings().port:  # the admin listener's: a conflict, blamed on both
        with pytest.raises(ConfigError) as info:
            load(environ=environ)
        assert info.value.key == "admin.port"
        assert "from environment RELAYD_SERVER__PORT" in info.value.reason
    elif 0 <= port <= 65535:
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


def comments_above(lines: list[str], number: int) -> str:
    """The comment lines just above line ``number``, joined."""
    start = number
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    return " ".join(line.lstrip("# ") for line in lines[start:number])


def bounds(field: FieldInfo) -> dict[str, float]:
    """A numeric setting's bounds, by kind: ``ge``, ``gt``, ``le``, ``lt``."""
    found: dict[str, float] = {}
    for constraint in field.metadata:
        for kind in ("ge", "gt", "le", "lt"):
            if isinstance(value := getattr(constraint, kind, None), int | float):
                found[kind] = value
    return found


@pytest.mark.parametrize("section", ["limits", "cluster"])
def test_the_shipped_comments_state_every_bound_other_than_over_0(section: str) -> None:
    # [limits] says "every number must be > 0 unless it says 0 turns it off", [cluster]
    # "every number must be > 0": a key whose bound is another says which, in its comment.
    lines = SHIPPED_CONFIG.read_text().splitlines()
    model = getattr(Settings(), section)
    checked = 0
    for name, field in type(model).model_fields.items():
        found = bounds(field)
        if field.annotation not in (int, float) or not found:
            continue
        number = lines.index(f"{name} = {getattr(model, name)!r}".replace("'", '"'))
        comment = comments_above(lines, number)
        low = found.get("ge")
        if low == 0:
            assert "0 turns" in comment, name
        elif low is not None:
            assert f"At least {low:g}" in comment, name
        else:
            assert found.get("gt") == 0, name
        if "le" in found:
            assert f"At most {found['le']:g}" in comment, name
        checked += 1
    assert checked >= 6


def test_security_md_states_each_limits_default_and_bound() -> None:
    # docs/security.md's table of [limits]: the default column says the default, "(0 = off)"
    # where 0 turns a limit off, "(>= N)" for a floor other than "> 0".
    text = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", text, re.MULTILINE))
    limits = LimitsSettings()
    for name, field in LimitsSettings.model_fields.items():
        cell = rows[name].strip()
        default, _space, note = cell.partition(" ")
        assert float(default) == getattr(limits, name), name
        low = bounds(field).get("ge")
        expected = "" if low is None else "(0 = off)" if low == 0 else f"(\u2265 {low:g})"
        assert note == expected, name


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


def test_the_node_name_the_units_give_fits_a_host_name_of_any_length() -> None:
    # relayd@.service sets RELAYD_CLUSTER__NODE_NAME=%H-%i, and a host name may have 64
    # characters: a name over 64 stopped every node with 78 on such a host.
    name = "n" * 64 + "-65535"
    assert load(environ={"RELAYD_CLUSTER__NODE_NAME": name}).cluster.node_name == name
    with pytest.raises(ConfigError, match="String should match pattern"):
        load(environ={"RELAYD_CLUSTER__NODE_NAME": "n" * 129})


def test_cluster_reply_timeout_is_bounded(tmp_path: Path) -> None:
    """A server API call holds an admin connection for about 5 + reply_timeout_s + 2 s."""
    limit = load(environ={"RELAYD_CLUSTER__REPLY_TIMEOUT_S": "30"})
    assert limit.cluster.reply_timeout_s == MAX_REPLY_TIMEOUT_S == 30.0
    path = write(tmp_path, "[cluster]\nenabled = true\nreply_timeout_s = 30.5\n")
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert str(info.value) == (
        f"cluster.reply_timeout_s: Input should be less than or equal to 30 (in {path})"
    )


def test_a_cluster_grace_too_short_for_the_answers_a_drain_waits_for_is_refused(
    tmp_path: Path,
) -> None:
    # A drain waits up to reply_timeout_s for other nodes and answers the server API
    # calls in progress (up to reply_timeout_s + 2 s): a shorter grace cut them, and the
    # rule was only a comment in config/relayd.toml.
    path = write(tmp_path, "[server]\nshutdown_grace_s = 4.0\n[cluster]\nenabled = true\n")
    with pytest.raises(ConfigError) as info:
        load(config_path=path)
    assert info.value.key == "server.shutdown_grace_s"
    assert info.value.source == f"in {path}"
    # Both values named: the grace's, and the reply_timeout_s's with its source.
    assert info.value.reason.startswith(
        "is 4 s, must be more than cluster.reply_timeout_s + 2 s (2 s, from built-in defaults)"
    )
    # Longer than that, or not a cluster node: fine.
    assert load(config_path=path, environ={"RELAYD_SERVER__SHUTDOWN_GRACE_S": "4.5"})
    assert load(config_path=path, environ={"RELAYD_CLUSTER__ENABLED": "false"})


def test_cluster_off_by_default() -> None:
    assert Settings().cluster.enabled is False


@pytest.mark.parametrize("host", ["", "0.0.0.0", "::", "10.0.0.5", "relayd.example"])
def test_an_admin_listener_off_loopback_needs_an_api_key(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={"RELAYD_ADMIN__HOST": host} if host else {}, overrides={"admin.host": host})
    assert info.value.key == "admin.api_key_file"
    assert info.value.source == "from command line"
    assert "loopback" in info.value.reason


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_an_admin_listener_on_loopback_needs_no_key(host: str) -> None:
    assert load(overrides={"admin.host": host}).admin.api_key_file == ""


def test_an_api_key_opens_any_address_to_the_admin_listener() -> None:
    settings = load(overrides={"admin.host": "10.0.0.5", "admin.api_key_file": "/etc/k"})
    assert settings.admin.host == "10.0.0.5"
