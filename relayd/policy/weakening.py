"""What a reload would weaken, and whether the configuration says so on purpose; no I/O.

A reload reads the config file again. A file emptied or cut short by a partial
write still parses, and every key it lost falls back to its default; several
defaults are the open ones: authentication off, every origin allowed, no TLS,
no audience or issuer checked, no key for the server API. So a reload that
would change one of these to its open side (:data:`CHECKS`) is applied only
when the new value is *stated*: set in the file, the environment or on the
command line, which pydantic records in each section's ``model_fields_set``.
Otherwise the reload is refused like any bad one, and the old settings stay
(:mod:`relayd.daemon.service`). An applied weakening is still logged, at
warning level, saying what was weakened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final

from pydantic import BaseModel

from relayd.config import Settings

__all__ = ["CHECKS", "Weakening", "weakenings"]


@dataclasses.dataclass(frozen=True, slots=True)
class Weakening:
    """One way new settings are less safe than the ones in force.

    Attributes:
        key: the dotted setting, e.g. ``auth.mode``.
        what: what it weakens, for the log (never a secret).
        stated: whether the new value is set in a source, not left to its default.
    """

    key: str
    what: str
    stated: bool

    def __str__(self) -> str:
        return f"{self.key}: {self.what}"


def _turned_off(before: str, after: str) -> str | None:
    return "authentication turned off" if before != "off" and after == "off" else None


def _origins(before: tuple[str, ...], after: tuple[str, ...]) -> str | None:
    if not before:
        return None  # every origin was allowed already
    if not after:
        return "every origin allowed (the list emptied)"
    added = sorted(set(after) - set(before))
    return f"origins added: {', '.join(added)}" if added else None


def _no_longer(checked: str) -> Callable[[str, str], str | None]:
    def check(before: str, after: str) -> str | None:
        return f"{checked} no longer checked" if before and not after else None

    return check


def _dropped(what: str) -> Callable[[str, str], str | None]:
    def check(before: str, after: str) -> str | None:
        return what if before and not after else None

    return check


#: Given a setting's value in force and its new value: what the change weakens, or None.
Check = Callable[[Any, Any], str | None]

#: Each setting whose default is its open side: (section, key, its check).
CHECKS: Final[tuple[tuple[str, str, Check], ...]] = (
    ("auth", "mode", _turned_off),
    ("auth", "jwt_audience", _no_longer("the token's audience")),
    ("auth", "jwt_issuer", _no_longer("the token's issuer")),
    ("server", "allowed_origins", _origins),
    ("tls", "cert_file", _dropped("TLS dropped (at the next restart)")),
    ("admin", "api_key_file", _dropped("the server API's key dropped (at the next restart)")),
)


def weakenings(before: Settings, after: Settings) -> list[Weakening]:
    """Every way ``after`` is less safe than ``before``, each with whether it is stated.

    Args:
        before: the settings in force.
        after: the settings just read, fresh from their sources (their
            ``model_fields_set`` tells what the sources set).
    """
    found = []
    for section, key, check in CHECKS:
        old: BaseModel = getattr(before, section)
        new: BaseModel = getattr(after, section)
        what = check(getattr(old, key), getattr(new, key))
        if what is not None:
            stated = section in after.model_fields_set and key in new.model_fields_set
            found.append(Weakening(f"{section}.{key}", what, stated))
    return found
