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
declines and the caller logs through structlog as usual). The writer is
made once per event and configuration, and stamps a batch's lines once, at
its first: a lone message's line costs no set-up of its own.

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
        self._prefix = b""

    def now(self) -> str:
        """The time now, for structlog's lines."""
        return self.stamp().decode()

    def stamp(self) -> bytes:
        """The time now, in bytes, for the lines :func:`line_writer` writes."""
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
            self._prefix = moment.strftime("%Y-%m-%dT%H:%M:%S").encode()
        return b"%s.%06dZ" % (self._prefix, int((t - second) * 1e6))


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
#: The writer :func:`line_writer` gave out for each event, with the sink it writes to:
#: made once per event and sink; emptied by :func:`configure`, which may change the
#: priority prefix its lines begin with.
_writers: dict[str, tuple[line_sink.LineSink, Callable[[dict[str, Any]], None]]] = {}


def _head_around_ts(event: str) -> tuple[bytes, bytes]:
    # `{"ts":"<ts>","level":"info","event":<event>,` as msgspec writes it: no spaces, and
    # the timestamp needs no escaping (digits, "-", ":", ".", "T", "Z").
    before = _priority.get("info", b"") + b'{"ts":"'
    after = b'","level":"info","event":' + _json.encode(event) + b","
    return before, after


def line_writer(event: str) -> Callable[[dict[str, Any]], None] | None:
    """A fast writer of ``event``'s lines at info level, if possible; the same one each time.

    The function it returns takes an event's fields (not ``event``) and writes
    their line, stamped with the time of that call (in a batch, the time of the
    batch's first such line), with the very bytes the
    JSON processors would write: held with the lines of a
    :func:`~relayd.telemetry.line_sink.batched` block, or else as such a block
    of its own would hold it
    (:meth:`~relayd.telemetry.line_sink.LineSink.line_batched`). It is made
    once per event and sink, so a caller may keep what it built around it for
    as long as it gets the same one.

    Returns:
        The writer; or None when structlog must render the event instead: the
        JSON format is not the one configured, info is below the level, or
        another set of processors is in place (``capture_logs``). Ask again for
        each batch of lines: the answer changes with the configuration.
    """
    sink = line_sink.current()
    # capture_logs changes the configured list in place: compare its contents.
    if (
        sink is None
        or _level > logging.INFO
        or structlog.get_config()["processors"] != _JSON_PROCESSORS
    ):
        return None
    made = _writers.get(event)
    if made is None or made[0] is not sink:
        made = _writers[event] = (sink, _writer(sink, event))
    return made[1]


def _writer(sink: line_sink.LineSink, event: str) -> Callable[[dict[str, Any]], None]:
    before, after = _head_around_ts(event)
    write, encode, stamp = sink.line_batched, _json.encode, _clock.stamp

    def write_line(fields: dict[str, Any]) -> None:
        # A batch's lines carry the time of its first: a batch does not await, and a
        # stamp per line would cost a busy router a sixth of its messages a second.
        ts = sink.batch_stamp
        if ts is None:
            ts = stamp()
            if sink.held:
                sink.batch_stamp = ts
        write(before + ts + after + encode(fields)[1:])

    return write_line


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
    write = None if structlog.get_context(log) else line_writer(event)
    if write is not None:
        write(fields)
        return
    with line_sink.batched():
        log.info(event, **fields)


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
    _writers.clear()
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
