"""The names of relayd's settings: dotted keys, their types, their variables.

:mod:`relayd.config` owns the settings; this module lists them as dotted keys
(``server.port``) with their types, names each one's environment variable
(``RELAYD_SERVER__PORT``), says how a variable's text is read for a type, and
finds the key a typo most likely meant. :mod:`relayd.config_sources` reads the
sources with it. It also recognises the variables Kubernetes injects for a
Service named ``relayd``, which name no setting and are no operator's typo.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final, Literal, TypeGuard, get_args, get_origin

from pydantic import BaseModel, SecretStr

from relayd.config import Settings

__all__ = [
    "ENV_NESTED_DELIMITER",
    "ENV_PREFIX",
    "SECTIONS",
    "TYPES",
    "is_section",
    "is_service_link",
    "is_structured",
    "is_text",
    "nearest_key",
    "unknown",
    "variable_of",
]

#: Every setting's variable starts with this; its sections are joined by
#: :data:`ENV_NESTED_DELIMITER`: ``RELAYD_SERVER__PORT``.
ENV_PREFIX: Final = "RELAYD_"
#: The delimiter of sections in a variable's name.
ENV_NESTED_DELIMITER: Final = "__"

# The variables Kubernetes injects for a Service named relayd (or relayd-<anything>), per
# "Discovering services: environment variables" in its documentation, each with the shape
# of its value: {SVC}_SERVICE_HOST, {SVC}_SERVICE_PORT[_{PORTNAME}], {SVC}_PORT and
# {SVC}_PORT_{port}_{PROTO}[_PROTO|_PORT|_ADDR]. The value is checked too, so that an
# operator's RELAYD_SERVER_PORT=8080 (one underscore short) is warned about, not taken for
# a link to a Service named relayd-server, whose RELAYD_SERVER_PORT would be tcp://...
_SVC: Final = r"RELAYD(?:_[A-Z0-9_]+?)?"
_LINK: Final = rf"{_SVC}_PORT_[0-9]+_(?:TCP|UDP|SCTP)"
_ADDRESS: Final = r"[0-9A-Fa-f.:]+"
_NUMBER: Final = r"[0-9]+"
_SERVICE_LINKS: Final = tuple(
    (re.compile(name), re.compile(value))
    for name, value in [
        (rf"{_SVC}_SERVICE_HOST", _ADDRESS),
        (rf"{_SVC}_SERVICE_PORT(?:_[A-Z0-9_]+)?", _NUMBER),
        (rf"{_SVC}_PORT|{_LINK}", r"(?:tcp|udp|sctp)://\S+"),
        (rf"{_LINK}_PROTO", r"tcp|udp|sctp"),
        (rf"{_LINK}_PORT", _NUMBER),
        (rf"{_LINK}_ADDR", _ADDRESS),
    ]
)


def is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is one of Kubernetes' service-link variables."""
    return any(n.fullmatch(name) and v.fullmatch(value) for n, v in _SERVICE_LINKS)


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted key, annotation)`` for every field of ``model``, sections included."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        yield prefix + name, annotation
        if is_section(annotation):
            yield from _fields(annotation, f"{prefix}{name}.")


def is_section(annotation: object) -> TypeGuard[type[BaseModel]]:
    """Whether a field of this type is a section (a table of settings), not a setting."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


#: Every dotted key, sections included, and its type.
TYPES: Final = dict(_fields(Settings))
#: The keys that are sections.
SECTIONS: Final = frozenset(key for key, annotation in TYPES.items() if is_section(annotation))
_SETTINGS: Final = sorted(key for key in TYPES if key not in SECTIONS)
#: Where a key without its section (``port``, ``RELAYD_HOST``) most likely belongs when
#: several sections have one of that name: the public listener's.
_FIRST_SECTION: Final = "server"


def is_text(annotation: object) -> bool:
    """Whether a setting of this type takes an environment variable's text as it is."""
    if annotation in (str, SecretStr):
        return True
    if get_origin(annotation) is not Literal:
        return False
    return all(isinstance(choice, str) for choice in get_args(annotation))


def is_structured(annotation: object) -> bool:
    """Whether a setting of this type takes JSON text only (a list or a table)."""
    return get_origin(annotation) in (list, tuple, dict)


def variable_of(key: str) -> str:
    """The variable of a dotted key: ``limits.port`` -> ``RELAYD_LIMITS__PORT``."""
    return ENV_PREFIX + key.upper().replace(".", ENV_NESTED_DELIMITER)


def nearest_key(key: str) -> str | None:
    """The setting a mistyped ``key`` most likely meant, or None when none is close.

    A key without a section (``port``) may mean the setting of that name in one; where
    several have one (``server.port``, ``admin.port``), the public listener's.
    """
    matches = difflib.get_close_matches(key, _SETTINGS, n=1, cutoff=0.75)
    if matches:
        return matches[0]
    if "." in key:
        return None
    named = [setting for setting in _SETTINGS if setting.partition(".")[2] == key]
    named.sort(key=lambda setting: setting.partition(".")[0] != _FIRST_SECTION)
    return named[0] if named else None


def unknown(key: str, value: object = None) -> str:
    """The problem with ``key``, which names no setting (``value``: what it was given)."""
    if key in SECTIONS:
        return "is a section, not a setting"
    if "." not in key and isinstance(value, Mapping):  # a [table] at the top: a section
        sections = sorted(name for name in SECTIONS if "." not in name)
        matches = difflib.get_close_matches(key, sections, n=1, cutoff=0.75)
        return f"unknown section; did you mean [{matches[0]}]?" if matches else "unknown section"
    nearest = nearest_key(key)
    return "unknown key" if nearest is None else f"unknown key; did you mean {nearest}?"
