"""structlog set-up: one event per line, JSON for machines or colour for people.

Event names and their fields are documented in docs/logging.md and pinned by
tests (``structlog.testing.capture_logs``). Code that logs takes a logger from
:func:`get_logger` and passes every field by keyword; nothing here formats a
message string.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final, TextIO

import msgspec
import structlog

from relayd.config import LogSettings

__all__ = ["configure", "get_logger"]

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# msgspec encodes an event several times faster than json.dumps, which matters
# with one message.relay line per relayed message; a value of a type JSON lacks
# (a path, an enum member that slipped in) is written as its str().
_json: Final = msgspec.json.Encoder(enc_hook=str)


def _serialize(event: dict[str, Any], **_: Any) -> str:
    return _json.encode(event).decode()


def _event_first(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    # A person reading `journalctl -o cat` scans for the event name; put the
    # time, level and name first and the event's own fields after them.
    return {
        "ts": event_dict.pop("ts"),
        "level": event_dict.pop("level"),
        "event": event_dict.pop("event"),
        **event_dict,
    }


def configure(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Configure structlog process-wide from the ``[log]`` settings.

    Args:
        settings: level and format.
        stream: where lines go; stdout (journald keeps it) by default.
    """
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    renderer: list[structlog.typing.Processor]
    if settings.format == "json":
        renderer = [
            structlog.processors.format_exc_info,
            _event_first,
            structlog.processors.JSONRenderer(serializer=_serialize),
        ]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=_isatty(stream))]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def _isatty(stream: TextIO | None) -> bool:
    return (stream or sys.stdout).isatty()


def get_logger() -> structlog.typing.FilteringBoundLogger:
    """The relayd logger; its output follows the last :func:`configure`."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("relayd")
    return logger
