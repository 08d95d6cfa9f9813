"""What a reload changes: the keys it may change, what is in force after it, and its report.

A reload (SIGHUP, :mod:`relayd.daemon.service`) hands the server new settings
(:meth:`relayd.daemon.server.Server.reload`). Reloadable: ``limits.*`` (see
:mod:`relayd.daemon.live` for which reach open connections),
``server.allowed_origins``, ``server.shutdown_grace_s``, ``auth.*`` and
``log.level``/``log.messages``/``log.messages_sample``/``log.bodies``.
Every other key needs a restart: a reload reports it (:class:`Reload`) and
keeps the value relayd started with in force (:func:`in_force`), so that the
next reload compares against what is really running.

Pure: settings in, settings and a report out; nothing here applies anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Final

from pydantic import SecretStr

from relayd.config import Settings

__all__ = ["FileRead", "Reload", "changes", "files_changed", "files_in_force", "in_force"]

#: A file a setting names, as a reload read it: its path, and a digest of what it held
#: (None when it could not be read, or no file is named).
FileRead = tuple[str, bytes | None]


@dataclasses.dataclass(frozen=True, slots=True)
class Reload:
    """What a reload changed: every changed key, and those that need a restart."""

    changed: list[str]
    restart_required: list[str]


#: The keys (``section.key``), or the prefixes of keys, a reload changes in place.
_RELOADABLE: Final = (
    "limits.",
    "server.allowed_origins",
    "server.shutdown_grace_s",
    "auth.",
    "log.level",
    "log.messages",
    "log.messages_sample",
    "log.bodies",
)


def changes(running: Settings, reloaded: Settings, files_changed: Sequence[str] = ()) -> Reload:
    """Every key whose value ``reloaded`` changes, and those among them that need a restart.

    ``files_changed``: keys naming a file that only a start reads (a TLS certificate,
    the API key) whose content is new though its path is not; they are reported as
    changed, and as needing a restart.
    """
    before, after = _flat(running), _flat(reloaded)
    changed = sorted({key for key in after if after[key] != before.get(key)} | {*files_changed})
    return Reload(
        changed=changed, restart_required=[k for k in changed if not k.startswith(_RELOADABLE)]
    )


def files_changed(running: Mapping[str, FileRead], read: Mapping[str, FileRead]) -> list[str]:
    """The keys whose file holds something new: used on both sides, and a new content.

    A file the settings name but do not use has no digest (a tokens file with
    ``auth.mode = "off"``, the cluster's files with ``[cluster]`` off): a reload that
    starts or stops using it (``auth.mode``, ``cluster.enabled``) reports that key, not
    the file. A new path is reported as the key's new value.
    """
    changed = []
    for key, (_path, digest) in read.items():
        _running_path, running_digest = running.get(key, ("", None))
        if None not in (digest, running_digest) and digest != running_digest:
            changed.append(key)
    return changed


def files_in_force(
    running: Mapping[str, FileRead], read: Mapping[str, FileRead]
) -> dict[str, FileRead]:
    """The files in force after a reload that read ``read``, ``running`` before it.

    A tokens file is applied by the reload that read it; a certificate only by a start,
    so the file of a key a reload cannot change stays as the start read it.
    """
    now = dict(running)
    for key, file in read.items():
        if key.startswith(_RELOADABLE) or key not in now:
            now[key] = file
    return now


def in_force(running: Settings, reloaded: Settings) -> Settings:
    """``reloaded``, but with the values of ``running`` for every key a reload cannot change."""
    sections: dict[str, object] = {}
    for name in type(reloaded).model_fields:
        old, new = getattr(running, name), getattr(reloaded, name)
        kept = {
            key: getattr(old, key)
            for key in type(new).model_fields
            if not f"{name}.{key}".startswith(_RELOADABLE)
        }
        sections[name] = new.model_copy(update=kept)
    return reloaded.model_copy(update=sections)


def _flat(settings: Settings) -> dict[str, object]:
    # Secrets compare by value (the dump masks them) without being stored.
    dumped = settings.model_dump()
    return {
        f"{section}.{key}": value.get_secret_value() if isinstance(value, SecretStr) else value
        for section, table in dumped.items()
        for key, value in table.items()
    }
