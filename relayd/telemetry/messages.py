"""What became of each message: counted in ``relayd_messages_total``, logged as ``message.relay``.

Every outcome of a client's message goes through one :class:`MessageEvents`,
wherever it was decided: by the connection that refused it on arrival
(``invalid_json``, ``rate_limited``, ...), or by the router (``delivered``,
``unknown_recipient``, ``recipient_busy``). (Messages on the diagnostic echo
route are only counted, as ``echoed``.) A message the server API published
(its sender is :data:`~relayd.wire.dialects.SERVER_SENDER`, ``""``) is logged
the same way but counted apart, in ``relayd_api_messages_total``: a backend
publishing to ids that have left is not clients being refused. The server owns the one instance,
hands it to both, and a reload reconfigures it in this one place
(:meth:`MessageEvents.reconfigure`), so the two can never disagree about
whether ``log.messages`` is on.

Cost: relayd records an outcome for every message, so the router asks for a
recorder once per batch (:meth:`MessageEvents.recorder`), inside
:func:`relayd.telemetry.line_sink.batched` (a refusal, rarer, asks for one of
its own; a lone message's line is held as such a block's would be): it then
writes each line with :func:`~relayd.telemetry.log.line_writer`, without
structlog's per-call dispatch, whenever the JSON format is the one configured.
The default recorder is made once, not per batch, for as long as
``line_writer`` gives the same writer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Final, Protocol

import msgspec
import structlog

from relayd.telemetry.line_sink import batched
from relayd.telemetry.log import line_writer
from relayd.telemetry.metrics import Stats

__all__ = ["MessageEvents", "Recorder"]

Body = msgspec.Raw | None

#: The one outcome that is not a refusal (an echo is counted apart and never logged).
_DELIVERED: Final = "delivered"


class Recorder(Protocol):
    """Records one message's outcome; made by :meth:`MessageEvents.recorder`."""

    def __call__(
        self, sender: str, to: str | None, size: int, outcome: str, body: msgspec.Raw | None = None
    ) -> None:
        """Count and log one outcome.

        Args:
            sender: the sender's id; ``""`` for the server API.
            to: the recipient id it asked for; None if its message could not be read.
            size: the client frame's size in bytes.
            outcome: ``delivered``, ``echoed`` or an error code.
            body: the message's raw JSON, logged only with ``log.bodies`` on.
        """


class MessageEvents:
    """The one place message outcomes are counted and logged.

    Args:
        log: where ``message.relay`` events go when the fast path declines.
        stats: the counters (``messages`` by outcome).
        messages: which outcomes get a ``message.relay`` event (``log.messages``):
            ``all``, ``refusals``, ``sampled`` or ``off``.
        sample: with ``sampled``, the fraction of deliveries logged (``log.messages_sample``).
        bodies: include the body (``log.bodies``).
    """

    __slots__ = ("_bodies", "_count", "_log", "_logged", "_messages", "_sample", "_stats")

    def __init__(
        self,
        log: structlog.typing.FilteringBoundLogger,
        stats: Stats,
        *,
        messages: str = "all",
        sample: float = 1.0,
        bodies: bool = False,
    ) -> None:
        self._log = log
        self._stats = stats
        self._messages = messages
        self._sample = sample
        self._bodies = bodies
        # Client messages, or the server API's (sender ""): one test of a string's
        # truth per message picks the counter. Made once: it depends on no setting.
        counts, api_counts = stats.messages, stats.api_messages

        def count(sender: str, to: str | None, size: int, outcome: str, body: Body = None) -> None:
            (counts if sender else api_counts)[outcome] += 1

        self._count: Recorder = count
        # The default recorder and the line writer it writes with: the same while
        # line_writer gives the same writer and the settings stay (reconfigure forgets it).
        self._logged: tuple[Callable[[dict[str, Any]], None], Recorder] | None = None

    def reconfigure(self, *, messages: str, sample: float, bodies: bool) -> None:
        """Apply reloaded ``[log]`` settings to outcomes recorded from now on."""
        self._messages = messages
        self._sample = sample
        self._bodies = bodies
        self._logged = None

    def recorder(self) -> Recorder:
        """A function that records outcomes as the settings are now; make one per batch.

        Every outcome is counted; which are logged is ``messages``: all of them, the
        refusals, the refusals and a random ``sample`` of the deliveries, or none.
        """
        messages = self._messages
        if messages == "off":
            return self._count
        fast = line_writer("message.relay")
        logged = self._logged
        if logged is not None and logged[0] is fast:
            # The default, asked for by every lone message: made once, not per batch.
            return logged[1]
        counts, api_counts = self._stats.messages, self._stats.api_messages
        write = fast or self._slow_writer()
        if messages == "all" and not self._bodies:
            # Nothing here but the count and the line.
            def record_all(
                sender: str, to: str | None, size: int, outcome: str, body: Body = None
            ) -> None:
                (counts if sender else api_counts)[outcome] += 1
                write({"from": sender, "to": to, "bytes": size, "outcome": outcome})

            if fast is not None:
                self._logged = (fast, record_all)
            return record_all
        bodies = self._bodies
        # Deliveries are thinned out unless all are logged: one is logged when a draw from
        # [0, 1) falls below `sample`, never for "refusals".
        thinned = messages != "all"
        sample = self._sample if messages == "sampled" else 0.0
        draw = random.random

        def record(sender: str, to: str | None, size: int, outcome: str, body: Body = None) -> None:
            (counts if sender else api_counts)[outcome] += 1
            if thinned and outcome == _DELIVERED and draw() >= sample:
                return
            fields: dict[str, Any] = {"from": sender, "to": to, "bytes": size, "outcome": outcome}
            if bodies and body is not None:
                # Never raises after a delivery: a body that reached here is UTF-8
                # (text frames and the server API check), and one that were not
                # would be logged with U+FFFD, not turn a delivery into an error.
                fields["body"] = bytes(body).decode(errors="replace")
            write(fields)

        return record

    def _slow_writer(self) -> Callable[[dict[str, Any]], None]:
        # Through structlog, when line_writer declines (console format, capture_logs);
        # held as line_writer's lines are, though a lone message is routed outside a batch.
        log = self._log.bind()

        def write(fields: dict[str, Any]) -> None:
            with batched():
                log.info("message.relay", **fields)

        return write
