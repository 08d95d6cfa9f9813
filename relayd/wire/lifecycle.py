"""One connection's life after the handshake, as states and transitions, without I/O.

A connection is :attr:`Phase.OPEN` until one side decides it ends; the first
decision names the phase it ends in, and each phase has one answer to the three
questions the connection's tasks ask once reading stops (wsproto's
``ConnectionState`` and websockets' ``State`` name the same idea; the
transitions live in one table, as h11's ``_state.py`` keeps them):

=================  =========================  ==============  ==================  =============
phase              what decided it            the outbox      close frame sent    then wait for
                                                                                  the client's
=================  =========================  ==============  ==================  =============
``DRAINING``       relayd is shutting down    flushed, until  1001                yes
                                              the router lets
                                              go of it
``CLOSING``        relayd, for policy (1008   flushed: what   the policy's code   yes
                   abuse, 1013 slow consumer, is queued and
                   1000 idle, 1011 no pong),  replies already
                   or the server API          decided
``FAILED``         the client broke RFC 6455  dropped         1002, 1007, 1009,   no (RFC 6455
                   (1002, 1007, 1009), sent                   1008 (1011 is sent  §7.1.7)
                   frames too fast (1008),                    by the gate)
                   or a bug in relayd (1011)
``CLOSE_RECEIVED`` the client's close frame   dropped         the client's code,  no
                                                              echoed (§5.5.1)
``GONE``           the stream ended without   dropped         none                no
                   a close frame (1006)
=================  =========================  ==============  ==================  =============

Only one later event changes an ending: a bug in relayd, which the connection
boundary answers with 1011 whatever the phase (:meth:`Lifecycle.crash`). Every
other event after the first decision is ignored; a drain in particular is
bounded as a whole by ``shutdown_grace_s``, not by the limits of one
connection.

Nothing here touches trio; ``tests/test_lifecycle.py`` tests it with plain values.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Final

from relayd.errors import CloseCode

__all__ = ["Close", "Event", "Lifecycle", "Phase"]


class Phase(enum.Enum):
    """Where a connection is in its life; see the module docstring's table."""

    # Members are singletons, equal only to themselves: hashed by identity, in C,
    # rather than by Enum.__hash__'s Python call (the transitions' table and
    # _FLUSHING hash a phase some nine times per connection).
    __hash__ = object.__hash__

    OPEN = "open"
    DRAINING = "draining"
    CLOSING = "closing"
    FAILED = "failed"
    CLOSE_RECEIVED = "close_received"
    GONE = "gone"


class Event(enum.Enum):
    """What can decide how a connection ends."""

    __hash__ = object.__hash__  # as Phase's

    DRAIN = "drain"  # the server shuts down
    POLICY = "policy"  # relayd closes it: abuse, slow consumer, idle, no pong
    VIOLATION = "violation"  # the client broke the protocol
    CLOSE_FRAME = "close_frame"  # the client's close frame arrived
    END = "end"  # the stream ended without a close frame


#: (phase, event) -> the phase it leads to. A pair not listed changes nothing.
TRANSITIONS: Final[dict[tuple[Phase, Event], Phase]] = {
    (Phase.OPEN, Event.DRAIN): Phase.DRAINING,
    (Phase.OPEN, Event.POLICY): Phase.CLOSING,
    (Phase.OPEN, Event.VIOLATION): Phase.FAILED,
    (Phase.OPEN, Event.CLOSE_FRAME): Phase.CLOSE_RECEIVED,
    (Phase.OPEN, Event.END): Phase.GONE,
}

_FLUSHING: Final = frozenset({Phase.DRAINING, Phase.CLOSING})
# Phase.OPEN as a module global for `reading`, asked at every read: an attribute
# of an enum class is looked up through EnumType.__getattr__'s slot, several
# times a global's cost. So too the members every connection reads once or twice.
_OPEN: Final = Phase.OPEN
_PHASE_GONE: Final = Phase.GONE
_ON_DRAIN: Final = Event.DRAIN
_ON_POLICY: Final = Event.POLICY
_ON_VIOLATION: Final = Event.VIOLATION
_ON_CLOSE_FRAME: Final = Event.CLOSE_FRAME
_ON_END: Final = Event.END
_NO_STATUS: Final = CloseCode.NO_STATUS


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """How a connection ended: the close code, its reason, and who decided.

    Attributes:
        code: the close code logged; for ``GONE``, 1006, which is never sent.
        reason: the close reason.
        closed_by: ``"server"``, ``"client"``, or ``"api"`` when the application's
            backend closed it through the server API.
    """

    code: int
    reason: str
    closed_by: str


_GONE: Final = Close(CloseCode.ABNORMAL, "", "client")
_DRAIN: Final = Close(CloseCode.GOING_AWAY, "server shutting down", "server")
_CRASH: Final = Close(CloseCode.INTERNAL_ERROR, "internal error", "server")


class Lifecycle:
    """The phase of one connection and how it ends; starts :attr:`Phase.OPEN`.

    Each method reports an event and returns True if it changed the phase (the
    caller then acts on the new phase: stops reading, closes the outbox, ...).
    """

    __slots__ = ("close", "phase")

    def __init__(self) -> None:
        self.phase = _OPEN
        #: How the connection ends; None while it is open.
        self.close: Close | None = None

    def _move(self, event: Event, close: Close) -> bool:
        after = TRANSITIONS.get((self.phase, event))
        if after is None:
            return False
        self.phase, self.close = after, close
        return True

    def drain(self) -> bool:
        """The server is shutting down: flush, then close with 1001."""
        return self._move(_ON_DRAIN, _DRAIN)

    def close_for_policy(self, code: int, reason: str, closed_by: str = "server") -> bool:
        """The server closes the connection for policy with ``code``.

        ``closed_by`` is ``"api"`` when the server API asked for it.
        """
        return self._move(_ON_POLICY, Close(code, reason, closed_by))

    def violate(self, code: int, reason: str) -> bool:
        """The client broke the protocol: fail the connection with ``code``."""
        return self._move(_ON_VIOLATION, Close(code, reason, "server"))

    def receive_close(self, code: int, reason: str) -> bool:
        """The client's close frame arrived with ``code`` (1005: none) and ``reason``."""
        return self._move(_ON_CLOSE_FRAME, Close(code, reason, "client"))

    def end(self) -> bool:
        """The stream ended without a close frame."""
        return self._move(_ON_END, _GONE)

    def crash(self) -> None:
        """A bug in relayd ended the connection: whatever the phase, it fails with 1011."""
        self.phase, self.close = Phase.FAILED, _CRASH

    @property
    def reading(self) -> bool:
        """True while the client's messages are read."""
        return self.phase is _OPEN

    @property
    def flushing(self) -> bool:
        """True if the outbox is written out before the close frame; else it is dropped."""
        return self.phase in _FLUSHING

    @property
    def close_frame(self) -> tuple[int | None, str] | None:
        """The close frame this end owes: ``(code, reason)``, code None for an empty one.

        None while open and when the stream ended without a close frame.
        """
        close = self.close
        if close is None or self.phase is _PHASE_GONE:
            return None
        if close.closed_by == "client" and close.code == _NO_STATUS:
            return None, ""  # a close without a code is answered without one
        if close.closed_by == "client":
            return close.code, ""  # echoed (RFC 6455 §5.5.1)
        return close.code, close.reason

    @property
    def awaits_client_close(self) -> bool:
        """True if, after its close frame, relayd waits for the client's."""
        return self.phase in _FLUSHING
