"""Routing decisions, without I/O: who may receive a message, and what the sender hears.

:class:`RoutingTable` maps a client id to the connections that hold it (one
without authentication; possibly several with it, and a message to the id
reaches all of them). :func:`outcome_of` turns what each recipient's outbox
said into the one outcome relayd reports to the sender and the log.

The router task (:mod:`relayd.routing.local`) is the only writer of the table; the
table knows nothing of trio and is tested with plain values.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Final, Generic, TypeVar

from relayd.errors import ErrorCode

__all__ = ["DELIVERED", "RECIPIENT_BUSY", "Outcome", "RoutingTable", "outcome_of"]

H = TypeVar("H")


class Outcome(enum.StrEnum):
    """What became of one message; the ``outcome`` field of ``message.relay``."""

    DELIVERED = "delivered"
    UNKNOWN_RECIPIENT = "unknown_recipient"
    RECIPIENT_BUSY = "recipient_busy"
    # Cluster only: the recipient may be on a node this one cannot reach now
    # (not sent), or the node holding it did not answer in time (maybe delivered).
    RECIPIENT_UNREACHABLE = "recipient_unreachable"
    DELIVERY_UNCONFIRMED = "delivery_unconfirmed"

    @property
    def error(self) -> ErrorCode | None:
        """The error code the sender is told, or None when it was delivered."""
        return _ERRORS[self]


#: The outcomes of every message as module globals, for what runs per message: an
#: attribute of an enum class (``Outcome.DELIVERED``) is looked up through
#: ``EnumType.__getattr__``'s slot, several times a global's cost.
DELIVERED: Final = Outcome.DELIVERED
RECIPIENT_BUSY: Final = Outcome.RECIPIENT_BUSY

_ERRORS = {
    Outcome.DELIVERED: None,
    Outcome.UNKNOWN_RECIPIENT: ErrorCode.UNKNOWN_RECIPIENT,
    Outcome.RECIPIENT_BUSY: ErrorCode.RECIPIENT_BUSY,
    Outcome.RECIPIENT_UNREACHABLE: ErrorCode.RECIPIENT_UNREACHABLE,
    Outcome.DELIVERY_UNCONFIRMED: ErrorCode.DELIVERY_UNCONFIRMED,
}


def outcome_of(accepted: Iterable[bool]) -> Outcome:
    """Decide a message's outcome from each recipient outbox's answer.

    Args:
        accepted: one bool per connection holding the recipient id: whether
            its outbox took the message.

    Returns:
        ``DELIVERED`` if any outbox took it (the id was reached),
        ``RECIPIENT_BUSY`` if every outbox was full, ``UNKNOWN_RECIPIENT`` if
        no connection holds the id.
    """
    seen = False
    for ok in accepted:
        if ok:
            return Outcome.DELIVERED
        seen = True
    return Outcome.RECIPIENT_BUSY if seen else Outcome.UNKNOWN_RECIPIENT


class _Routes(dict[str, tuple[H, ...]]):
    """The table's dict: an id nobody holds reads as no handles."""

    __slots__ = ()

    def __missing__(self, client_id: str) -> tuple[H, ...]:
        return ()


class RoutingTable(Generic[H]):
    """Client ids to the handles of the connections holding them.

    Handles are compared by identity; the handles under one id keep the order
    they were added in.

    Attributes:
        lookup: the handles holding a client id; empty if nobody does. (The
            dict's own ``__getitem__``, with no Python call between: every
            message routed looks its recipient up.)
    """

    __slots__ = ("_routes", "lookup")

    def __init__(self) -> None:
        self._routes: _Routes[H] = _Routes()
        self.lookup: Callable[[str], tuple[H, ...]] = self._routes.__getitem__

    def add(self, client_id: str, handle: H) -> None:
        """Make ``handle`` a recipient of messages to ``client_id``."""
        self._routes[client_id] = (*self._routes.get(client_id, ()), handle)

    def discard(self, client_id: str, handle: H) -> None:
        """Stop routing ``client_id`` to ``handle``; absent pairs are ignored."""
        handles = self._routes.get(client_id)
        if handles is None:
            return
        if len(handles) == 1:  # the usual id, one connection's: no tuple to rebuild
            if handles[0] is handle:
                del self._routes[client_id]
            return
        rest = tuple(h for h in handles if h is not handle)
        if rest:
            self._routes[client_id] = rest
        else:
            del self._routes[client_id]

    def ids(self) -> list[str]:
        """Every routable id, in no particular order."""
        return list(self._routes)

    def handles(self) -> list[H]:
        """Every handle in the table, once for each id it holds."""
        return [h for hs in self._routes.values() for h in hs]

    def __len__(self) -> int:
        """How many ids are routable."""
        return len(self._routes)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._routes
