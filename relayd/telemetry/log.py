"""structlog set-up: one event per line, JSON for machines or colour for people.

Event names and their fields are documented in docs/logging.md and pinned by
tests (``structlog.testing.capture_logs``). Code that logs takes a logger from
:func:`get_logger` and passes every field by keyword; nothing here formats a
message string.

**Cost.** relayd logs one ``message.relay`` event per message by default, so
the JSON path is kept short: three processors (the line budget below, which
looks at the event's name only, exception formatting, then one that stamps,
orders and encodes with msgspec straight to bytes), and a sink
(:mod:`relayd.telemetry.line_sink`) that writes lines rather than printing
them, and holds those of a :func:`~relayd.telemetry.line_sink.batched` block
to write them together. Within such a block, :func:`line_writer` writes one
event's lines with the very bytes the JSON processors would produce, without
structlog's per-call dispatch, whenever the JSON processors are the ones
configured (under ``capture_logs`` in tests, or with the console format, it
declines and the caller logs through structlog as usual).

**What a client can make relayd write.** The events a client can cause at will
(:data:`THROTTLED`: a refused handshake, a limit that closes its connection,
an ``error`` contained at the connection boundary, a library's warning) pass a
:class:`~relayd.telemetry.throttle.LineBudget` first: per kind of line, a
burst and then a steady trickle; what is left out is counted and written as a
``log.suppressed`` line by :func:`report_suppressed_lines` (the server runs
it). In the console format, every string value has its control and format
characters escaped (:mod:`relayd.telemetry.console`), so a ``User-Agent`` of
escape sequences cannot drive the operator's terminal; JSON escapes them by itself.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Final, TextIO

import msgspec
import structlog
import trio

from relayd.config import LogSettings
from relayd.telemetry import line_sink
from relayd.telemetry.console import escape_for_terminal
from relayd.telemetry.throttle import SUMMARY_INTERVAL_S, LineBudget

__all__ = [
    "THROTTLED",
    "configure",
    "get_logger",
    "info_line",
    "internal_errors",
    "line_writer",
    "report_suppressed_lines",
]

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: structlog's method names that are not level names, and the level they log at.
_METHOD_LEVELS: Final = {"warn": "warning", "exception": "error", "msg": "info"}

# msgspec encodes an event several times faster than json.dumps; a value of a
# type JSON lacks (a path, an enum member that slipped in) is written as its str().
_json: Final = msgspec.json.Encoder(enc_hook=str)


class _Clock:
    """ISO 8601 UTC timestamps with microseconds, formatting the date once a second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
            self._prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((t - second) * 1e6):06d}Z"


_clock: Final = _Clock()


def _stamp(
    _logger: object, method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    # A person reading `journalctl -o cat` scans for the event name; put the
    # time, level and name first and the event's own fields after them.
    return {
        "ts": _clock.now(),
        "level": _METHOD_LEVELS.get(method, method),
        "event": event_dict.pop("event"),
        **event_dict,
    }


#: Syslog priorities by level, written before each line when stdout is the
#: journal (see :func:`_to_journal`); empty otherwise.
_priority: dict[str, bytes] = {}
_PRIORITIES: Final = {"debug": b"<7>", "info": b"<6>", "warning": b"<4>", "error": b"<3>"}


def _render_json(_logger: object, method: str, event_dict: structlog.typing.EventDict) -> bytes:
    stamped = _stamp(_logger, method, event_dict)
    return _priority.get(stamped["level"], b"") + _json.encode(stamped)


def _to_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal: systemd says so in ``JOURNAL_STREAM``.

    journald then takes a ``<N>`` prefix as the line's priority and strips it
    (``SyslogLevelPrefix=`` is on by default), so ``journalctl -p err`` finds
    relayd's errors and ``journalctl -o cat`` still shows plain JSON.
    """
    journal = os.environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return journal == f"{status.st_dev}:{status.st_ino}"


class _LibraryLogs(logging.Handler):
    """Sends the standard library's log records (trio's, say) to relayd's log as ``library.log``."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        method = getattr(get_logger(), level if level in _LEVELS else "error")
        fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        method("library.log", **fields)


#: The events a client can cause whenever it likes, and the field that tells
#: their kinds apart (each kind has its own line budget).
THROTTLED: Final[dict[str, str | None]] = {
    "handshake.rejected": "status",
    "limit.exceeded": "limit",
    "library.log": "logger",
    "listener.paused": "reason",
    "error": None,
    # Not a client's doing, but a backend's: one per request would double the lines of
    # a backend that publishes as fast as clients send (each message has its own line).
    "api.request": "route",
}
#: The budget of those lines, process-wide like the sink.
_budget = LineBudget()
#: The ``error`` events since the process started, written or left out.
_internal_errors = 0


def internal_errors() -> int:
    """How many ``error`` events (bugs relayd contained) were logged since the process started.

    Counted as they are logged, so left out by the line budget or not, and
    whoever logged them (a connection, an admin request, the cluster link).
    """
    return _internal_errors


def _throttle(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    # First of all processors: a line left out costs no formatting at all.
    event = event_dict.get("event")
    if event == "error":
        global _internal_errors  # process-wide, like the budget
        _internal_errors += 1
    if event in THROTTLED:
        field = THROTTLED[event]
        kind = None if field is None else event_dict.get(field)
        if not _budget.allow(event, kind, time.monotonic()):
            raise structlog.DropEvent
    return event_dict


async def report_suppressed_lines(interval_s: float = SUMMARY_INTERVAL_S) -> None:
    """Every ``interval_s``, write a ``log.suppressed`` line per kind of line left out; forever.

    Resource handling: run it in a nursery that lives as long as the logging
    does; when cancelled, it writes the counts not yet written.
    """
    try:
        while True:
            await trio.sleep(interval_s)
            _write_suppressed(interval_s)
    finally:
        _write_suppressed(interval_s)


def _write_suppressed(interval_s: float) -> None:
    log = get_logger()
    for left_out in _budget.take_suppressed():
        log.warning(
            "log.suppressed",
            suppressed=left_out.event,
            kind=left_out.kind,
            count=left_out.count,
            interval_s=interval_s,
        )


_JSON_PROCESSORS: Final[list[structlog.typing.Processor]] = [
    _throttle,
    structlog.processors.format_exc_info,
    _render_json,
]


#: The level configured last (line_writer writes at info only when it is shown).
_level = logging.INFO
#: What comes before and after the timestamp in an info line of each event
#: line_writer has written: the JSON processors' very bytes, made once per event
#: (not per batch); emptied by :func:`configure`, which may change the priority prefix.
_heads: dict[str, tuple[bytes, bytes]] = {}


def _head_around_ts(event: str) -> tuple[bytes, bytes]:
    # `{"ts":"<ts>","level":"info","event":<event>,` as msgspec writes it: no spaces, and
    # the timestamp needs no escaping (digits, "-", ":", ".", "T", "Z").
    before = _priority.get("info", b"") + b'{"ts":"'
    after = b'","level":"info","event":' + _json.encode(event) + b","
    return before, after


def line_writer(event: str) -> Callable[[dict[str, Any]], None] | None:
    """A fast writer of ``event`` at info level for one ``batched`` block, if possible.

    Every line it writes is stamped with the time of this call.

    Returns:
        A function taking an event's fields (not ``event``) that writes its
        JSON line; or None when structlog must render the event instead: the
        JSON format is not the one configured, info is below the level, or
        another set of processors is in place (``capture_logs``).
    """
    sink = line_sink.current()
    head = None if sink is None else _line_head(event)
    if sink is None or head is None:
        return None
    write, encode = sink.line, _json.encode

    def write_line(fields: dict[str, Any]) -> None:
        write(head + encode(fields)[1:])

    return write_line


def _line_head(event: str) -> bytes | None:
    """An info line of ``event`` up to its fields, stamped now.

    None when structlog must render the event instead: info is below the level,
    or the processors configured are not the JSON ones (``capture_logs`` swaps
    them in, the console format has others).
    """
    # capture_logs changes the configured list in place: compare its contents.
    if _level > logging.INFO or structlog.get_config()["processors"] != _JSON_PROCESSORS:
        return None
    around = _heads.get(event)
    if around is None:
        around = _heads[event] = _head_around_ts(event)
    return around[0] + _clock.now().encode() + around[1]


def info_line(log: structlog.typing.FilteringBoundLogger, event: str, **fields: Any) -> None:
    """Log ``event`` at info level, as ``log.info(event, **fields)`` would, in fewer steps.

    For the events of every connection (``connection.open``, ``connection.close``):
    the line is :func:`line_writer`'s, the very bytes structlog would write, held
    with other lines as a :func:`~relayd.telemetry.line_sink.batched` block of
    its own holds it (so written within
    :data:`~relayd.telemetry.line_sink.FLUSH_DELAY_S`, with other lines under
    connection churn); through structlog, in such a block, when that declines,
    or ``log`` carries context of its own.
    """
    sink = line_sink.current()
    head = None if sink is None or structlog.get_context(log) else _line_head(event)
    if sink is None or head is None:
        with line_sink.batched():
            log.info(event, **fields)
    else:
        sink.msg_batched(head + _json.encode(fields)[1:])


def configure(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Configure structlog process-wide from the ``[log]`` settings.

    Args:
        settings: level and format.
        stream: where lines go; stdout (journald keeps it) by default.
    """
    global _level  # one logging set-up per process, like structlog's own
    stream = stream or sys.stdout
    sink = line_sink.install(stream)
    _level = _LEVELS[settings.level]
    _budget.refill()  # a fresh start for each set-up; what was left out is still reported
    _priority.clear()
    _heads.clear()
    if _to_journal(stream):
        _priority.update(_PRIORITIES)
    # Libraries log through the standard library (trio when accept() fails
    # for want of file descriptors): their records become JSON lines too.
    root = logging.getLogger()
    root.handlers = [handler for handler in root.handlers if not isinstance(handler, _LibraryLogs)]
    root.addHandler(_LibraryLogs(logging.WARNING))
    processors: list[structlog.typing.Processor]
    if settings.format == "json":
        processors = list(_JSON_PROCESSORS)
    else:
        processors = [
            _throttle,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            escape_for_terminal,
            structlog.dev.ConsoleRenderer(colors=stream.isatty()),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.level]),
        logger_factory=lambda *_: sink,
        cache_logger_on_first_use=False,
    )


def get_logger() -> structlog.typing.FilteringBoundLogger:
    """The relayd logger; its output follows the last :func:`configure`."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("relayd")
    return logger
