"""Where relayd's settings come from, and what is wrong with them (DESIGN §3).

What owns what:

- :mod:`relayd.config` owns the keys, their types, defaults and bounds.
- :func:`load` owns the sources and their precedence, later wins::

      built-in defaults < TOML file < environment < command-line overrides

  The file is ``config_path`` (``--config``), else the one ``RELAYD_CONFIG`` names, else
  ``default_path`` when that exists, else none. The environment is
  ``RELAYD_<SECTION>__<KEY>`` (the key part matched case-insensitively) and plain ``PORT``,
  which the seed's Node server honoured; ``RELAYD_SERVER__PORT`` beats ``PORT``. A variable
  set to the empty string counts as unset, as in most daemons' (and Centrifugo's) reading.
- :class:`~relayd.errors.ConfigError` owns the operator's message: one line per problem,
  naming the dotted key and the source its value came from, with the nearest key for a
  typo. Every problem is found in one pass, so ``check-config`` shows them all at once.

Unknown keys in a file or on the command line are errors. Unknown ``RELAYD_*`` variables are
not: orchestrators inject variables of their own under a service's name, so they are
returned as :class:`IgnoredVariable` for the caller to warn about. Kubernetes' service links
for a Service named ``relayd`` (``RELAYD_PORT=tcp://10.0.0.1:9030``,
``RELAYD_SERVICE_HOST``, ``RELAYD_PORT_9030_TCP_ADDR``...) are recognised and ignored
without a warning: every pod of such a deployment has them.

Types are strict: a value of the wrong type is refused, never coerced (``messages = "yes"``
for a bool, ``max_connections = 5.0`` for an integer). Environment variables are text, so
each is read as its setting's type first: text settings take the text as it is, lists and
tables take JSON, numbers and booleans take a JSON number or ``true``/``false``.

Why the sources are merged here and not by pydantic-settings' own sources: once merged, a
``ValidationError`` no longer says which source a value came from, and its environment
source ignores unknown variables silently. Each value is recorded with its source under its
dotted key; each section is then validated strictly (pydantic's strict JSON mode), and every
error is blamed on the source recorded for its key.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import ipaddress
import json
import os
import stat
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ValidationError

from relayd.config import DEFAULT_CONFIG_PATH, Settings, grace_too_short
from relayd.config_keys import (
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    SECTIONS,
    TYPES,
    is_section,
    is_service_link,
    is_structured,
    is_text,
    nearest_key,
    unknown,
    variable_of,
)
from relayd.errors import ConfigError

__all__ = ["CONFIG_VARIABLE", "IgnoredVariable", "LoadError", "Loaded", "load"]

#: The environment variable naming the config file, when ``--config`` is not given.
CONFIG_VARIABLE: Final = "RELAYD_CONFIG"

_DEFAULTS_SOURCE: Final = "from built-in defaults"


@dataclasses.dataclass(frozen=True, slots=True)
class IgnoredVariable:
    """A ``RELAYD_*`` environment variable that names no setting.

    Attributes:
        name: the variable.
        suggestion: the setting's variable it is closest to, if any is close.
    """

    name: str
    suggestion: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Loaded:
    """The effective settings and what the operator should know about how they were read.

    Attributes:
        settings: the frozen, validated settings.
        path: the file read, or None when none was.
        ignored: unknown ``RELAYD_*`` variables, to warn about.
        sources: where each setting a source gave came from, by dotted key, as an error
            names it (``in PATH``, ``from environment NAME``, ``from command line``); see
            :meth:`source`.
    """

    settings: Settings
    path: Path | None
    ignored: tuple[IgnoredVariable, ...] = ()
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    def source(self, key: str) -> str:
        """Where ``key``'s value came from, for an error about what it names (a file...)."""
        return self.sources.get(key, _DEFAULTS_SOURCE)


class LoadError(ConfigError):
    """Bad settings, and how they were read: what ``check-config`` reports beside the problems.

    A :class:`~relayd.errors.ConfigError` of every problem found (its attributes are the
    first one's), with the two things :class:`Loaded` would have said.

    Attributes:
        path: the file read or tried, or None when none was.
        ignored: unknown ``RELAYD_*`` variables, to warn about.
    """

    def __init__(
        self,
        problems: Sequence[ConfigError],
        *,
        path: Path | None,
        ignored: Sequence[IgnoredVariable],
    ) -> None:
        first = problems[0]
        super().__init__(first.reason, source=first.source, key=first.key, problems=problems)
        self.path = path
        self.ignored = tuple(ignored)


# -- gathering the values ----------------------------------------------------------------------

# Dotted key -> (value, source phrase). Sources are applied in precedence order, so a later one
# simply overwrites an earlier one's entry.
_Values = dict[str, tuple[object, str]]


class _Gathering:
    """The values read so far, each with its source, and every problem met on the way."""

    def __init__(self) -> None:
        self.values: _Values = {}
        self.problems: list[ConfigError] = []

    def problem(self, reason: str, *, source: str, key: str | None = None) -> None:
        self.problems.append(ConfigError(reason, source=source, key=key))

    def set(self, key: str, value: object, source: str) -> None:
        """Record ``value`` for ``key``, or a problem when ``key`` names no setting."""
        if key in SECTIONS or key not in TYPES:
            self.problem(unknown(key, value), key=key, source=source)
        else:
            self.values[key] = (value, source)

    def read_file(self, path: Path, named_by: str | None, *, reloading: bool = False) -> None:
        """Record the settings in the TOML file ``path``; ``named_by``: the source naming it.

        At a reload (``reloading``) a pipe is a problem, not read: one the start
        read, as ``--config <(...)`` gives, has nothing left, and the built-in
        defaults would undo every setting it held (authentication among them); a
        named pipe would hold the reload, and every client with it, until a writer
        came. An empty file, or ``/dev/null``, is a file of no settings.
        """
        source = f"in {path}"
        if reloading and _is_pipe(path):
            self.problem(
                f"{path} is a pipe, which relayd reads only at its start (a pipe read"
                " once has nothing left; a reload would wait for a named pipe's writer):"
                " give relayd a file to reload",
                source=source,
            )
            return
        try:
            raw = path.read_bytes()
        except OSError as error:
            named = "" if named_by is None else f" ({named_by})"
            self.problem(f"cannot read {path}{named}: {error.strerror or error}", source=source)
            return
        # A byte-order mark, as some Windows editors save one, is no statement.
        text = raw.removeprefix(codecs.BOM_UTF8)
        try:
            table = tomllib.loads(text.decode())
        except UnicodeDecodeError as error:
            line = text.count(b"\n", 0, error.start) + 1
            column = error.start - (text.rfind(b"\n", 0, error.start) + 1) + 1
            self.problem(
                f"invalid TOML in {path}: not UTF-8: byte 0x{text[error.start]:02x}"
                f" (at line {line}, column {column})",
                source=source,
            )
            return
        except tomllib.TOMLDecodeError as error:
            self.problem(f"invalid TOML in {path}: {error}", source=source)
            return
        except RecursionError:  # tomllib's parser recurses once per nested array or table
            self.problem(f"invalid TOML in {path}: nested too deeply", source=source)
            return
        for key, value in _flatten(table):
            if isinstance(value, datetime.date | datetime.time):
                # JSON, in which the sections are validated, has no dates; no setting is one.
                self.problem("a TOML date or time is no setting's type", key=key, source=source)
            else:
                self.set(key, value, source)

    def read_environment(self, env: Mapping[str, str]) -> list[IgnoredVariable]:
        """Record the settings ``env`` holds; return the ``RELAYD_*`` names that are none."""
        ignored = []
        if env.get("PORT"):
            self._set_variable("server.port", env["PORT"], "PORT")
        for name, text in sorted(env.items()):
            if not name.startswith(ENV_PREFIX) or name == CONFIG_VARIABLE or not text:
                continue
            key = name.removeprefix(ENV_PREFIX).lower().replace(ENV_NESTED_DELIMITER, ".")
            if key in TYPES and key not in SECTIONS:
                self._set_variable(key, text, name)
            elif not is_service_link(name, text):
                nearest = nearest_key(key)
                ignored.append(IgnoredVariable(name, nearest and variable_of(nearest)))
        return ignored

    def _set_variable(self, key: str, text: str, name: str) -> None:
        """Record the variable ``name``'s text as a value of ``key``'s type, checked later.

        A list or table that is not JSON is one problem, recorded here; its text is not
        recorded, so that the type check does not report the same key a second time.
        """
        annotation, source = TYPES[key], f"from environment {name}"
        value: object = text
        if not is_text(annotation):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                if is_structured(annotation):
                    self.problem(f"expected JSON ({error.msg})", key=key, source=source)
                    return
                # not a number or true/false: refused with the type's own message
            except RecursionError:  # the decoder recurses once per nested list or object
                self.problem("expected JSON (nested too deeply)", key=key, source=source)
                return
        self.set(key, value, source)


def _flatten(table: Mapping[str, object], prefix: str = "") -> Iterator[tuple[str, object]]:
    """Yield ``(dotted key, value)`` for a parsed TOML document, descending into sections."""
    for name, value in table.items():
        key = prefix + name
        if key in SECTIONS and isinstance(value, Mapping):
            yield from _flatten(value, key + ".")
        else:
            yield key, value


# -- validating them ---------------------------------------------------------------------------


def _source_of(values: _Values, location: tuple[int | str, ...]) -> tuple[str, str]:
    """``(dotted key, source)`` to blame for an error at ``location``.

    The longest recorded key the location starts with (``auth.tokens`` for an error in
    ``auth.tokens.alice``); for an error about a whole section, any of its recorded keys.
    """
    parts = [str(part) for part in location]
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in values:
            return ".".join(parts), values[key][1]
    prefix = ".".join(parts) + "."
    for key, (_value, source) in values.items():
        if key.startswith(prefix):
            return ".".join(parts), source
    return ".".join(parts), _DEFAULTS_SOURCE


def _validate(values: _Values, problems: list[ConfigError]) -> Settings | None:
    """Validate each section strictly; None (and problems added) when any value is bad."""
    tree: dict[str, dict[str, object]] = {}
    for key, (value, _source) in values.items():
        section, name = key.split(".", 1)
        tree.setdefault(section, {})[name] = value
    sections: dict[str, BaseModel] = {}
    for section, model in Settings.model_fields.items():
        annotation = model.annotation
        assert is_section(annotation)
        try:
            sections[section] = annotation.model_validate_json(
                json.dumps(tree.get(section, {})), strict=True
            )
        except ValidationError as error:
            for detail in error.errors(include_url=False):
                key, source = _source_of(values, (section, *detail["loc"]))
                problems.append(ConfigError(_reason(detail["msg"]), key=key, source=source))
    if problems:
        return None
    return Settings.model_validate(sections)


def _reason(message: str) -> str:
    # Model validators' messages come as "Value error, <ours>".
    return message.removeprefix("Value error, ")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "" (every interface) or a name
        return False


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _addresses(host: str) -> frozenset[str]:
    """The addresses a listener on ``host`` binds, as far as can be told without DNS.

    ``localhost`` binds both loopback addresses (``trio.open_tcp_listeners`` binds each
    address the name resolves to); an address is written one way (``::0001`` is ``::1``);
    any other name stands for itself.
    """
    if host.lower() == "localhost":
        return frozenset({"127.0.0.1", "::1"})
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        return frozenset({host.lower()})


def _overlap(one: str, other: str) -> bool:
    """Whether listeners on hosts ``one`` and ``other`` would bind an address in common."""
    return _wildcard(one) or _wildcard(other) or bool(_addresses(one) & _addresses(other))


def _conflicts(settings: Settings, values: _Values) -> list[ConfigError]:
    """What no single setting is wrong about, but the settings together are."""
    problems = []
    server, admin = settings.server, settings.admin
    if admin.enabled and admin.port == server.port != 0 and _overlap(admin.host, server.host):
        _key, source = _source_of(values, ("admin", "port"))
        _key, server_source = _source_of(values, ("server", "port"))
        problems.append(
            ConfigError(
                f"the public listener has port {server.port} too (server.port, {server_source}); "
                "choose another admin.port (--admin-port)",
                key="admin.port",
                source=source,
            )
        )
    cluster = settings.cluster
    if cluster.enabled:
        _key, reply_source = _source_of(values, ("cluster", "reply_timeout_s"))
        reason = grace_too_short(server.shutdown_grace_s, cluster.reply_timeout_s, reply_source)
        if reason is not None:
            _key, source = _source_of(values, ("server", "shutdown_grace_s"))
            problems.append(ConfigError(reason, key="server.shutdown_grace_s", source=source))
    if admin.enabled and not admin.api_key_file and not _loopback(admin.host):
        _key, source = _source_of(values, ("admin", "host"))
        problems.append(
            ConfigError(
                "the admin listener is not on loopback, so the server API needs a key: "
                "set admin.api_key_file (docs/api.md)",
                key="admin.api_key_file",
                source=source,
            )
        )
    return problems


# -- the whole ---------------------------------------------------------------------------------


def _named(path: Path) -> bool:
    """Whether anything is at ``path``, or may be: all but "no such file" counts as there.

    ``Path.exists`` raises for a file in a directory relayd may not search
    (``/etc/relayd`` is ``root:relayd 0750``: an operator's ``relayd check-config``
    without sudo), which ended relayd blaming systemd's sockets, and says no for a
    link to nothing, in whose place relayd served the built-in defaults, authentication
    off. Such a file is read instead, and the error names it.
    """
    try:
        path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def _is_pipe(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(path.stat().st_mode)
    except OSError:
        return False


def load(
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    default_path: Path | None = DEFAULT_CONFIG_PATH,
    reloading: bool = False,
) -> Loaded:
    """Build the effective settings from every source, later wins.

    Args:
        config_path: the TOML file given with ``--config``; it must exist. None reads the
            file ``RELAYD_CONFIG`` names (which must exist too), else ``default_path`` when
            it exists (or may: one relayd may not look at, or a link to nothing, is read,
            and its error names it), else no file.
        environ: the environment; None reads :data:`os.environ`.
        overrides: command-line flags as dotted keys, e.g. ``{"server.port": 0}``. A None
            value means the flag was not given and is skipped.
        default_path: the file read when neither ``config_path`` nor ``RELAYD_CONFIG`` names
            one (if it exists); None: no such file.
        reloading: a reload, which must read again the file the start read: pass that
            file as ``default_path`` (None if it read none), and it must exist now,
            whoever named it. Built-in defaults in place of a default file that went
            away would undo every setting in it; so would those of a pipe read at the
            start (``--config <(...)``), which is empty at a reload: a pipe is a
            problem at a reload.

    Returns:
        The settings, the file read, and the unknown ``RELAYD_*`` variables.

    Raises:
        LoadError: every problem found: a file that cannot be read or parsed, keys that
            name no setting, values of the wrong type or out of bounds, settings that
            conflict. Each line names the key and the source of its value. The error
            also says which file was read and which variables were ignored.
    """
    env = os.environ if environ is None else environ
    gathering = _Gathering()
    path, named_by = config_path, None if config_path is None else "from command line"
    if path is None and env.get(CONFIG_VARIABLE):
        path, named_by = Path(env[CONFIG_VARIABLE]), f"from environment {CONFIG_VARIABLE}"
    if path is None and default_path is not None and (reloading or _named(default_path)):
        path, named_by = default_path, "the default config file"
    if path is not None:
        gathering.read_file(path, named_by, reloading=reloading)
    ignored = gathering.read_environment(env)
    for key, value in (overrides or {}).items():
        if value is not None:
            gathering.set(key, value, "from command line")

    problems = gathering.problems
    settings = _validate(gathering.values, problems)
    if settings is not None:
        problems.extend(_conflicts(settings, gathering.values))
    if problems:
        raise LoadError(problems, path=path, ignored=ignored)
    assert settings is not None
    sources = {key: source for key, (_value, source) in gathering.values.items()}
    return Loaded(settings, path, tuple(ignored), sources)
